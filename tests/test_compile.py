"""torch.compile(fullgraph=True): every public function and module traces with zero graph breaks,
forward and backward, and the compiled result equals eager.

Why "equal" can be bit for bit: the custom ops are opaque to the compiler, so compiled and eager runs
call the very same backend kernels on the very same inputs; everything around them is views.

Dropout: the seed is drawn inside the graph (torch.randint on x's device). Two checks, both sound:
- with ``torch._inductor.config.fallback_random = True`` Inductor draws random numbers with torch's own
  generator, as eager does, so after the same ``torch.manual_seed`` compiled and eager draw the same
  seed and must agree bit for bit (outputs and every gradient);
- with Inductor's default random lowering the seed differs from eager's, so the compiled result is
  checked by structure: the mask is recovered from the returned h (h - residual * s is x / (1 - p) where
  kept and exactly 0 where dropped), y and every gradient must equal the float64 reference computed
  with that mask (DESIGN section 6), the keep rate must be ~1 - p, and a second call must draw a new
  mask. The backward regenerates the mask from the saved seed, so a forward/backward mismatch fails.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import fusednorm
from fusednorm import case_matrix, testing

# The op layer and the Function path of backend "torch" (on the CPU, eager calls otherwise take
# fusednorm.cpu_path, ATen's ops: tests/test_cpu_path.py).
pytestmark = pytest.mark.usefixtures("torch_function_path")

CPU_BACKENDS = fusednorm.available_backends("cpu")
# Compile in this process: Inductor's worker pool is of no use for these tiny graphs on 2 cores and
# its start-up dominates the compile time.
torch._inductor.config.compile_threads = 1
N = 16
SHAPE = (2, 3, N)  # leading dims are flattened by the functions: (6, 16) rows


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own functions: no recompile limits or cached guards leak across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------- functions

def _function_cases() -> list[testing.Case]:
    """The plain norms, and every residual scale kind in both layouts (each path of what the functional layer
    saves: h; x and the residual for a learned scale in the Post-LN layout; h and the residual in the Pre-LN
    one), default parameters, no dropout; then a covering set of all variants (every flag takes each value:
    dropout, no weight / bias, float32 residual / h); every other case with weight_offset=1. Compiling is
    ~1 s per case on 2 cores."""
    base = [v for v in testing.case_variants() if case_matrix.default_affine(v) and not v.has_dropout
            and not case_matrix.float32_flags(v) and (v.has_residual or not v.prenorm)]
    variants = base + [v for v in case_matrix.covering(testing.case_variants()) if v not in base]
    return [testing.Case(v, SHAPE, *((torch.bfloat16, torch.float32) if case_matrix.float32_flags(v) else ()),
                         eps=1e-6 if v.is_rms else 1e-5, weight_offset=float(v.has_weight and i % 2))
            for i, v in enumerate(variants)]


FUNCTION_CASES = _function_cases()
# Interpreted Triton runs every kernel in Python: a few cases that set every kernel flag between them.
_TRITON_CASES = [c for c in FUNCTION_CASES if c.variant in case_matrix.covering(c.variant for c in FUNCTION_CASES)]
BACKEND_CASES = [(c, b) for b in CPU_BACKENDS for c in FUNCTION_CASES
                 if b != "triton" or torch.cuda.is_available() or c in _TRITON_CASES]


def _call(case: testing.Case, backend: str):
    """The public function of ``case`` as a function of its tensor inputs (constants closed over)."""

    def fn(**tensors):
        return case.call(tensors, backend)

    return fn


def _tensor_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k not in ("dy", "dh")}


def _run(fn, inputs: dict, seed: int = 1234) -> dict:
    """Outputs and the gradients of every tensor input for loss = <y, dy> (+ <h, dh> with prenorm)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in _tensor_inputs(inputs).items()}
    torch.manual_seed(seed)
    out = fn(**leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = (outs[0].double() * inputs["dy"].double()).sum()
    if len(outs) == 2:
        loss = loss + (outs[1].double() * inputs["dh"].double()).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    result = {"y": outs[0].detach()}
    if len(outs) == 2:
        result["h"] = outs[1].detach()
    result.update({"d" + k: g for k, g in zip(leaves, grads, strict=True)})
    return result


def _assert_identical(compiled: dict, eager: dict, what: str) -> None:
    assert compiled.keys() == eager.keys(), what
    for k in eager:
        c, e = compiled[k], eager[k]
        assert (c.shape, c.dtype) == (e.shape, e.dtype), f"{what}: {k}"
        assert torch.equal(c, e), f"{what}: {k} differs by {(c.double() - e.double()).abs().max().item()}"


def _graph_breaks(fn, *args, **kwargs) -> tuple[int, int, list]:
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    return explanation.graph_count, explanation.graph_break_count, explanation.break_reasons


@pytest.mark.parametrize(("case", "backend"), BACKEND_CASES, ids=[f"{c.name()}-{b}" for c, b in BACKEND_CASES])
def test_function_compiles_without_graph_breaks_and_equals_eager(case, backend):
    fn = _call(case, backend)
    inputs = testing.make_inputs(case, generator=torch.Generator().manual_seed(0))
    leaves = {k: v.clone().requires_grad_(True) for k, v in _tensor_inputs(inputs).items()}
    graphs, breaks, reasons = _graph_breaks(fn, **leaves)
    assert (graphs, breaks) == (1, 0), reasons
    torch._dynamo.reset()

    eager = _run(fn, inputs)
    # fallback_random: the seed is drawn with torch's generator inside the graph, as in eager.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = _run(torch.compile(fn, fullgraph=True), inputs)
    _assert_identical(compiled, eager, case.name())


def test_dropout_under_inductor_random_is_checked_by_its_recovered_mask():
    """Inductor's own RNG draws a different seed than eager: check the result against its own mask."""
    p = 0.3
    case = testing.Case("add_layer_norm[vector,prenorm,dropout]", (64, N), dropout_p=p)
    inputs = testing.make_inputs(case, generator=torch.Generator().manual_seed(0))
    # |x| >= 0.5 everywhere, so that kept and dropped elements are told apart without doubt.
    inputs["x"] = inputs["x"].sign() * (inputs["x"].abs() + 0.5)
    fn = torch.compile(_call(case, "torch"), fullgraph=True)
    first = _run(fn, inputs, seed=1)
    second = _run(fn, inputs, seed=2)
    again = _run(fn, inputs, seed=1)
    _assert_identical(again, first, "manual_seed reproduces the compiled dropout")

    residual_part = inputs["residual"] * inputs["residual_scale"]
    masks = []
    for run in (first, second):
        branch = run["h"] - residual_part
        keep = branch.abs() > 0.5 * inputs["x"].abs() / (1 - p)
        assert torch.equal(branch[~keep], torch.zeros_like(branch[~keep])), "dropped elements must be exactly 0"
        masks.append(keep)
        reference = testing.reference_outputs(case, inputs, keep)
        torch_own = testing.torch_outputs(case, inputs, keep)
        testing.assert_section6(testing.compare(case, k, run[k], ref, torch_own[k]) for k, ref in reference.items())
    keep_rate = masks[0].float().mean().item()
    assert abs(keep_rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / masks[0].numel()), keep_rate
    assert not torch.equal(masks[0], masks[1]), "each call must draw a new seed"


def test_dynamic_shapes_compile_once():
    """The fake functions work with symbolic row counts: a second batch size does not recompile."""
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(_call(testing.Case("add_rms_norm[vector,prenorm]", SHAPE), "torch"),
                       fullgraph=True, dynamic=True, backend=counter)
    compiles = []
    for rows in (5, 9):
        x, r = torch.randn(rows, N, requires_grad=True), torch.randn(rows, N)
        w, s = torch.rand(N, requires_grad=True), torch.rand(N, requires_grad=True)
        y, h = fn(x=x, residual=r, weight=w, residual_scale=s)
        (y.sum() + h.sum()).backward()
        compiles.append(counter.frame_count)
        ref_y, ref_h = fusednorm.add_rms_norm(x, r, w, 1e-5, residual_scale=s, prenorm=True)
        assert torch.equal(y, ref_y) and torch.equal(h, ref_h)
    assert compiles[0] >= 1 and compiles[1] == compiles[0], compiles


def test_global_backend_choice_is_guarded():
    """fusednorm.set_backend after compiling recompiles (the resolved backend is baked into the graph)."""
    counter = CompileCounter()
    fn = torch.compile(lambda x: fusednorm.layer_norm(x), fullgraph=True, backend=counter)
    x = torch.randn(4, N)
    fusednorm.set_backend("auto")
    fn(x)
    fn(x)
    assert counter.frame_count == 1
    fusednorm.set_backend("torch")
    fn(x)
    assert counter.frame_count == 2


# ----------------------------------------------------------------------------------------- modules

@dataclasses.dataclass(frozen=True)
class ModuleCase:
    cls: str
    kwargs: tuple = ()
    training: bool = False
    residual_fp32: bool = False

    def build(self) -> torch.nn.Module:
        gen = torch.Generator().manual_seed(0)
        module = getattr(fusednorm, self.cls)(**({"normalized_shape": N} | dict(self.kwargs)))
        with torch.no_grad():
            for p in module.parameters():  # not the ones/zeros init: a wrong gradient must show
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        return module.train(self.training)

    def name(self) -> str:
        return f"{self.cls}({', '.join(f'{k}={v}' for k, v in self.kwargs)}){'-train' if self.training else ''}"


MODULE_CASES = [
    ModuleCase("LayerNorm"),
    ModuleCase("LayerNorm", (("normalized_shape", (2, N // 2)), ("bias", False))),
    ModuleCase("RMSNorm", (("eps", None),)),
    ModuleCase("AddLayerNorm", (("residual_scale", None), ("prenorm", True))),
    ModuleCase("AddLayerNorm", (("residual_scale", 0.5),)),
    ModuleCase("AddLayerNorm", (("residual_scale", "scalar"), ("prenorm", True), ("residual_in_fp32", True)),
               residual_fp32=True),
    ModuleCase("AddLayerNorm", (("residual_scale", "vector"), ("dropout_p", 0.2)), training=True),
    ModuleCase("AddRMSNorm", (("residual_scale", None),)),
    ModuleCase("AddRMSNorm", (("residual_scale", 0.5), ("prenorm", True), ("dropout_p", 0.2)), training=True),
    ModuleCase("AddRMSNorm", (("residual_scale", "scalar"),)),
    ModuleCase("AddRMSNorm", (("residual_scale", "vector"), ("prenorm", True), ("residual_in_fp32", True),
                              ("dropout_p", 0.2)), residual_fp32=True),
    ModuleCase("AddRMSNorm", (("residual_scale", "vector"), ("dropout_p", 0.2))),  # eval: dropout off
]


def _module_input_shape(module: torch.nn.Module) -> tuple[int, ...]:
    return SHAPE[:-1] + tuple(module.normalized_shape)


def _run_module(module: torch.nn.Module, case: ModuleCase, seed: int = 7) -> dict:
    base = getattr(module, "_orig_mod", module)  # a compiled module's parameter names carry a prefix
    shape = _module_input_shape(base)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) + 2.0).requires_grad_(True)
    args = [x]
    if case.cls.startswith("Add"):
        r = torch.randn(shape, generator=gen).to(torch.float32 if case.residual_fp32 else x.dtype)
        args.append(r.requires_grad_(True))
    torch.manual_seed(seed)
    out = module(*args)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    leaves = args + list(base.parameters())
    grads = torch.autograd.grad(loss, leaves)
    names = ["x", "residual"][:len(args)] + [n for n, _ in base.named_parameters()]
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    return result | {"d" + n: g for n, g in zip(names, grads, strict=True)}


@pytest.mark.parametrize("case", MODULE_CASES, ids=[c.name() for c in MODULE_CASES])
def test_module_compiles_without_graph_breaks_and_equals_eager(case):
    module = case.build()
    x = torch.randn(_module_input_shape(module))
    args = (x, torch.randn(x.shape)) if case.cls.startswith("Add") else (x,)
    graphs, breaks, reasons = _graph_breaks(module, *args)
    assert (graphs, breaks) == (1, 0), reasons
    torch._dynamo.reset()

    eager = _run_module(module, case)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = _run_module(torch.compile(module, fullgraph=True), case)
    _assert_identical(compiled, eager, case.name())


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton backend unavailable on the CPU")
def test_modules_compile_on_the_triton_backend():
    """The global backend choice reaches the modules' compiled graphs too."""
    fusednorm.set_backend("triton")
    for case in (MODULE_CASES[0], MODULE_CASES[6], MODULE_CASES[10]):
        torch._dynamo.reset()
        module = case.build()
        eager = _run_module(module, case)
        with torch._inductor.config.patch(fallback_random=True):
            compiled = _run_module(torch.compile(module, fullgraph=True), case)
        _assert_identical(compiled, eager, case.name())


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton backend unavailable on the CPU")
def test_backend_resolution_is_not_traced(monkeypatch):
    """The availability check runs at trace time, not inside the graph: a check that Dynamo cannot trace
    (the cuda backend's first check imports its compiled extension) must not break the graph."""
    import importlib

    def interpreted_after_an_import() -> bool:
        importlib.import_module("fusednorm.backends.contract")  # Dynamo refuses to trace import_module
        return True

    monkeypatch.setattr(fusednorm.backends, "_triton_interpreted", interpreted_after_an_import)
    x = torch.randn(4, N)
    fn = torch.compile(lambda t: fusednorm.layer_norm(t, backend="triton"), fullgraph=True)
    assert torch.equal(fn(x), fusednorm.layer_norm(x, backend="triton"))
