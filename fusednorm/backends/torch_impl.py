"""The "torch" backend: DESIGN sections 1 and 2 in plain torch, the CPU path users get.

Every backend implements the same two functions with the same arguments and results
(see ``fusednorm/ops.py`` for the contract); this one is written for clarity, not speed.
Statistics are computed in float32 for 16/32-bit inputs and in float64 for float64 inputs.
"""

from __future__ import annotations

import torch

from ..dropout import dropout_keep_mask
from .common import compute_dtype, dresidual_is_dx

_EMPTY = (0,)


def _empty(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for a result that does not apply: shape (0,), like's dtype."""
    return like.new_empty(_EMPTY)


def _dropped(x: torch.Tensor, seed: torch.Tensor | None, p: float, cd: torch.dtype) -> torch.Tensor:
    """x' = dropout(x) in the compute dtype, with the mask regenerated from the seed."""
    xf = x.to(cd)
    if p == 0.0:
        return xf
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p)
    # A product, not a select: NaN/Inf at a dropped position still poisons its row, as F.dropout does.
    return xf * (keep.to(cd) * (1.0 / (1.0 - p)))


def _scaled_residual(residual, residual_scale, scale_value, cd):
    r = residual.to(cd)
    if residual_scale is not None:
        return r * residual_scale.to(cd)
    if scale_value != 1.0:
        return r * scale_value
    return r


def _pre_norm_sum(x, residual, residual_scale, scale_value, dropout_p, seed, cd):
    """h = residual * s + dropout(x), in the compute dtype."""
    h = _dropped(x, seed, dropout_p, cd)
    if residual is not None:
        h = _scaled_residual(residual, residual_scale, scale_value, cd) + h
    return h


def forward(x, residual, weight, bias, residual_scale, scale_value, eps, dropout_p, seed,
            is_rms, store_h, h_dtype):
    cd = compute_dtype(x.dtype)
    hf = _pre_norm_sum(x, residual, residual_scale, scale_value, dropout_p, seed, cd)
    if store_h:
        h = hf.to(h_dtype, copy=True)
        # The backward rebuilds xhat from the stored h, so the statistics are those of the stored
        # (possibly rounded) h, not of the float32 sum (DESIGN section 2).
        hf = h.to(cd)
    else:
        h = x.new_empty(_EMPTY, dtype=h_dtype)
    if is_rms:
        mean = x.new_empty(_EMPTY, dtype=cd)
        rstd = torch.rsqrt((hf * hf).mean(-1) + eps)
        xhat = hf * rstd[:, None]
    else:
        mean = hf.mean(-1)
        centered = hf - mean[:, None]
        # Two-pass variance: never E[h^2] - E[h]^2, which cancels when |mean| >> std.
        rstd = torch.rsqrt((centered * centered).mean(-1) + eps)
        xhat = centered * rstd[:, None]
    y = xhat
    if weight is not None:
        y = y * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype), h, mean, rstd


def backward(dy, dh_in, x, residual, h, weight, bias_dtype, residual_scale, scale_value, mean, rstd,
             dropout_p, seed, is_rms, x_dtype, residual_dtype):
    cd = compute_dtype(x_dtype)
    if h is not None:
        hf = h.to(cd)
    else:
        hf = _pre_norm_sum(x, residual, residual_scale, scale_value, dropout_p, seed, cd)
    xhat = hf * rstd[:, None] if is_rms else (hf - mean[:, None]) * rstd[:, None]
    dyf = dy.to(cd)
    g = dyf * weight.to(cd) if weight is not None else dyf
    projection = (g * xhat).mean(-1, keepdim=True)
    if is_rms:
        dh = rstd[:, None] * (g - xhat * projection)
    else:
        dh = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * projection)
    if dh_in is not None:
        dh = dh + dh_in.to(cd)

    dweight = (dyf * xhat).sum(0).to(weight.dtype) if weight is not None else _empty(dy)
    dbias = dyf.sum(0).to(bias_dtype) if bias_dtype is not None else _empty(dy)

    dx = dh
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, dh.shape[0], dh.shape[1], dropout_p)
        dx = torch.where(keep, dh * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=cd, device=dh.device))
    dx = dx.to(x_dtype)

    dresidual = _empty(dy)
    if residual_dtype is not None and not dresidual_is_dx(residual_scale, scale_value, dropout_p, x_dtype,
                                                          residual_dtype):
        dresidual = _scaled_residual(dh, residual_scale, scale_value, cd).to(residual_dtype)

    dscale = _empty(dy)
    if residual_scale is not None:
        per_column = (dh * residual.to(cd)).sum(0)
        total = per_column if residual_scale.dim() == 1 else per_column.sum()
        dscale = total.to(residual_scale.dtype)
    return dx, dresidual, dweight, dbias, dscale

