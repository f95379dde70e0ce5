"""The CPU eager path (fusednorm.cpu_path) and the compiled CPU dropout mask (fusednorm._philox_cpu).

Section 6 of the direct path over the variant matrix is the "cpu-path" target of tests/test_correctness.py
(and of tests/_backend_targets.py's files); here: which calls it takes and which it leaves to the autograd
Function, that its h is the torch backend's bit for bit, that it saves no dropout mask, double backward on each
path, and the compiled Philox mask bit for bit against the torch definition (fusednorm.dropout).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fusednorm
from fusednorm import case_matrix, cpu_path, dropout, ops
from fusednorm.dropout import dropout_keep_mask, keep_threshold, philox_r0
from fusednorm.testing import Case, assert_section6, case_variants, check_case
from fusednorm.variant import Variant

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
needs_compiled = pytest.mark.skipif(dropout._philox_cpu is None,
                                    reason="fusednorm._philox_cpu is not built (setup.py build_ext --inplace)")

# ---- the compiled mask -------------------------------------------------------------------------------------

SEEDS = [0, 12345, 2**62 - 1, (0x7EADBEEF << 32) | 0x12345678, -5]  # high words set; a negative int64 too
STARTS = [0, 2**32 - 100, 2**40 + 7]  # from 0, across 2^32 (the counter's high word), far beyond


@needs_compiled
@pytest.mark.parametrize("seed", SEEDS)
def test_compiled_mask_is_the_torch_definition_bit_for_bit(seed):
    seed_tensor = torch.tensor([seed])
    for start in STARTS:
        index = torch.arange(start, start + 777)
        words = torch.empty(777, dtype=torch.int32)
        dropout._philox_cpu.philox_words(seed, start, 777, words.data_ptr())
        assert torch.equal(words.to(torch.int64) & 0xFFFFFFFF, philox_r0(seed_tensor, index)), start
        for p in (0.1, 0.5, 0.9):
            keep = torch.empty(777, dtype=torch.bool)
            dropout._philox_cpu.keep_mask(seed, start, 777, keep_threshold(p), keep.data_ptr())
            assert torch.equal(keep, (philox_r0(seed_tensor, index) >> 8) >= keep_threshold(p)), (start, p)


@needs_compiled
def test_dropout_keep_mask_is_the_same_with_and_without_the_compiled_code(monkeypatch):
    seed = torch.tensor([(0x5EED << 40) | 99])
    compiled = dropout_keep_mask(seed, 37, 53, 0.25)
    monkeypatch.setattr(dropout, "_philox_cpu", None)
    assert torch.equal(compiled, dropout_keep_mask(seed, 37, 53, 0.25))
    assert abs(compiled.float().mean().item() - 0.75) < 0.03


# ---- which calls take the direct path ----------------------------------------------------------------------


def _usable(variant: Variant, x, residual=None, weight=None, bias=None, scale=None, backend="torch", offset=0.0):
    return cpu_path.usable(variant, backend, x, residual, weight, bias, scale, offset)


def test_usable_takes_plain_cpu_calls_and_leaves_the_rest_to_the_function():
    x, w = torch.randn(4, 8), torch.randn(8)
    ln, rms = Variant(), Variant(is_rms=True)
    assert _usable(ln, x, weight=w) and _usable(rms, x, weight=w) and _usable(ln, x.bfloat16(), weight=w)
    assert not _usable(ln, x.double(), weight=w.double())  # float64: ATen's LayerNorm backward, gradcheck
    assert not _usable(rms, x.double(), weight=w.double())
    assert not _usable(ln, torch.randn(4, 1), weight=torch.randn(1))  # N = 1: ATen's dweight cancels
    assert _usable(rms, torch.randn(4, 1), weight=torch.randn(1))
    assert not _usable(ln, x, weight=w, backend="triton")
    assert not _usable(Variant(store_stats=True), x, weight=w)  # telemetry
    assert not _usable(ln, x.to("meta"), weight=w.to("meta"))
    assert not _usable(ln, torch.randn(0, 8), weight=w)
    with cpu_path.disabled():
        assert not _usable(ln, x, weight=w)
    assert _usable(ln, x, weight=w)


def test_the_public_functions_record_atens_ops_on_the_cpu():
    x, r = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    assert type(fusednorm.layer_norm(x, w, b).grad_fn).__name__ == "NativeLayerNormBackward0"
    assert type(fusednorm.add_layer_norm(x, r, w, b).grad_fn).__name__ == "NativeLayerNormBackward0"
    with cpu_path.disabled():
        assert _takes_the_function(fusednorm.layer_norm(x, w, b))
    assert _takes_the_function(fusednorm.layer_norm(x.double(), w.double(), b.double()))


def _takes_the_function(y) -> bool:
    """y came from fusednorm.functional's autograd Function (not from ATen's ops)."""
    return isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)


def test_every_matrix_case_but_the_excluded_ones_is_taken():
    """The cpu-path target of test_correctness tests the direct path, not the Function, for what it covers."""
    taken = left = 0
    for v in case_variants():
        for dtype, n in ((F32, 7), (BF16, 7), (F16, 7), (F64, 7), (F32, 1)):
            if v.residual_f32 and dtype in (F32, F64) or v.h_f32 and dtype in (F32, F64):
                continue
            x = torch.randn(3, n).to(dtype)
            residual = torch.randn(3, n).to(F32 if v.residual_f32 else dtype) if v.has_residual else None
            scale = torch.randn(n) if v.learned_scale else (0.5 if v.scale_kind else None)
            expected = dtype != F64 and (n > 1 or v.is_rms) and not v.store_stats
            assert _usable(v, x, residual, torch.randn(n), None, scale) == expected, (v, dtype, n)
            taken, left = taken + expected, left + (not expected)
    assert taken > 2 * left


# ---- what it computes -----------------------------------------------------------------------------------------

CALLS = [
    ("add_layer_norm", dict(residual_scale=0.7071067811865476)),
    ("add_layer_norm", dict(residual_scale="vector")),
    ("add_layer_norm", dict(residual_scale="scalar", prenorm=True)),
    ("add_layer_norm", dict(dropout_p=0.1)),
    ("add_rms_norm", dict(dropout_p=0.3, residual_scale=0.5, prenorm=True)),
    ("add_rms_norm", dict(prenorm=True, residual_in_fp32=True, dropout_p=0.2)),
    ("add_rms_norm", dict(prenorm=True, weight_offset=1.0)),
    ("add_layer_norm", dict(prenorm=True)),
]


def _run(function: str, dtype, keywords: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(6, 40, generator=gen) + 3).to(dtype).requires_grad_()
    r = torch.randn(6, 40, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(40, generator=gen).to(F32).requires_grad_()
    keywords = dict(keywords)
    scale = keywords.get("residual_scale")
    if isinstance(scale, str):
        keywords["residual_scale"] = (torch.randn(40 if scale == "vector" else (), generator=gen)
                                      .to(dtype).requires_grad_())
    torch.manual_seed(seed)
    out = getattr(fusednorm, function)(x, r, w, **keywords)
    y, h = out if keywords.get("prenorm") else (out, None)
    dy = torch.randn(y.shape, generator=gen).to(y.dtype)
    torch.autograd.backward([y] + ([h] if h is not None else []),
                            [dy] + ([torch.randn(h.shape, generator=gen).to(h.dtype)] if h is not None else []))
    leaves = [x, r, w] + ([keywords["residual_scale"]] if isinstance(scale, str) else [])
    return y.detach(), None if h is None else h.detach(), [t.grad for t in leaves], leaves


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize(("function", "keywords"), CALLS, ids=[f"{f}-{k}" for f, k in CALLS])
def test_h_is_the_torch_backends_bit_for_bit(function, keywords, dtype):
    """h (the same dropout mask: the seed comes from torch's generator in the same order) is the float32 sum
    rounded once, as the Function path computes it; y agrees to rounding; each gradient has its input's dtype
    and agrees within a few ulp (autograd rounds 16-bit gradients between ATen's ops: section 6 holds, see
    tests/test_correctness.py's cpu-path target)."""
    y, h, grads, leaves = _run(function, dtype, keywords)
    with cpu_path.disabled():
        y_ref, h_ref, grads_ref, _ = _run(function, dtype, keywords)
    if h is not None:
        assert h.dtype == h_ref.dtype and torch.equal(h, h_ref)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=2e-6 if dtype == F32 else 8e-3, atol=1e-5 if dtype == F32 else 2e-2)
    for g, g_ref, leaf in zip(grads, grads_ref, leaves, strict=True):
        assert g.dtype == leaf.dtype == g_ref.dtype
        scale = g_ref.float().abs().max()
        tol = 1e-5 if dtype == F32 else 3e-2  # a float32 weight gradient of bfloat16 rows: bf16-level
        assert (g.float() - g_ref.float()).abs().max() <= tol * max(float(scale), 1.0)


def test_no_dropout_mask_is_saved():
    """Only what ATen's norm saves (h, its statistics, the parameters) and the seed: no (M, N) mask."""
    saved = []
    x, r, w, b = (torch.randn(*s, requires_grad=True) for s in ((64, 32), (64, 32), (32,), (32,)))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fusednorm.add_layer_norm(x, r, w, b, dropout_p=0.5)
    y.sum().backward()
    assert not any(t.dtype == torch.bool for t in saved)
    assert sum(t.numel() for t in saved if t.dim() == 2 and t.shape[-1] == 32) == 64 * 32  # h only
    assert x.grad.eq(0).float().mean().item() > 0.3  # the mask reached dx


def test_double_backward_works_through_atens_ops_and_the_function_path_says_it_does_not():
    """Direct path, LayerNorm with a plain or (Post-LN) scaled residual: ATen's ops are twice differentiable.
    Its own Functions (RMSNorm, the dropped sum, a scaled sum whose h is returned) and the Function path raise
    fusednorm's error."""
    x = torch.randn(5, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    (dx,) = torch.autograd.grad(fusednorm.layer_norm(x, w, b).square().sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.square().sum(), x)
    x_ref = x.detach().requires_grad_()
    (dx_ref,) = torch.autograd.grad(torch.nn.functional.layer_norm(x_ref, (16,), w, b).square().sum(), x_ref,
                                    create_graph=True)
    torch.testing.assert_close(ddx, torch.autograd.grad(dx_ref.square().sum(), x_ref)[0])
    r = torch.randn(5, 16, requires_grad=True)
    s = torch.randn(16, requires_grad=True)
    for scale in (0.5, s):  # torch.add(x, r, alpha=0.5) / torch.addcmul(x, r, s): ATen's
        (dx,) = torch.autograd.grad(fusednorm.add_layer_norm(x, r, w, residual_scale=scale).square().sum(), x,
                                    create_graph=True)
        (ddx,) = torch.autograd.grad(dx.square().sum(), x)
        x_ref = x.detach().requires_grad_()
        (dx_ref,) = torch.autograd.grad(torch.nn.functional.layer_norm(r * scale + x_ref, (16,), w).square().sum(),
                                        x_ref, create_graph=True)
        torch.testing.assert_close(ddx, torch.autograd.grad(dx_ref.square().sum(), x_ref)[0])
    calls = [(True, lambda: fusednorm.rms_norm(x, w)),
             (True, lambda: fusednorm.add_layer_norm(x, r, w, residual_scale=0.5, prenorm=True)[0]),
             (True, lambda: fusednorm.add_rms_norm(x, r, w, dropout_p=0.2)),
             (False, lambda: fusednorm.layer_norm(x, w, b))]
    for direct, make in calls:
        with contextlib.nullcontext() if direct else cpu_path.disabled():
            (dx,) = torch.autograd.grad(make().square().sum(), x, create_graph=True)
            with pytest.raises(RuntimeError, match=ops.DOUBLE_BACKWARD_MESSAGE[:40]):
                dx.square().sum().backward()


def test_a_learned_scale_gets_its_gradient_in_its_dtype():
    case = Case("add_rms_norm[vector]", (4, 12), BF16, F32)
    assert case.variant.learned_scale
    x, r = torch.randn(4, 12).bfloat16().requires_grad_(), torch.randn(4, 12).bfloat16().requires_grad_()
    s = torch.rand(12, dtype=F32, requires_grad=True)
    fusednorm.add_rms_norm(x, r, None, residual_scale=s).float().square().sum().backward()
    assert s.grad.dtype == F32 and s.grad.abs().sum() > 0 and x.grad.dtype == r.grad.dtype == BF16


@needs_compiled
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize(("function", "keywords"), CALLS[:6], ids=[f"{f}-{k}" for f, k in CALLS[:6]])
def test_compiled_sums_are_the_torch_ops_ones(function, keywords, dtype, monkeypatch):
    """_philox_cpu.pre_norm_sum / scale_backward against the torch ops they replace: the same h and y bit for
    bit (the same float32 products and sums, rounded once), the same gradients (dscale: the float32 column sums
    in another order)."""
    y, h, grads, _ = _run(function, dtype, keywords)
    monkeypatch.setattr(dropout, "_philox_cpu", None)
    y_ref, h_ref, grads_ref, _ = _run(function, dtype, keywords)
    assert torch.equal(y, y_ref) and (h is None or torch.equal(h, h_ref))
    for g, g_ref in zip(grads[:2], grads_ref[:2], strict=True):
        assert torch.equal(g, g_ref)
    for g, g_ref in zip(grads[2:], grads_ref[2:], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch-ops"])
def test_dx_is_zero_at_dropped_positions_of_a_nan_row(compiled, monkeypatch):
    """README: dx is 0 at dropped positions even in a NaN row (a select, not a product with the mask)."""
    if not compiled:
        monkeypatch.setattr(dropout, "_philox_cpu", None)
    elif dropout._philox_cpu is None:
        pytest.skip("fusednorm._philox_cpu is not built")
    x, r = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32).bfloat16().float().requires_grad_()
    w = torch.randn(32)
    with torch.no_grad():
        x[1, 3] = float("nan")
    torch.manual_seed(7)
    fusednorm.add_layer_norm(x, r, w, dropout_p=0.5, residual_scale=0.5).sum().backward()
    torch.manual_seed(7)
    keep = dropout_keep_mask(dropout.draw_seed("cpu"), 4, 32, 0.5)
    assert x.grad[1].isnan().any() and torch.equal(x.grad[~keep], torch.zeros(int((~keep).sum())))
    assert r.grad[1].isnan().all() and not r.grad[0].isnan().any()


@pytest.mark.parametrize("on_aten", [True, False])
def test_a_constant_16bit_row_at_a_large_offset(on_aten, monkeypatch):
    """ATen's 16-bit LayerNorm forms y = h * (rstd * w) + (b - mean * rstd * w): a constant row at 1e4 gives
    bias to ~0.2 (cpu_path.LAYER_NORM_16BIT_ON_ATEN); switched off, the call takes the Function: exactly bias."""
    monkeypatch.setattr(cpu_path, "LAYER_NORM_16BIT_ON_ATEN", on_aten)
    monkeypatch.setattr(fusednorm._plan, "_PLANS", {})
    x = torch.randn(3, 24).bfloat16()
    x[1] = 1e4
    w, b = torch.rand(24).add(0.5).bfloat16(), torch.randn(24).bfloat16()
    y = fusednorm.layer_norm(x.requires_grad_(), w, b)
    assert _takes_the_function(y) != on_aten
    error = (y[1].float() - b.float()).abs().max().item()
    assert error <= 0.5 if on_aten else error == 0.0


# ---- ATen's sums for a scaled residual, the 16-bit parameters, the 16-bit RMSNorm kernel -------------------------

_SCALED = [v for v in case_variants() if v.scale_kind and not v.has_dropout and not v.store_stats]


def _sum_op(out) -> str:
    """The name of the autograd node that formed h under ATen's LayerNorm / the RMSNorm Function."""
    node = (out[0] if isinstance(out, tuple) else out).grad_fn
    while node is not None and type(node).__name__ in ("NativeLayerNormBackward0", "BackwardCFunction",
                                                         "ToCopyBackward0") and node.next_functions:
        node = node.next_functions[0][0]
    return type(node).__name__ if node is not None else ""


# Every realizable (variant, x dtype, parameter dtype): a residual_f32 variant has no float32-x call, say.
_SCALED_CALLS = [(v, dtype, param_dtype) for v in _SCALED
                 for dtype, param_dtype in ((F32, None), (BF16, None), (BF16, F32), (F16, None), (F16, F32))
                 if case_matrix.realizable(v, dtype)]


@pytest.mark.parametrize(("variant", "dtype", "param_dtype"), _SCALED_CALLS,
                         ids=[f"{v.name}-{d}-{p}" for v, d, p in _SCALED_CALLS])
def test_a_scaled_residual_without_dropout_on_atens_sums_meets_section_6(variant, dtype, param_dtype):
    """Constant and learned (0-d, (N,)) scales without dropout: h by torch.add(alpha) / torch.addcmul where
    ``cpu_path._sum_recipe`` takes them, the gradients (ds included, in the scale's dtype) by autograd, else by
    _PreNormSum; every output and gradient against the float64 reference (DESIGN section 6), at N = 7 and 64."""
    for n in (7, 64):
        case = Case(variant, (5, n), dtype, param_dtype, eps=1e-6 if variant.is_rms else 1e-5)
        assert_section6(check_case(case, "torch", seed=n))


def test_which_scaled_sums_take_atens_ops():
    """ATen's sums for float32 x and residual where h is not returned (one float32 rounding less than the
    backend's), and for 16-bit x, residual and learned scale of one dtype (the backend's h bit for bit, also
    returned); _PreNormSum for the rest (a 16-bit x with a constant or float32 scale, a returned float32 h)."""
    gen = torch.Generator().manual_seed(3)
    expected = [  # (x dtype, scale: "constant" / 0-d / (N,) and its dtype, prenorm, the node that forms h)
        (F32, "constant", None, False, "AddBackward0"), (BF16, "constant", None, False, "_PreNormSumBackward"),
        (F32, "constant", None, True, "_PreNormSumBackward"), (F32, (), F32, False, "AddcmulBackward0"),
        (F32, (8,), BF16, False, "AddcmulBackward0"), (F32, (), BF16, False, "AddcmulBackward0"),
        (BF16, (), F32, False, "_PreNormSumBackward"), (BF16, (8,), F32, False, "_PreNormSumBackward"),
        (BF16, (8,), BF16, True, "AddcmulBackward0"), (BF16, (), BF16, True, "AddcmulBackward0"),
        (F32, (8,), F32, True, "_PreNormSumBackward"), (BF16, (8,), F32, True, "_PreNormSumBackward"),
    ]
    for dtype, shape, scale_dtype, prenorm, node in expected:
        x, r = (torch.randn(4, 8, generator=gen).to(dtype).requires_grad_() for _ in range(2))
        scale = 0.7 if shape == "constant" else torch.rand(shape, generator=gen).to(scale_dtype).requires_grad_()
        out = fusednorm.add_layer_norm(x, r, torch.randn(8), residual_scale=scale, prenorm=prenorm)
        assert _sum_op(out) == node, (dtype, shape, scale_dtype, prenorm)
        if node == "AddcmulBackward0" and shape != "constant":
            (out[0] if prenorm else out).float().square().sum().backward()
            assert scale.grad.dtype == scale.dtype and scale.grad.shape == scale.shape
            if prenorm:  # the returned h: the backend's bit for bit
                with cpu_path.disabled():
                    h_ref = fusednorm.add_layer_norm(x, r, torch.randn(8), residual_scale=scale, prenorm=True)[1]
                assert torch.equal(out[1], h_ref)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_16bit_layer_norm_casts_its_parameters_only_for_a_backward(dtype):
    """Without a backward, 16-bit parameters go into ATen's 16-bit kernel as given: y is the same bit for bit
    as with float32 parameters. With one, they go in as float32: ATen's 16-bit kernel would keep 16-bit
    mean/rstd for its backward, and a row of 1000s and 1004s (mean 1002, between two bfloat16 values) would get
    a dweight off by ~100%."""
    n = 64
    x = torch.tensor([1000.0] * (n // 2) + [1004.0] * (n // 2)).view(1, n).repeat(3, 1)
    x[2] = torch.randn(n)
    x = x.to(dtype)
    w, b = torch.rand(n).add(0.5).to(dtype), torch.randn(n).to(dtype)
    with torch.no_grad():
        y_fast = fusednorm.layer_norm(x, w, b)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fusednorm.layer_norm(xg, wg, b)
    assert torch.equal(y_fast, y.detach())
    assert torch.equal(y_fast, torch.layer_norm(x, (n,), w.float(), b.float(), 1e-5))
    dy = torch.randn(3, n).to(dtype)
    y.backward(dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    torch.layer_norm(x64, (n,), w64, b.double(), 1e-5).backward(dy.double())
    assert (wg.grad.double() - w64.grad).abs().max() <= 0.02 * w64.grad.abs().max()
    assert (xg.grad.double() - x64.grad).abs().max() <= 0.02 * x64.grad.abs().max()


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("weighted", [True, False])
def test_16bit_rms_norm_kernel_is_the_float32_one_rounded(dtype, weighted):
    """ATen's fused RMSNorm over 16-bit h (weight of h's dtype, or none) computes in float32: y is the float32
    kernel's y rounded once, bit for bit, and rstd is the same float32 rstd (cpu_path._rms_forward relies on
    it)."""
    gen = torch.Generator().manual_seed(5)
    for shape in ((4, 64), (3, 7), (33, 1031)):
        h = (torch.randn(*shape, generator=gen) * 3).to(dtype)
        w = torch.randn(shape[-1], generator=gen).to(dtype) if weighted else None
        y, rstd = cpu_path._rms_forward(h, w, 1e-6, False, with_rstd=True)
        y32, rstd32 = cpu_path._rms_forward(h, w, 1e-6, True, with_rstd=True)
        assert y.dtype == dtype and torch.equal(y, y32.to(dtype)) and torch.equal(rstd, rstd32)


def test_specialize_makes_one_function_per_signature():
    """``specialize`` returns one cached function per signature; it computes what the public call does."""
    variant = Variant(has_residual=True, has_bias=True)
    x, r, w, b = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), torch.randn(8)
    run = cpu_path.specialize(variant, F32, F32, F32, F32, None, 1e-5, 1.0, 0.0)
    assert run is cpu_path.specialize(variant, F32, F32, F32, F32, None, 1e-5, 1.0, 0.0)
    assert run is not cpu_path.specialize(variant, F32, F32, F32, F32, None, 1e-6, 1.0, 0.0)
    assert torch.equal(run(x, r, w, b, None), fusednorm.add_layer_norm(x, r, w, b, 1e-5))


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_a_16bit_constant_scale_without_grad(dtype):
    """Inference with a constant scale over 16-bit x: _PreNormSum's sum without the Function (compiled for
    bfloat16: the backend's h bit for bit; torch ops for float16); y as in training."""
    gen = torch.Generator().manual_seed(11)
    x, r = (torch.randn(6, 40, generator=gen).to(dtype) for _ in range(2))
    w, b = torch.randn(40, generator=gen).to(dtype), torch.randn(40, generator=gen).to(dtype)
    with torch.no_grad():
        y = fusednorm.add_layer_norm(x, r, w, b, residual_scale=0.7071067811865476)
    y_train = fusednorm.add_layer_norm(x.requires_grad_(), r, w, b, residual_scale=0.7071067811865476)
    torch.testing.assert_close(y, y_train.detach(), rtol=1e-2, atol=3e-2)
    if dtype == BF16 and dropout._philox_cpu is not None:
        h = cpu_path._pre_norm_sum_torch(x.detach(), r, None, None, 0.0, 0.7071067811865476, dtype)
        assert torch.equal(y, torch.layer_norm(h, (40,), w, b, 1e-5))


@pytest.mark.parametrize("shape", [(), (24,)], ids=["0-d", "vector"])
def test_a_16bit_learned_scale_beside_float32_x(shape):
    """float32 x and residual with a bfloat16 scale: ATen's float32 addcmul (the scale promoted exactly); ds in
    the scale's dtype, dx / dresidual / ds as the Function path's to within ds's rounding to bfloat16."""
    gen = torch.Generator().manual_seed(13)

    def grads(direct: bool):
        x, r = (torch.randn(5, 24, generator=torch.Generator().manual_seed(i)).requires_grad_() for i in (1, 2))
        s = (torch.rand(shape, generator=torch.Generator().manual_seed(3)) + 0.5).bfloat16().requires_grad_()
        with contextlib.nullcontext() if direct else cpu_path.disabled():
            y = fusednorm.add_layer_norm(x, r, w, b, residual_scale=s)
        assert (_sum_op(y) == "AddcmulBackward0") == direct
        y.backward(dy)
        return x.grad, r.grad, s.grad

    w, b, dy = torch.randn(24, generator=gen), torch.randn(24, generator=gen), torch.randn(5, 24, generator=gen)
    got, want = grads(True), grads(False)
    assert got[2].dtype == torch.bfloat16 and got[2].shape == shape
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2].float(), want[2].float(), rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: fusednorm.LayerNorm(8), lambda: fusednorm.RMSNorm(8),
    lambda: fusednorm.AddLayerNorm(8, residual_scale="vector"), lambda: fusednorm.AddRMSNorm(8, prenorm=True)],
    ids=["LayerNorm", "RMSNorm", "AddLayerNorm(vector)", "AddRMSNorm(prenorm)"])
def test_modules_take_the_cpu_path(make):
    """A module's weight is an nn.Parameter: its calls take the CPU path as plain tensors' do (they once ran the
    torch backend's autograd Function, 2x torch.nn's time), and agree with the Function path."""
    module = make()
    x, r = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    args = (x,) if isinstance(module, torch.nn.LayerNorm | torch.nn.RMSNorm) else (x, r)
    out = module(*args)
    y = out[0] if isinstance(out, tuple) else out
    assert y.grad_fn is not None and not type(y.grad_fn).__name__.startswith("_Norm"), type(y.grad_fn).__name__
    with cpu_path.disabled():
        expected = module(*args)
        assert type((expected[0] if isinstance(expected, tuple) else expected).grad_fn).__name__.startswith("_Norm")
    torch.testing.assert_close(out, expected)


def test_a_parameterless_16bit_layer_norm_after_a_call_in_another_device_context():
    """The float32 ones weight of a parameterless 16-bit LayerNorm with a backward is made per call on h's
    device: one made under ``torch.device("meta")`` once stayed cached and broke every later CPU call."""
    x = torch.randn(4, 48, dtype=BF16, requires_grad=True)
    with torch.device("meta"):
        inside = fusednorm.layer_norm(x)
    assert inside.device.type == "cpu"
    y = fusednorm.layer_norm(x)
    y.float().sum().backward()
    with cpu_path.disabled():
        expected = fusednorm.layer_norm(x.detach())
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=0)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dropout_under_checkpoint_without_rng_state_uses_the_recomputed_mask():
    """Non-reentrant checkpointing with preserve_rng_state=False recomputes the forward with a new seed: the seed
    is a saved tensor, so the backward's mask is the recomputed h's (as torch's own dropout), not the first one."""
    from torch.utils.checkpoint import checkpoint

    w, b = torch.randn(16), torch.randn(16)
    x0, r0 = torch.randn(6, 16), torch.randn(6, 16)

    def f(x, r):
        return fusednorm.add_layer_norm(x, r, w, b, dropout_p=0.5)

    def grads(run):
        x, r = x0.clone().requires_grad_(True), r0.clone().requires_grad_(True)
        run(x, r).sum().backward()
        return x.grad

    torch.manual_seed(0)
    checkpointed = grads(lambda x, r: checkpoint(f, x, r, use_reentrant=False, preserve_rng_state=False))
    torch.manual_seed(0)
    f(x0, r0)  # the first forward's draw; the recomputation draws the next seed
    recomputed = grads(f)
    assert torch.equal(checkpointed, recomputed)
