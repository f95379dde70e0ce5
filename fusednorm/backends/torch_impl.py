"""The "torch" backend: DESIGN sections 1 and 2 in plain torch, the CPU path users get.

``forward(variant, ForwardArgs)`` / ``backward(variant, BackwardArgs)``: the backend contract
(``backends/contract.py``); written for clarity, not speed. Statistics are computed in float32 for
16/32-bit inputs and in float64 for float64 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dropout import dropout_keep_mask
from ..variant import ScaleKind, Variant
from .contract import (
    BackwardArgs,
    ForwardArgs,
    ForwardResult,
    Gradients,
    allocate_backward,
    allocate_forward,
    compute_dtype,
)


def _dropped(x: Tensor, seed: Tensor | None, p: float, cd: torch.dtype) -> Tensor:
    """x' = dropout(x) in the compute dtype, with the mask regenerated from the seed."""
    xf = x.to(cd)
    if p == 0.0:
        return xf
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p)
    # A product, not a select: NaN/Inf at a dropped position still poisons its row, as F.dropout does.
    return xf * (keep.to(cd) * (1.0 / (1.0 - p)))


def _scaled(t: Tensor, variant: Variant, residual_scale: Tensor | None, scale_value: float, cd) -> Tensor:
    """t * s in the compute dtype (t: the residual in the forward, dh in the backward)."""
    t = t.to(cd)
    if variant.learned_scale:
        return t * residual_scale.to(cd)
    if variant.scale_kind == ScaleKind.CONSTANT:
        return t * scale_value
    return t


def _pre_norm_sum(variant: Variant, x, residual, residual_scale, scale_value, dropout_p, seed, cd) -> Tensor:
    """h = residual * s + dropout(x), in the compute dtype."""
    h = _dropped(x, seed, dropout_p, cd)
    if variant.has_residual:
        h = _scaled(residual, variant, residual_scale, scale_value, cd) + h
    return h


def _affine_weight(weight: Tensor | None, weight_offset: float, cd) -> Tensor | None:
    """weight + weight_offset in the compute dtype (Gemma's (1 + w)), or None."""
    if weight is None:
        return None
    w = weight.to(cd)
    return w + weight_offset if weight_offset != 0.0 else w


def _aten_kernels(h: Tensor) -> bool:
    """Normalize with ATen's fused CPU kernels (native_layer_norm, _fused_rms_norm): one pass over the rows
    instead of ~10 composed ops and their temporaries.
    They take the very h this backend normalizes (the stored, rounded h when the variant stores h: DESIGN
    section 2) in the compute dtype, with float32 (float64) statistics; Welford moments, never
    E[h^2] - E[h]^2. The forward only: aten._fused_rms_norm_backward has no CPU kernel, and
    native_layer_norm_backward (xhat as h * rstd - mean * rstd) misses DESIGN section 6's bound when
    |mean| * rstd is large: dweight of a 1-column row (2.6e-5 against a bound of 3.8e-6), dx of a constant
    float64 row with eps = 1e-60 (tests/test_host_scalars.py)."""
    return h.device.type == "cpu" and h.shape[0] > 0


def forward(variant: Variant, args: ForwardArgs) -> ForwardResult:
    x = args.x
    cd = compute_dtype(x.dtype)
    out = allocate_forward(variant, x)
    hf = _pre_norm_sum(variant, x, args.residual, args.residual_scale, args.scale_value, args.dropout_p, args.seed, cd)
    if variant.store_h:
        out.h.copy_(hf)
        # The backward rebuilds xhat from the stored h, so the statistics are those of the stored
        # (possibly rounded) h, not of the float32 sum (DESIGN section 2).
        hf = out.h.to(cd)
    w = _affine_weight(args.weight, args.weight_offset, cd)
    if _aten_kernels(hf):
        bias = args.bias.to(cd) if args.bias is not None else None
        if variant.is_rms:
            y, rstd = torch.ops.aten._fused_rms_norm(hf, [hf.shape[-1]], w, args.eps)
        else:
            y, mean, rstd = torch.native_layer_norm(hf, [hf.shape[-1]], w, bias, args.eps)
            out.mean.copy_(mean.view(-1))
        out.rstd.copy_(rstd.view(-1))
        if variant.store_stats:
            out.stats.copy_(_row_stats(variant, args, hf, cd))
        return out._replace(y=y if y.dtype == x.dtype else y.to(x.dtype))
    if variant.is_rms:
        rstd = torch.rsqrt((hf * hf).mean(-1) + args.eps)
        xhat = hf * rstd[:, None]
    else:
        mean = hf.mean(-1)
        centered = hf - mean[:, None]
        # Two-pass variance: never E[h^2] - E[h]^2, which cancels when |mean| >> std.
        rstd = torch.rsqrt((centered * centered).mean(-1) + args.eps)
        xhat = centered * rstd[:, None]
        out.mean.copy_(mean)
    out.rstd.copy_(rstd)
    y = xhat
    if w is not None:
        y = y * w
    if args.bias is not None:
        y = y + args.bias.to(cd)
    out.y.copy_(y)
    if variant.store_stats:
        out.stats.copy_(_row_stats(variant, args, hf, cd))
    return out


