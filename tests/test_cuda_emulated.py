"""The CUDA kernels of csrc/ run on the CPU: their templates compiled as host C++ together with the
host code the GPU path runs (csrc/host.h), through tests/_cuda_emulation.py, and checked through the
public API against the float64 oracle (DESIGN section 6, fusednorm.testing.check_case), plus
bit-identical gradients and weight_offset.

This is how CI without a GPU checks the kernels' logic: indexing, the 128-bit and scalar-tail paths,
chunked wide rows, the row reductions, the backward's column partials and their fixed-order sum,
dropout regenerated in the backward, store_h statistics; and the host side: the flag word decoded,
the parameter structs filled, the alignment test, the launch block. It does not check what only the
device compiler and hardware decide (register allocation, FMA contraction, the occupancy-derived
grid); tests/test_cuda_gpu.py does, on a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _cuda_emulation import install_as_cuda

import fusednorm
from fusednorm.testing import RESIDUAL_KINDS, Case, check_case


@pytest.fixture
def as_cuda_backend(monkeypatch):
    """backend="cuda" runs the emulated kernels on CPU tensors for the duration of a test."""
    return install_as_cuda(monkeypatch)


def _assert_section6(case: Case, seed: int) -> None:
    results = check_case(case, "cuda", device="cpu", seed=seed)
    failures = [f"{r.output}: err {r.error:.3g} > bound {r.bound:.3g} (torch {r.torch_error:.3g})"
                f"{'' if r.nonfinite_match else ' NaN/Inf mismatch'}" for r in results if not r.ok]
    assert not failures, failures


ADD_OPS = ("add_layer_norm", "add_rms_norm")
LAYOUTS = ((False, False), (True, False), (True, True))  # (prenorm, residual_in_fp32)


def _cases():
    # Every add op x residual kind x layout, in fp32 at an odd width (scalar path) and in bf16 with
    # fp32 params at a vectorized width spanning two warps.
    for op, kind, (prenorm, res32) in itertools.product(ADD_OPS, RESIDUAL_KINDS, LAYOUTS):
        yield Case(op, (5, 37), torch.float32, None, kind, prenorm, res32)
        yield Case(op, (5, 1024), torch.bfloat16, torch.float32, kind, prenorm, res32)
    # Plain norms, every dtype, with and without params, N = 1 and a two-warp width.
    for op, (dtype, pdt) in itertools.product(("layer_norm", "rms_norm"), ((torch.float16, None),
                                                                          (torch.bfloat16, torch.float32),
                                                                          (torch.float32, None),
                                                                          (torch.float64, None))):
        yield Case(op, (3, 1), dtype, pdt)
        yield Case(op, (9, 200), dtype, pdt, has_weight=False, has_bias=False)
    # Rows wider than the registers: chunked forward and backward (fp16: > 16384 / > 8192 columns,
    # fp32: > 8192), dropout regenerated in every pass.
    yield Case("layer_norm", (2, 16400), torch.float16)
    yield Case("rms_norm", (2, 9000), torch.float32)
    yield Case("add_layer_norm", (2, 9000), torch.bfloat16, None, "vector", True, False, dropout_p=0.25)
    # Dropout in registers, Post-LN and Pre-LN with a learned vector scale.
    for op in ADD_OPS:
        yield Case(op, (3, 37), torch.float32, None, "plain", False, False, dropout_p=0.25)
        yield Case(op, (3, 300), torch.bfloat16, None, "vector", True, False, dropout_p=0.25)
    # Many rows: several row groups per block, blocks looping over rows, several partial rows.
    yield Case("add_layer_norm", (300, 64), torch.float16, None, "scalar", False, False)
    yield Case("add_rms_norm", (700, 40), torch.float32, None, "vector", True, True)  # > 128 blocks of rows


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=[c.name() for c in CASES])
def test_emulated_cuda_kernels_match_float64_reference(case, as_cuda_backend):
    _assert_section6(case, seed=CASES.index(case))


def test_emulated_gradients_bit_identical_and_strided_input(as_cuda_backend):
    def run():
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(40, 130, generator=gen) + 2
        x = base[:, 1:129].clone().requires_grad_(True)  # contiguous rows of 128: the 128-bit path
        strided = base[:, 1:129]  # rows 130 apart, unaligned start: the scalar path
        residual = torch.randn(40, 128, generator=gen, requires_grad=True)
        weight = torch.randn(128, generator=gen, requires_grad=True)
        bias = torch.randn(128, generator=gen, requires_grad=True)
        scale = torch.rand((), generator=gen).requires_grad_(True)
        torch.manual_seed(5)
        y = fusednorm.add_layer_norm(x, residual, weight, bias, residual_scale=scale, dropout_p=0.1, backend="cuda")
        y.backward(torch.randn(40, 128, generator=gen))
        torch.manual_seed(5)
        y_strided = fusednorm.add_layer_norm(strided, residual.detach(), weight.detach(), bias.detach(),
                                             residual_scale=scale.detach(), dropout_p=0.1, backend="cuda")
        return [y.detach(), y_strided, x.grad, residual.grad, weight.grad, bias.grad, scale.grad]

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first[0], first[1]), "vectorized and scalar paths give the same bits"


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_emulated_nonfinite_value_at_a_dropped_position_poisons_its_row(op, as_cuda_backend):
    import test_reliability  # the same check as for the other backends (a module attribute: not collected)

    test_reliability.test_nonfinite_value_at_a_dropped_position_still_poisons_its_row("cuda", op, float("nan"))


def _norm_float64(op: str, x, weight, bias, weight_offset: float, eps: float):
    """A tiny float64 reference: y = Norm(x) * (weight + weight_offset) + bias."""
    if op == "rms_norm":
        xhat = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    else:
        centered = x - x.mean(-1, keepdim=True)
        xhat = centered * torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    y = xhat * (weight + weight_offset)
    return y + bias if bias is not None else y


@pytest.mark.parametrize("op, shape, dtype, param_dtype, weight_offset", [
    ("layer_norm", (5, 37), torch.float32, torch.float32, 1.0),  # scalar tail path, Gemma's (1 + w)
    ("rms_norm", (4, 1024), torch.bfloat16, torch.float32, -0.75),  # 128-bit path, float32 weight
])
def test_emulated_weight_offset_matches_float64_reference(op, shape, dtype, param_dtype, weight_offset,
                                                          as_cuda_backend):
    """The affine weight is (weight + weight_offset) in y and in g = dy * (weight + weight_offset) (so in
    dx); dweight stays sum(dy * xhat). Section-6 bounds against a float64 reference, with torch's own
    error measured on F.layer_norm / F.rms_norm given the offset weight in the input dtype. The weights
    are small (Gemma's zero-centred w), so a kernel that drops the offset is off by ~|offset| in y."""
    from fusednorm.testing import compare

    gen = torch.Generator().manual_seed(11)
    m, n = shape
    eps = 1e-5
    inputs = dict(x=(torch.randn(m, n, generator=gen) + 2).to(dtype),
                  weight=(0.2 * torch.randn(n, generator=gen)).to(param_dtype))
    if op == "layer_norm":
        inputs["bias"] = (0.2 * torch.randn(n, generator=gen)).to(param_dtype)
    dy = torch.randn(m, n, generator=gen).to(dtype)

    def run(kind):
        leaves = {k: v.detach().to(torch.float64 if kind == "reference" else v.dtype).requires_grad_(True)
                  for k, v in inputs.items()}
        x, weight, bias = leaves["x"], leaves["weight"], leaves.get("bias")
        if kind == "fused":
            fn = getattr(fusednorm, op)
            y = fn(x, weight, bias, eps, weight_offset=weight_offset, backend="cuda") if bias is not None \
                else fn(x, weight, eps, weight_offset=weight_offset, backend="cuda")
        elif kind == "reference":
            y = _norm_float64(op, x, weight, bias, weight_offset, eps)
        else:  # torch's own, in the input dtype
            w = (weight + weight_offset).to(dtype)
            y = torch.nn.functional.rms_norm(x, (n,), w, eps) if op == "rms_norm" else \
                torch.nn.functional.layer_norm(x, (n,), w, bias.to(dtype), eps)
        y.backward(dy.to(y.dtype))
        return dict(y=y.detach(), **{"d" + k: v.grad for k, v in leaves.items()})

    fused, reference, own = run("fused"), run("reference"), run("torch_own")
    case = Case(op, shape, dtype, param_dtype)
    results = [compare(case, k, fused[k], reference[k], own[k]) for k in reference]
    failures = [f"{r.output}: err {r.error:.3g} > bound {r.bound:.3g}" for r in results if not r.ok]
    assert not failures, failures
    # The control: without the offset, y would be far outside the bound.
    bias64 = inputs["bias"].double() if "bias" in inputs else None
    without_offset = _norm_float64(op, inputs["x"].double(), inputs["weight"].double(), bias64, 0.0, eps)
    assert (without_offset - reference["y"]).abs().max() > 10 * max(r.bound for r in results if r.output == "y")
