"""Tensor and sequence parallelism (DTensor) with fusednorm, on two gloo ranks.

- Sequence-parallel Add*Norms (fusednorm.distributed.SequenceParallel, x and residual Shard(1)): y, h and
  the gradients of x and the residual equal the single-process run on the whole batch bit for bit (a
  row's results do not depend on the rows around it); the gradients of weight, bias and residual_scale are
  all-reduced Replicate DTensors equal to the single-process ones to float32 reduction-order tolerance.
  The forward moves nothing, the backward only all-reduces the parameter gradients (CommDebugMode).
- README's tensor-parallel recipe, executed from README.md as written: its two-block Pre-LN model with
  ColwiseParallel/RowwiseParallel linears and SequenceParallel norms trains one AdamW step to the
  parameters of one process.
  These two on every available backend (torch, and triton interpreted); the next ones, DTensor plumbing
  that is the same for every backend, on the torch backend:
- Plain DTensor calls (sharded on the batch, or unevenly on the sequence) and torch's own SequenceParallel
  on a one-input norm: the same results, the parameter gradients Partial until reduced.
- Shardings that would need the activations gathered are refused with fusednorm's message.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from _gloo import run_on_ranks

import fusednorm

BACKENDS = fusednorm.available_backends("cpu")
WORLD = 2
B, T, N = 3, 4, 16
# float32 column sums of the parameter gradients, summed per rank then all-reduced: a few ulp apart.
RTOL, ATOL = 1e-5, 1e-6
README = Path(__file__).resolve().parents[1] / "README.md"

# Add*Norm variants: what the forward saves differs (h; h and residual; x and residual), and so does
# which gradients exist (bias, a vector or 0-d learned scale, a float32 residual stream with bf16 x).
CASES = {
    "add_layer_norm[vector,prenorm]": (fusednorm.AddLayerNorm, dict(residual_scale="vector", prenorm=True),
                                       torch.float32),
    "add_rms_norm[scalar]": (fusednorm.AddRMSNorm, dict(residual_scale="scalar"), torch.float32),
    "add_layer_norm[post-ln]": (fusednorm.AddLayerNorm, {}, torch.float32),
    "add_rms_norm[prenorm,bf16,residual_in_fp32]": (fusednorm.AddRMSNorm, dict(prenorm=True, residual_in_fp32=True),
                                                    torch.bfloat16),
}


def _module(cls, kwargs):
    gen = torch.Generator().manual_seed(1)
    module = cls(N, **kwargs)
    with torch.no_grad():  # away from the ones/zeros init, identical on every rank
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return module


def _inputs(dtype, seed=2, batch=B, seq=T):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, N, generator=gen).to(dtype)
    residual = torch.randn(batch, seq, N, generator=gen)
    return x, residual  # float32: also a float32 residual stream beside bf16 x


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _single_process(module, x, residual, grad_seed=3):
    """Outputs, output gradients (random, fixed) and every gradient on the whole batch in one process."""
    module = copy.deepcopy(module)
    x, residual = x.clone().requires_grad_(), residual.clone().requires_grad_()
    outs = _outputs(module(x, residual))
    gen = torch.Generator().manual_seed(grad_seed)
    douts = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, douts)
    grads = {"x": x.grad, "residual": residual.grad} | {k: p.grad for k, p in module.named_parameters()}
    return [o.detach() for o in outs], douts, grads


def _equal(actual, expected, what):
    assert torch.equal(actual, expected), f"{what}: max |diff| {(actual.double() - expected.double()).abs().max()}"


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _check_sequence_parallel(rank, mesh, label, module, x, residual):
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import parallelize_module

    from fusednorm.distributed import SequenceParallel

    ref_outs, douts, ref_grads = _single_process(module, x, residual)
    rows = slice(rank * T // WORLD, (rank + 1) * T // WORLD)  # this rank's part of the sequence
    sp = parallelize_module(copy.deepcopy(module), mesh, SequenceParallel())
    x_local = x[:, rows].clone().requires_grad_()
    residual_local = residual[:, rows].clone().requires_grad_()
    with CommDebugMode() as forward_comms:
        outs = _outputs(sp(x_local, residual=residual_local))  # by keyword: the style shards it too
    assert forward_comms.get_total_counts() == 0, f"{label}: forward communicated {forward_comms.get_comm_counts()}"
    for i, (out, ref) in enumerate(zip(outs, ref_outs, strict=True)):
        assert isinstance(out, DTensor) and out.placements == (Shard(1),), f"{label}: output {i} is {out!r:.80}"
        _equal(out.to_local(), ref[:, rows], f"{label} output {i}")
    with CommDebugMode() as backward_comms:
        torch.autograd.backward([o.to_local() for o in outs], [d[:, rows] for d in douts])
    counts = {str(op): n for op, n in backward_comms.get_comm_counts().items()}
    n_params = len(list(sp.parameters()))
    assert counts == {"c10d_functional.all_reduce": n_params}, f"{label}: backward communicated {counts}"
    _equal(x_local.grad, ref_grads["x"][:, rows], f"{label} dx")
    _equal(residual_local.grad, ref_grads["residual"][:, rows], f"{label} dresidual")
    for name, p in sp.named_parameters():
        assert p.grad.placements == (Replicate(),), f"{label}: d{name} is {p.grad.placements}, not reduced"
        _close(p.grad.to_local(), ref_grads[name], f"{label} d{name}")


def _check_plain_dtensors(mesh, label, module, x, residual, placement):
    """DTensor inputs in ``placement``, parameters made Replicate DTensors, no ParallelStyle."""
    from torch.distributed.tensor import Partial, distribute_module, distribute_tensor

    ref_outs, douts, ref_grads = _single_process(module, x, residual)
    module = distribute_module(copy.deepcopy(module), mesh)
    x_dt = distribute_tensor(x, mesh, [placement]).requires_grad_()
    residual_dt = distribute_tensor(residual, mesh, [placement]).requires_grad_()
    outs = _outputs(module(x_dt, residual_dt))
    for i, (out, ref) in enumerate(zip(outs, ref_outs, strict=True)):
        assert out.placements == (placement,), f"{label}: output {i} placements {out.placements}"
        _equal(out.full_tensor(), ref, f"{label} output {i}")
    torch.autograd.backward(list(outs), [distribute_tensor(d, mesh, [placement]) for d in douts])
    _equal(x_dt.grad.full_tensor(), ref_grads["x"], f"{label} dx")
    _equal(residual_dt.grad.full_tensor(), ref_grads["residual"], f"{label} dresidual")
    for name, p in module.named_parameters():
        assert p.grad.placements == (Partial("sum"),), f"{label}: d{name} is {p.grad.placements}"
        _close(p.grad.full_tensor(), ref_grads[name], f"{label} d{name}")


def _check_torch_sequence_parallel(rank, mesh, label):
    """torch's own SequenceParallel on a one-input norm: gradients Partial, equal once reduced."""
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    norm = _module(fusednorm.LayerNorm, {})
    x, _ = _inputs(torch.float32)
    ref_x = x.clone().requires_grad_()
    ref_y = norm(ref_x)
    ref_y.square().sum().backward()
    rows = slice(rank * T // WORLD, (rank + 1) * T // WORLD)
    sp = parallelize_module(copy.deepcopy(norm), mesh, SequenceParallel(use_local_output=True))
    x_local = x[:, rows].clone().requires_grad_()
    y = sp(x_local)
    _equal(y, ref_y.detach()[:, rows], f"{label} y")
    y.square().sum().backward()
    _equal(x_local.grad, ref_x.grad[:, rows], f"{label} dx")
    for name, p in sp.named_parameters():
        _close(p.grad.full_tensor(), getattr(norm, name).grad, f"{label} d{name}")


def _check_h_only(mesh, label):
    """Pre-LN with only h used downstream: the backward's zero dy must be a DTensor in h's placement."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    x = DTensor.from_local(torch.randn(B, T // WORLD, N), mesh, [Shard(1)]).requires_grad_()
    weight = DTensor.from_local(torch.rand(N), mesh, [Replicate()]).requires_grad_()
    _, h = fusednorm.add_rms_norm(x, x.detach(), weight, prenorm=True)
    h.to_local().sum().backward()
    _equal(x.grad.to_local(), torch.ones(B, T // WORLD, N), f"{label} dx")  # dx = dh: y gets no gradient
    assert weight.grad is None, f"{label} dweight: weight takes no part in h (no gradient, as in eager)"


def _check_refusals(mesh):
    """Shardings that would need the activations gathered (or a mask per rank) are refused, clearly."""
    import pytest
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    weight = DTensor.from_local(torch.ones(N), mesh, [Replicate()])
    local = torch.randn(B, T // WORLD, N)
    seq = DTensor.from_local(local, mesh, [Shard(1)])
    cases = {
        "normalized": lambda: fusednorm.layer_norm(DTensor.from_local(torch.randn(B, T, N // WORLD), mesh, [Shard(2)]),
                                                   weight),
        "Partial": lambda: fusednorm.rms_norm(DTensor.from_local(torch.randn(B, T, N), mesh, [Partial()]), weight),
        "residual has placements": lambda: fusednorm.add_layer_norm(
            DTensor.from_local(torch.randn(B, T, N), mesh, [Replicate()]), seq, weight),
        "dropout": lambda: fusednorm.add_rms_norm(seq, seq, weight, dropout_p=0.1),
    }
    for match, call in cases.items():
        with pytest.raises(RuntimeError, match=match) as info:
            call()
        assert isinstance(info.value.__cause__, ValueError), f"{match}: {info.value!r}"


# ---- README's recipe: TP + SP on a two-block Pre-LN model -----------------------------------------------

def readme_recipe() -> str:
    """The first python block of README's tensor-parallel section, as written there."""
    section = README.read_text().split("## Tensor and sequence parallelism", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def _check_recipe(mesh, recipe, label):
    """README's model trains one AdamW step under its TP + SP plan to the parameters of one process."""
    from torch.distributed.tensor import DTensor, Replicate

    gen = torch.Generator().manual_seed(4)
    tokens, target = torch.randn(4, 8, 8, generator=gen), torch.randn(4, 8, 4, generator=gen)
    models = []
    for parallel in (False, True):
        torch.manual_seed(0)
        model = recipe["Model"]()
        if parallel:
            model = recipe["parallelize"](model, mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = recipe["train_step"](model, optimizer, tokens, target)
        models.append((model, loss))
    (ref, ref_loss), (tp, tp_loss) = models
    _close(tp_loss.detach(), ref_loss.detach(), f"{label} loss")
    ref_params = dict(ref.named_parameters())
    for name, p in tp.named_parameters():
        assert isinstance(p, DTensor), f"{label}: {name} is not a DTensor"
        if "norm" in name:  # reduced by SequenceParallel's hook, not left Partial
            assert p.grad.placements == (Replicate(),), f"{label}: d{name} is {p.grad.placements}"
        _close(p.grad.full_tensor(), ref_params[name].grad, f"{label} d{name}")
        _close(p.detach().full_tensor(), ref_params[name].detach(), f"{label} {name} after one AdamW step")
    assert not torch.equal(ref_params["layers.0.norm.weight"].detach(), torch.ones(16)), "the step changed nothing"


def _all_checks(rank: int, backends: list[str]) -> None:
    """One start of the processes for every check and backend: starting them is the slow part. The
    sequence-parallel Add*Norms and the recipe run on every backend; the other checks exercise only
    the DTensor plumbing, which is the same for every backend, so they run on the torch backend alone
    (each interpreted Triton launch costs ~0.1 s)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from fusednorm import cpu_path

    # DTensor calls run the ops, the torch backend itself: so does the single-process reference here (eager CPU
    # calls would otherwise take fusednorm.cpu_path, ATen's ops, equal within section 6 but not bit for bit).
    cpu_path._enabled = False
    mesh = init_device_mesh("cpu", (WORLD,))
    code = compile(readme_recipe(), str(README), "exec")
    os.environ["WORLD_SIZE"] = str(WORLD)  # what torchrun sets
    exec(code, {"__name__": "__main__"})  # the script as a user runs it: one step, prints the loss
    recipe = {"__name__": "readme_recipe"}
    exec(code, recipe)
    for backend in backends:
        fusednorm.set_backend(backend)
        for name, (cls, kwargs, dtype) in CASES.items():
            module, (x, residual) = _module(cls, kwargs), _inputs(dtype)
            _check_sequence_parallel(rank, mesh, f"[{backend}] {name} SequenceParallel", module, x, residual)
        _check_recipe(mesh, recipe, f"[{backend}] README recipe")
    fusednorm.set_backend("torch")
    # Plain DTensor calls: the batch (4 on 2 ranks), and the sequence unevenly (5 on 2 ranks).
    for name, placement in (("add_layer_norm[vector,prenorm]", Shard(0)), ("add_rms_norm[scalar]", Shard(1))):
        cls, kwargs, dtype = CASES[name]
        _check_plain_dtensors(mesh, f"{name} {placement}", _module(cls, kwargs), *_inputs(dtype, batch=4, seq=5),
                              placement)
    _check_torch_sequence_parallel(rank, mesh, "layer_norm torch SequenceParallel")
    _check_h_only(mesh, "add_rms_norm[prenorm] h only")
    _check_refusals(mesh)


def test_tensor_and_sequence_parallel_equal_single_process(tmp_path):
    """Two gloo ranks, one start (the failure message names the case and backend): sequence-parallel and
    plain-DTensor Add*Norms, refused shardings, and README's TP + SP recipe (run from README.md)."""
    run_on_ranks(_all_checks, (BACKENDS,), tmp_path, world=WORLD)