def backward(variant: Variant, args: BackwardArgs) -> Gradients:
    dy = args.dy
    cd = compute_dtype(dy.dtype)
    grads = allocate_backward(variant, dy, args.weight, args.residual_scale, args.bias_dtype)
    if variant.store_h:
        hf = args.h.to(cd)
    else:
        hf = _pre_norm_sum(variant, args.x, args.residual, args.residual_scale, args.scale_value, args.dropout_p,
                           args.seed, cd)
    rstd = args.rstd[:, None]
    dyf = dy.to(cd)
    w = _affine_weight(args.weight, args.weight_offset, cd)
    if not variant.is_rms and _aten_kernels(hf) and hf.shape[-1] > 1:
        return _layer_norm_backward_aten(variant, args, grads, hf, dyf, w, cd)
    xhat = hf * rstd if variant.is_rms else (hf - args.mean[:, None]) * rstd
    g = dyf * w if w is not None else dyf
    mean_gxhat = (g * xhat).mean(-1, keepdim=True)
    if variant.is_rms:
        dh = rstd * (g - xhat * mean_gxhat)
    else:
        dh = rstd * (g - g.mean(-1, keepdim=True) - xhat * mean_gxhat)
    if args.dh_in is not None:
        dh = dh + args.dh_in.to(cd)

    if args.weight is not None:
        grads.dweight.copy_((dyf * xhat).sum(0))
    if args.bias_dtype is not None:
        grads.dbias.copy_(dyf.sum(0))
    return _input_gradients(variant, args, grads, dh, cd)


def _input_gradients(variant: Variant, args: BackwardArgs, grads: Gradients, dh: Tensor, cd) -> Gradients:
    """dx, dresidual and ds from dh (the gradient of h in the compute dtype, dh_in included)."""
    dx = dh
    if variant.has_dropout:
        keep = dropout_keep_mask(args.seed, dh.shape[0], dh.shape[1], args.dropout_p)
        dx = torch.where(keep, dh * (1.0 / (1.0 - args.dropout_p)), torch.zeros((), dtype=cd, device=dh.device))
    grads.dx.copy_(dx)
    if variant.store_dresidual:
        grads.dresidual.copy_(_scaled(dh, variant, args.residual_scale, args.scale_value, cd))
    if variant.learned_scale:
        per_column = (dh * args.residual.to(cd)).sum(0)
        grads.dscale.copy_(per_column if variant.scale_kind == ScaleKind.VECTOR else per_column.sum())
    return grads


def _layer_norm_backward_aten(variant: Variant, args: BackwardArgs, grads: Gradients, hf: Tensor, dyf: Tensor,
                              w: Tensor | None, cd) -> Gradients:
    """The LayerNorm backward with ATen's fused CPU kernel (N > 1: for one column it leaves rounding noise
    rstd * g - rstd * mean(g) where dh is exactly 0), on the centered rows h - mean with a mean of 0 passed:
    it then forms xhat = (h - mean) * rstd exactly as the composed formula does (its own
    h * rstd - mean * rstd cancels when |mean| * rstd is large: see ``_aten_kernels``), and
    dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) in one pass; dweight = sum(dy * xhat), dbias = sum(dy)."""
    centered = hf - args.mean[:, None]
    zeros = args.mean.new_zeros((hf.shape[0], 1))
    dh, dweight, _ = torch.ops.aten.native_layer_norm_backward(
        dyf, centered, [hf.shape[-1]], zeros, args.rstd[:, None], w, None, [True, w is not None, False])
    if args.dh_in is not None:
        dh = dh + args.dh_in.to(cd)
    if args.weight is not None:
        grads.dweight.copy_(dweight)
    if args.bias_dtype is not None:
        grads.dbias.copy_(dyf.sum(0))
    return _input_gradients(variant, args, grads, dh, cd)


def _moments(v: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row mean and M2 = sum((v - mean)^2) of an (M, N) tensor (two-pass)."""
    mean = v.mean(-1)
    centered = v - mean[:, None]
    return mean, (centered * centered).sum(-1)


def _row_stats(variant: Variant, args: ForwardArgs, h: Tensor, cd: torch.dtype) -> Tensor:
    """The (M, STATS_COLUMNS) telemetry of contract.py for the h the norm used (DESIGN section 7).

    The branch f = dropout(x) and the stream residual * s are rebuilt here (the plain-torch path has no
    registers to share); only monitored calls pay for it."""
    branch = _dropped(args.x, args.seed, args.dropout_p, cd)
    if variant.has_residual:
        stream = _scaled(args.residual, variant, args.residual_scale, args.scale_value, cd)
    else:
        stream = torch.zeros_like(branch)
    magnitude = h.abs()
    magnitude = torch.where(torch.isnan(magnitude), torch.zeros((), dtype=cd), magnitude)  # NaN ignored, Inf kept
    columns = [*_moments(branch), *_moments(stream), *_moments(h), magnitude.amax(-1),
               (~torch.isfinite(h)).sum(-1).to(cd)]
    return torch.stack(columns, dim=-1)
