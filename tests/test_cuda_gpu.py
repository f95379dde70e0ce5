"""The "cuda" backend (csrc/, built as fusednorm._C) on a GPU: every variant against the float64 oracle
(DESIGN section 6, fusednorm.testing.check_case), against the triton backend, gradcheck in float64,
bit-identical gradients, the dropout mask, chunked wide rows, unaligned/strided inputs, NaN rows, M = 0,
a tensor of more than 2^31 elements, weight_offset, and torch.library.opcheck of cuda_fwd / cuda_bwd.

All tests are marked ``gpu`` and skipped without CUDA or without the built extension.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

import fusednorm
from fusednorm.testing import GRADCHECK_CASES, RESIDUAL_KINDS, Case, check_case, gradcheck_op
from fusednorm.variant import ScaleKind, Variant

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("fusednorm._C") is None, reason="fusednorm._C is not built"),
]

DEVICE = "cuda"
ADD_OPS = ("add_layer_norm", "add_rms_norm")
LAYOUTS = ((False, False), (True, False), (True, True))  # (prenorm, residual_in_fp32)
DTYPES = ((torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.float16, torch.float32),
          (torch.bfloat16, torch.float32))


def _assert_section6(case: Case, seed: int = 0) -> None:
    results = check_case(case, "cuda", device=DEVICE, seed=seed)
    failures = [f"{r.output}: err {r.error:.3g} > bound {r.bound:.3g} (torch {r.torch_error:.3g})"
                f"{'' if r.nonfinite_match else ' NaN/Inf mismatch'}" for r in results if not r.ok]
    assert not failures, failures


def _cases():
    # Every add op x residual kind x layout x dtype, at an odd width (scalar tail, no 128-bit path)
    # and at a width that takes the 128-bit path with several warps per row.
    for op, kind, (prenorm, res32), (dtype, pdt), n in itertools.product(
            ADD_OPS, RESIDUAL_KINDS, LAYOUTS, DTYPES, (37, 1024)):
        yield Case(op, (5, n), dtype, pdt, kind, prenorm, res32)
    # Plain norms: widths from 1 to beyond the registers (chunked: 16-bit > 16384, fp32 > 8192 columns).
    for op, (dtype, pdt), n in itertools.product(("layer_norm", "rms_norm"), DTYPES,
                                                 (1, 8, 37, 1000, 4096, 8192, 12288, 65536)):
        yield Case(op, (3, n), dtype, pdt)
        if n in (37, 8192):
            yield Case(op, (3, n), dtype, pdt, has_weight=False, has_bias=False)
            yield Case(op, (3, n), dtype, pdt, has_weight=True, has_bias=False)
    # Dropout, in and beyond the registers.
    for op, kind, (prenorm, res32), dtype, n in itertools.product(
            ADD_OPS, ("plain", "float", "scalar", "vector"), LAYOUTS, (torch.float32, torch.bfloat16),
            (37, 2048, 20000)):
        yield Case(op, (4, n), dtype, None, kind, prenorm, res32, dropout_p=0.25)
    # N = 1 and wide rows for every residual kind.
    for op, kind, dtype, n in itertools.product(ADD_OPS, RESIDUAL_KINDS, (torch.float32, torch.bfloat16),
                                                (1, 65536)):
        yield Case(op, (3, n), dtype, None, kind, kind in ("plain", "vector"), False)
    # float64 (the gradcheck path) and many rows (several row groups per block, grid-stride loop).
    for op, kind in itertools.product(ADD_OPS, RESIDUAL_KINDS):
        yield Case(op, (6, 100), torch.float64, None, kind, kind == "vector", False)
        yield Case(op, (3000, 96), torch.bfloat16, None, kind, kind == "scalar", False)


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=[c.name() for c in CASES])
def test_cuda_matches_float64_reference(case):
    _assert_section6(case, seed=CASES.index(case))


def _run(backend: str, seed: int, shape=(64, 1000), dtype=torch.bfloat16, **options):
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    x = (torch.randn(m, n, generator=gen) + 2).to(DEVICE, dtype).requires_grad_(True)
    residual = torch.randn(m, n, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    weight = torch.randn(n, generator=gen).to(DEVICE, torch.float32).requires_grad_(True)
    bias = torch.randn(n, generator=gen).to(DEVICE, torch.float32).requires_grad_(True)
    scale = torch.rand(n, generator=gen).to(DEVICE, torch.float32).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
    torch.manual_seed(seed)
    y = fusednorm.add_layer_norm(x, residual, weight, bias, residual_scale=scale, backend=backend, **options)
    y.backward(dy)
    return [y.detach(), x.grad, residual.grad, weight.grad, bias.grad, scale.grad]


@pytest.mark.parametrize("shape", [(64, 1000), (4096, 1024), (17, 20000)], ids=["small", "many-rows", "chunked"])
def test_cuda_gradients_bit_identical_run_to_run(shape):
    first = _run("cuda", 7, shape, dropout_p=0.2)
    second = _run("cuda", 7, shape, dropout_p=0.2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 1000), (8, 8192), (5, 30000)])
def test_cuda_agrees_with_triton_backend(dtype, shape):
    pytest.importorskip("triton")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(_run("cuda", 11, shape, dtype, dropout_p=0.3), _run("triton", 11, shape, dtype, dropout_p=0.3),
                    strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_cuda_agrees_with_torch_backend_in_float32():
    for a, b in zip(_run("cuda", 5, dtype=torch.float32, dropout_p=0.1),
                    _run("torch", 5, dtype=torch.float32, dropout_p=0.1), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5), (3, 4100)], ids=["registers", "chunked"])
@pytest.mark.parametrize("op,options", GRADCHECK_CASES, ids=[f"{op}-{o}" for op, o in GRADCHECK_CASES])
def test_cuda_gradcheck_float64(op, options, shape):
    assert gradcheck_op(op, options, "cuda", shape=shape, device=DEVICE, fast_mode=True)


def test_cuda_dropout_mask_is_the_dropout_module_mask():
    """dx is exactly 0 where the mask drops x (and only there, for random dy), and the keep rate is 1 - p."""
    from fusednorm.dropout import dropout_keep_mask

    m, n, p = 16, 777, 0.4
    x = torch.randn(m, n, device=DEVICE, requires_grad=True)
    residual = torch.randn(m, n, device=DEVICE)
    torch.manual_seed(123)
    seed = fusednorm.dropout.draw_seed(DEVICE)
    torch.manual_seed(123)
    y = fusednorm.add_layer_norm(x, residual, None, None, dropout_p=p, backend="cuda")
    y.backward(torch.randn_like(y))
    keep = dropout_keep_mask(seed, m, n, p)
    assert torch.equal(x.grad != 0, keep)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.02


def test_cuda_strided_unaligned_and_nan_rows():
    base = torch.randn(6, 1030, device=DEVICE, dtype=torch.float16) + 3
    x = base[:, 3:1027]  # unit stride along N, rows 1030 apart, base misaligned: the scalar path
    residual = torch.randn(6, 1024, device=DEVICE, dtype=torch.float16)
    weight = torch.randn(1024, device=DEVICE)
    y = fusednorm.add_layer_norm(x, residual, weight, None, backend="cuda")
    ref = fusednorm.add_layer_norm(x.contiguous(), residual, weight, None, backend="torch")
    torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)
    poisoned = x.clone()
    poisoned[2, 5] = float("nan")
    y = fusednorm.add_layer_norm(poisoned, residual, weight, None, backend="cuda")
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3, 4, 5]]).any()


@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
def test_cuda_empty_input(op):
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    weight = torch.randn(64, device=DEVICE, requires_grad=True)
    if op == "layer_norm":
        y = fusednorm.layer_norm(x, weight, None, backend="cuda")
    else:
        y = fusednorm.add_rms_norm(x, torch.randn(0, 64, device=DEVICE), weight, backend="cuda")
    y.sum().backward()
    assert y.shape == (0, 64) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_cuda_more_than_2_to_the_31_elements():
    """64-bit offsets: the last rows of a (2^31 + 8 * 8192)-element input are normalized correctly."""
    n = 8192
    m = 2**31 // n + 8
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~12 GiB of GPU memory")
    x = torch.empty(m, n, device=DEVICE, dtype=torch.float16)
    x[:-4].fill_(1.0)
    tail = torch.randn(4, n, device=DEVICE, dtype=torch.float16)
    x[-4:] = tail
    y = fusednorm.layer_norm(x, None, None, backend="cuda")
    torch.testing.assert_close(y[-4:], torch.nn.functional.layer_norm(tail.float(), (n,)).half(),
                               rtol=2e-3, atol=2e-3)
    assert torch.equal(y[0], torch.zeros_like(y[0]))


@pytest.mark.parametrize("variant", [
    Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, residual_f32=True, has_bias=True),
    Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, prenorm=True, residual_f32=True, h_f32=True,
            has_dropout=True, has_bias=True),
    Variant(is_rms=True, has_residual=True, prenorm=True, h_f32=True),
], ids=lambda v: v.name)
def test_cuda_ops_pass_opcheck(variant):
    """Schema, fake functions and real kernels agree (torch.library.opcheck) for cuda_fwd and cuda_bwd."""
    from fusednorm.dropout import draw_seed

    m, n = 6, 520
    x = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    residual = torch.randn(m, n, device=DEVICE, dtype=variant.residual_dtype(torch.bfloat16))
    weight = torch.randn(n, device=DEVICE)
    bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16) if variant.has_bias else None
    scale = torch.rand(n, device=DEVICE) if variant.learned_scale else None
    seed = draw_seed(DEVICE) if variant.has_dropout else None
    dropout_p = 0.25 if variant.has_dropout else 0.0
    fwd_args = (x, residual, weight, bias, scale, seed, variant.flags, 1e-5, 1.0, dropout_p, 0.5)
    torch.library.opcheck(torch.ops.fusednorm.cuda_fwd.default, fwd_args)
    y, h, mean, rstd = torch.ops.fusednorm.cuda_fwd(*fwd_args)
    bwd_args = (torch.randn_like(y), torch.randn_like(h) if variant.prenorm else None,
                None if variant.store_h else x, residual, h if variant.store_h else None, weight, scale, mean, rstd,
                seed, variant.flags, 1.0, dropout_p, 0.5, bias.dtype if bias is not None else None)
    torch.library.opcheck(torch.ops.fusednorm.cuda_bwd.default, bwd_args)


@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
def test_cuda_weight_offset_agrees_with_torch_backend(op):
    """The affine weight is (weight + weight_offset) in y and in dx; dweight is sum(dy * xhat)."""
    def run(backend):
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(16, 777, generator=gen).to(DEVICE).requires_grad_(True)
        residual = torch.randn(16, 777, generator=gen).to(DEVICE).requires_grad_(True)
        weight = (0.1 * torch.randn(777, generator=gen)).to(DEVICE).requires_grad_(True)
        if op == "layer_norm":
            y = fusednorm.layer_norm(x, weight, None, weight_offset=1.0, backend=backend)
        else:
            y = fusednorm.add_rms_norm(x, residual, weight, weight_offset=1.0, backend=backend)
        y.backward(torch.randn(16, 777, generator=gen).to(DEVICE))
        return [y.detach(), x.grad, weight.grad] + ([residual.grad] if op != "layer_norm" else [])

    for a, b in zip(run("cuda"), run("torch"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cuda_backend_under_torch_compile_fullgraph():
    x = torch.randn(8, 1024, device=DEVICE, dtype=torch.float16, requires_grad=True)
    residual = torch.randn(8, 1024, device=DEVICE, dtype=torch.float16)
    weight = torch.randn(1024, device=DEVICE, requires_grad=True)

    def f(x, residual, weight):
        y, h = fusednorm.add_rms_norm(x, residual, weight, prenorm=True, residual_in_fp32=True, backend="cuda")
        return y.float().sum() + h.sum()

    compiled = torch.compile(f, fullgraph=True)
    expected = f(x, residual, weight)
    got = compiled(x, residual, weight)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert x.grad is not None and weight.grad is not None
