"""Parameters in any floating dtype (DESIGN section 4): weight, bias and a residual_scale tensor may have
a dtype other than x's and float32 (bf16 weights with fp16 x, fp16 with bf16 x, 16-bit weights with float32
x as FSDP mixed precision hands them, float32 or 16-bit weights with float64 x, float64 weights with
narrower x). The backends compute with them in float32 (float64 for float64 x) and return each gradient in
its parameter's own dtype.

Every backend this machine runs: torch, triton (interpreted without a GPU, on the GPU with one), the CUDA
kernels (emulated on the CPU through tests/_cuda_emulation.py, which runs the real backend's host step that
converts such parameters; compiled, on a GPU). Values: DESIGN section 6 (``testing.compare``), with one
addition that follows from the contract: a parameter gradient is rounded to its parameter's dtype, so
PyTorch's own gradient is rounded to it as well before its error is measured, and a parameter dtype
narrower than x's brings its own atol.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
from _backend_targets import TARGETS, target_fixture  # tests/ is on sys.path (pytest's rootdir import)

import fusednorm
from fusednorm import cpu_path, ops
from fusednorm.testing import (
    ATOL,
    Case,
    assert_section6,
    compare,
    make_inputs,
    reference_outputs,
    run_fused,
    torch_outputs,
)

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
PARAMS = ("weight", "bias", "residual_scale")
OPS = {"fwd": torch.ops.fusednorm.fwd.default, "bwd": torch.ops.fusednorm.bwd.default}

# (x dtype, parameter dtype): all but (float64, float32) were rejected before; the cuda kernels read only x's
# dtype and float32, so the cuda backend converts the others (and (float64, float32) is its control).
MIXED = ((F16, BF16), (BF16, F16), (F32, BF16), (F32, F16), (F64, F32), (F64, BF16), (F16, F64), (F32, F64))
# Every parameter kind: weight + bias (LayerNorm), a (N,) learned scale with the Pre-LN h, a 0-d one (RMSNorm).
VARIANTS = ("layer_norm", "add_layer_norm[vector,prenorm]", "add_rms_norm[scalar]")


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch) -> tuple[str, str]:
    return target_fixture(request, monkeypatch)


def check_mixed(case: Case, backend: str, device: str) -> None:
    """Section 6 for every output and gradient of ``case`` (no dropout), and each parameter gradient in its
    parameter's dtype."""
    inputs = make_inputs(case, device, torch.Generator().manual_seed(zlib.crc32(case.name().encode())))
    fused = run_fused(case, inputs, backend)
    for name in PARAMS:
        if isinstance(inputs.get(name), torch.Tensor):
            assert fused["d" + name].dtype == inputs[name].dtype, (case.name(), name, fused["d" + name].dtype)
    magnitude: dict = {}
    reference = reference_outputs(case, inputs, None, magnitude)
    own = torch_outputs(case, inputs, None)
    results = []
    for k in reference:
        own_k, extra = own[k], 0.0
        if k.removeprefix("d") in PARAMS:
            pdt = inputs[k.removeprefix("d")].dtype
            own_k = own_k.to(pdt)
            if torch.finfo(pdt).eps > torch.finfo(case.dtype).eps:
                extra = ATOL[pdt]
        results.append(compare(case, k, fused.get(k), reference[k], own_k, extra, magnitude.get(k)))
    assert_section6(results)


@pytest.mark.parametrize(("x_dtype", "param_dtype"), MIXED, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("variant", VARIANTS)
def test_any_parameter_dtype(target, variant, x_dtype, param_dtype):
    backend, device = target
    check_mixed(Case(variant, (5, 37), x_dtype, param_dtype), backend, device)


def test_each_parameter_its_own_dtype(target):
    """weight, bias and the scale in three different dtypes, none of them x's: each gradient in its own."""
    backend, device = target
    x, r = torch.randn(2, 3, 8, device=device, dtype=F16), torch.randn(2, 3, 8, device=device, dtype=F16)
    w = torch.rand(8, device=device, dtype=BF16).add_(0.5).requires_grad_()
    b = torch.randn(8, device=device, dtype=F64).requires_grad_()
    s = torch.rand(8, device=device, dtype=F32).add_(0.5).requires_grad_()
    y = fusednorm.add_layer_norm(x, r, w, b, residual_scale=s, backend=backend)
    y.float().square().sum().backward()
    assert y.dtype == F16
    assert (w.grad.dtype, b.grad.dtype, s.grad.dtype) == (BF16, F64, F32)
    # The same call with every parameter upcast to float32 first (exact): the same y, the same gradients
    # rounded to each parameter's dtype.
    w32, b32, s32 = (p.detach().float().requires_grad_() for p in (w, b, s))
    y32 = fusednorm.add_layer_norm(x, r, w32, b32, residual_scale=s32, backend=backend)
    y32.float().square().sum().backward()
    assert torch.equal(y, y32)
    for p, p32 in ((w, w32), (b, b32), (s, s32)):
        assert torch.equal(p.grad, p32.grad.to(p.dtype)), p.dtype


@pytest.mark.parametrize(("make", "message"), [
    (lambda x: dict(weight=torch.ones(8, dtype=torch.int32)), "weight must be a float16, bfloat16, float32 or float64"),
    (lambda x: dict(bias=torch.ones(8, dtype=torch.bool)), "bias must be a float16, bfloat16, float32 or float64"),
    (lambda x: dict(residual_scale=torch.ones(8, dtype=torch.complex64)),
     "residual_scale must be a float16, bfloat16, float32 or float64"),
])
def test_non_floating_parameters_are_rejected(make, message):
    x = torch.randn(2, 8)
    kwargs = dict(weight=torch.ones(8), bias=None) | make(x)
    with pytest.raises(TypeError, match=message):
        fusednorm.add_layer_norm(x, torch.randn(2, 8), kwargs.pop("weight"), kwargs.pop("bias"), **kwargs,
                                 backend="torch")


def test_opcheck_with_parameters_of_other_dtypes(target, monkeypatch):
    """The op layer's fake functions give each parameter gradient its parameter's dtype, as the backends do
    (torch.library.opcheck on the arguments a public call passes: fp16 x, bf16 weight/bias/scale)."""
    backend, device = target
    if device != "cpu":
        pytest.skip("the recorded CPU arguments")
    if backend == "torch" and cpu_path.enabled():
        pytest.skip("the CPU path (fusednorm.cpu_path) calls ATen's ops, not fusednorm's")
    recorded = {}

    def recording(name, real):
        def record(variant, args, backend_name, *impl):  # forward's impl: the plan's backend module, if any
            values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
            values |= {"variant": variant.flags, "backend": backend_name}
            op = OPS[name]
            recorded[name] = tuple(values[a.name].detach() if isinstance(values[a.name], torch.Tensor)
                                   else values[a.name] for a in op._schema.arguments)
            return real(variant, args, backend_name, *impl)
        return record

    case = Case("add_layer_norm[vector,prenorm]", (5, 12), F16, BF16)
    with monkeypatch.context() as patch:
        patch.setattr(ops, "forward", recording("fwd", ops.forward))
        patch.setattr(ops, "backward", recording("bwd", ops.backward))
        run_fused(case, make_inputs(case, generator=torch.Generator().manual_seed(0)), backend)
    for name, args in recorded.items():
        result = torch.library.opcheck(OPS[name], args)
        assert all(v == "SUCCESS" for v in result.values()), (name, result)
    assert {recorded["bwd"][5].dtype, recorded["bwd"][6].dtype} == {BF16}  # weight and scale reach bwd as bf16
