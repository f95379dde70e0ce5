"""torch.export: a program exported with fusednorm can be trained, and picks its backend when it runs.

fusednorm::fwd carries its own autograd formula (fusednorm.ops: register_autograd, backward =
fusednorm::bwd), so an exported program's module runs forward and backward through the two ops; the
backend name in the graph is the one the caller gave ("auto" by default), resolved by the op on the
device it runs on.
"""

from __future__ import annotations

import pytest
import torch

import fusednorm
from fusednorm import backends

N = 16


class _Block(torch.nn.Module):
    """A Linear, then a Pre-LN fused add + norm whose y and h are both used, then a plain norm."""

    def __init__(self, rms: bool, backend: str | None = None):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.linear = torch.nn.Linear(N, N)
        self.rms, self.backend = rms, backend
        self.weight = torch.nn.Parameter(1.0 + 0.3 * torch.randn(N, generator=gen))
        self.bias = None if rms else torch.nn.Parameter(0.3 * torch.randn(N, generator=gen))
        self.scale = torch.nn.Parameter(1.0 + 0.3 * torch.randn(N, generator=gen))

    def forward(self, x, residual):
        branch = self.linear(x)
        if self.rms:
            y, h = fusednorm.add_rms_norm(branch, residual, self.weight, residual_scale=self.scale, prenorm=True,
                                          backend=self.backend)
            return fusednorm.rms_norm(y, self.weight, backend=self.backend) + h
        y, h = fusednorm.add_layer_norm(branch, residual, self.weight, self.bias, residual_scale=self.scale,
                                        prenorm=True, backend=self.backend)
        return fusednorm.layer_norm(y, self.weight, self.bias, backend=self.backend) + h


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 5, N, generator=gen) + 2.0, torch.randn(3, 5, N, generator=gen)


def _gradients(module: torch.nn.Module, names: list[str], x, residual) -> dict:
    x, residual = x.clone().requires_grad_(True), residual.clone().requires_grad_(True)
    out = module(x, residual)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    leaves = [x, residual] + [module.get_parameter(n) for n in names]
    grads = torch.autograd.grad((out * dy).sum(), leaves)
    return {"out": out.detach()} | dict(zip(["x", "residual"] + names, grads, strict=True))


def _fusednorm_nodes(program) -> list:
    return [n for n in program.graph.nodes if n.op == "call_function" and "fusednorm" in str(n.target)]


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_exported_program_trains_like_eager(rms, strict, torch_function_path):
    # torch_function_path: eager through the backend the exported op runs (the CPU path agrees within DESIGN
    # section 6, not bit for bit)
    module = _Block(rms)
    names = [n for n, _ in module.named_parameters()]
    x, residual = _inputs()
    program = torch.export.export(module, (x, residual), strict=strict)
    assert [str(n.target) for n in _fusednorm_nodes(program)] == ["fusednorm.fwd.default"] * 2
    exported = _gradients(program.module(), names, x, residual)
    eager = _gradients(module, names, x, residual)
    assert exported.keys() == eager.keys()
    for key in eager:  # the same kernels on the same inputs: bit for bit
        assert torch.equal(exported[key], eager[key]), key


def test_exported_graph_keeps_the_backend_name_as_given():
    x, residual = _inputs()
    default = torch.export.export(_Block(rms=False), (x, residual))
    assert [n.args[-1] for n in _fusednorm_nodes(default)] == ["auto", "auto"]
    explicit = torch.export.export(_Block(rms=False, backend="torch"), (x, residual))
    assert [n.args[-1] for n in _fusednorm_nodes(explicit)] == ["torch", "torch"]


def test_exported_program_resolves_auto_when_it_runs(monkeypatch):
    """The op, not the trace, turns "auto" into a backend: each run asks for the tensors' device."""
    x, residual = _inputs()
    program = torch.export.export(_Block(rms=True), (x, residual)).module()
    asked = []
    real = backends.resolve

    def spy(name, device):
        asked.append((name, device.type))
        return real(name, device)

    monkeypatch.setattr(backends, "resolve", spy)
    program(x.clone().requires_grad_(True), residual).sum().backward()
    assert asked and set(asked) == {("auto", "cpu")}  # forward and backward ops, none baked in


def test_double_backward_says_it_is_not_supported():
    """Eager: fusednorm's own message (it used to be autograd's "use register_autograd", or a silently partial
    derivative through the torch backend's ops); compiled: AOTAutograd's own, as clear."""
    x = torch.randn(4, N, dtype=torch.float64, requires_grad=True)
    w = torch.ones(N, dtype=torch.float64, requires_grad=True)
    eager, compiled = (lambda t: fusednorm.layer_norm(t, w)), torch.compile(lambda t: fusednorm.layer_norm(t, w))
    for fn, message in ((eager, "fusednorm does not support double backward"),
                        (compiled, "does not currently support double backward")):
        (dx,) = torch.autograd.grad((fn(x) ** 2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match=message):
            dx.sum().backward()
