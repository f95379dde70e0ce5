"""Host scalars (eps, a constant residual_scale, 1/(1-p), weight_offset) reach every backend's kernels
exactly: the Triton kernels take them as the bits of a float64 (``fusednorm.triton.helpers.host_scalar``;
they were two float32 words once, which overflowed above 3.4e38, underflowed below 1e-45 and kept ~48
bits), the CUDA kernels as doubles. Non-finite eps and constant scales are rejected, naming them.

Public API only, on every backend this machine runs (tests/_backend_targets.py), so that the same file
runs against older revisions of the package.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch
from _backend_targets import TARGETS, target_fixture

import fusednorm

F64 = torch.float64


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch) -> tuple[str, str]:
    return target_fixture(request, monkeypatch)


NON_FINITE = [("eps", math.inf), ("eps", math.nan), ("eps", -math.inf), ("eps", 10**400),
              ("residual_scale", math.inf), ("residual_scale", -math.inf), ("residual_scale", math.nan),
              ("residual_scale", -(10**400)), ("weight_offset", math.inf), ("weight_offset", math.nan)]


@pytest.mark.parametrize(("keyword", "value"), NON_FINITE,
                         ids=[f"{k}={v if isinstance(v, float) else '1e400 (int)'}" for k, v in NON_FINITE])
def test_non_finite_scalars_are_rejected(target, keyword, value):
    backend, device = target
    x, r, w = torch.randn(3, 8, device=device), torch.randn(3, 8, device=device), torch.ones(8, device=device)
    with pytest.raises(ValueError, match=f"^{keyword} must be (a )?finite"):
        fusednorm.add_layer_norm(x, r, w, **{keyword: value}, backend=backend)


def _layer_norm_and_grads(backend, device, x, w, b, eps, dy):
    leaves = [t.to(device).requires_grad_() for t in (x, w, b)]
    y = fusednorm.layer_norm(*leaves, eps, backend=backend)
    y.backward(dy.to(device))
    return [y.detach().cpu()] + [t.grad.cpu() for t in leaves]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's 1e39 -> inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_eps_gives_the_torch_backends_result(target, dtype):
    """eps = 1e39 is finite, but not in float32: float32 kernels add inf to the variance, rstd = 0, y = bias
    and dx = 0, as the torch backend computes (two float32 words gave inf + (-inf) = NaN)."""
    backend, device = target
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(4, 16, generator=gen).to(dtype) for _ in range(2))
    w, b = (torch.randn(16, generator=gen).to(dtype) for _ in range(2))
    got = _layer_norm_and_grads(backend, device, x, w, b, 1e39, dy)
    want = _layer_norm_and_grads("torch", "cpu", x, w, b, 1e39, dy)
    for name, g, e in zip(("y", "dx", "dweight", "dbias"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, e, msg=name)
    assert torch.equal(got[0], b.expand(4, 16)) and not got[1].any()


@pytest.mark.parametrize(("eps", "scale"), [(1e-5, 1e300), (1e-60, 0.5)], ids=["scale=1e300", "eps=1e-60"])
def test_float64_extreme_scalars(target, eps, scale):
    """float64 inputs take scalars no float32 holds: residual_scale = 1e300 (h = residual * 1e300 + x with a
    residual ~1e-300) and eps = 1e-60 (a constant row: var = 0, rstd = 1e30, y = bias, not 0 * inf = NaN)."""
    backend, device = target
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, generator=gen, dtype=F64)
    x[1] = 1.5  # a constant row (its mean is exact)
    r = torch.randn(4, 16, generator=gen, dtype=F64) / scale
    r[1] = 0.0
    w, b = torch.rand(16, generator=gen, dtype=F64) + 0.5, torch.randn(16, generator=gen, dtype=F64)
    dy = torch.randn(4, 16, generator=gen, dtype=F64)
    leaves = [t.to(device, copy=True).requires_grad_() for t in (x, r, w, b)]
    y = fusednorm.add_layer_norm(*leaves, eps, residual_scale=scale, backend=backend)
    y.backward(dy.to(device))
    # float64 autograd of the formulas
    ref_leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    xr, rr, wr, br = ref_leaves
    h = rr * scale + xr
    centered = h - h.mean(-1, keepdim=True)
    ref = centered / torch.sqrt((centered * centered).mean(-1, keepdim=True) + eps) * wr + br
    ref.backward(dy)
    assert torch.equal(y[1].detach().cpu(), b), "a constant row is y = bias"
    torch.testing.assert_close(y.detach().cpu(), ref.detach(), rtol=1e-12, atol=1e-12)
    for name, leaf, ref_leaf in zip(("dx", "dresidual", "dweight", "dbias"), leaves, ref_leaves, strict=True):
        assert torch.isfinite(leaf.grad).all(), name
        torch.testing.assert_close(leaf.grad.cpu(), ref_leaf.grad, rtol=1e-9, atol=1e-9, msg=name)


def _exact_h_and_y(x, r, w, b, scale: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = r * scale + x and its LayerNorm, in 50-digit decimal arithmetic from the float64 inputs (exact up
    to the square root): a reference finer than float64 itself."""
    with localcontext() as ctx:
        ctx.prec = 50
        s, e = Decimal(scale), Decimal(eps)
        h_rows, y_rows = [], []
        for xs, rs in zip(x.tolist(), r.tolist(), strict=True):
            h = [Decimal(ri) * s + Decimal(xi) for xi, ri in zip(xs, rs, strict=True)]
            mean = sum(h) / len(h)
            rstd = 1 / (sum((v - mean) ** 2 for v in h) / len(h) + e).sqrt()
            h_rows.append([float(v) for v in h])
            y_rows.append([float((v - mean) * rstd * Decimal(wi) + Decimal(bi))
                           for v, wi, bi in zip(h, w.tolist(), b.tolist(), strict=True)])
    return torch.tensor(h_rows, dtype=F64), torch.tensor(y_rows, dtype=F64)


def test_float64_constant_scale_keeps_its_digits(target):
    """DeepNorm's alpha (a full 53-bit float) scaling a residual stream whose |mean| / std is ~3e4: h =
    fl(fl(residual * alpha) + x) is within two roundings of the exact value (one ulp of max|h|) on every
    backend, and y as close to the exact y as the torch backend's (2x + one ulp). A scale carried in fewer
    bits (two float32 words, ~48 bits: 2.5 ulp here) fails."""
    backend, device = target
    gen = torch.Generator().manual_seed(2)
    alpha = (2.0 * 18) ** 0.25
    x = torch.randn(4, 64, generator=gen, dtype=F64)
    r = (4e4 + torch.randn(4, 64, generator=gen, dtype=F64)) / alpha
    w, b = torch.rand(64, generator=gen, dtype=F64) + 0.5, torch.randn(64, generator=gen, dtype=F64)
    h_exact, y_exact = _exact_h_and_y(x, r, w, b, alpha, 1e-5)
    ulp = torch.finfo(F64).eps * float(h_exact.abs().max())

    def errors(backend_name, dev):
        y, h = fusednorm.add_layer_norm(x.to(dev), r.to(dev), w.to(dev), b.to(dev), 1e-5, residual_scale=alpha,
                                        prenorm=True, backend=backend_name)
        return float((h.cpu() - h_exact).abs().max()), float((y.cpu() - y_exact).abs().max())

    _, torch_y = errors("torch", "cpu")
    h_err, y_err = errors(backend, device)
    assert h_err <= ulp, (h_err / ulp, "ulp")
    assert y_err <= 2 * torch_y + ulp, (y_err, torch_y)


@pytest.mark.parametrize("function", ["layer_norm", "rms_norm"])
def test_smallest_normal_eps_keeps_a_constant_row_finite(target, function):
    """README: with eps = float32's smallest normal number a float32 row of variance 0 (RMSNorm: of zeros)
    still gives y = bias (0) and a finite gradient: eps does not become 0 in the float32 compute dtype."""
    backend, device = target
    eps = torch.finfo(torch.float32).tiny
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    x[0] = 0.0 if function == "rms_norm" else 1.5
    x = x.to(device).requires_grad_()
    w, b = torch.ones(8, device=device), torch.full((8,), 0.25, device=device)
    y = (fusednorm.rms_norm(x, w, eps, backend=backend) if function == "rms_norm"
         else fusednorm.layer_norm(x, w, b, eps, backend=backend))
    y.backward(torch.ones_like(y).index_fill_(1, torch.tensor([0], device=device), -7.0))
    assert torch.equal(y[0].detach().cpu(), torch.zeros(8) if function == "rms_norm" else b.cpu())
    assert torch.isfinite(x.grad).all()
