"""Small rules that every backend and the op layer share."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (so gradcheck is exact); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dresidual_is_dx(residual_scale, scale_value, dropout_p, x_dtype, residual_dtype) -> bool:
    """True when dresidual equals dx element for element, so backends write it only once."""
    return (residual_scale is None and scale_value == 1.0 and dropout_p == 0.0
            and residual_dtype == x_dtype)


def empty_forward_results(x, is_rms: bool, store_h: bool, h_dtype):
    """Uninitialised (y, h, mean, rstd) with the contract's shapes and dtypes (fusednorm/ops.py):
    what every fake (meta) function of a forward op returns."""
    rows = x.shape[0]
    stats = compute_dtype(x.dtype)
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape if store_h else (0,), dtype=h_dtype)
    mean = x.new_empty((0,) if is_rms else (rows,), dtype=stats)
    rstd = x.new_empty((rows,), dtype=stats)
    return y, h, mean, rstd


def empty_backward_results(dy, weight, bias_dtype, residual_scale, x_dtype, store_dresidual: bool, residual_dtype):
    """Uninitialised (dx, dresidual, dweight, dbias, dscale) with the contract's shapes and dtypes."""
    def grad_like(p):
        return dy.new_empty(p.shape, dtype=p.dtype) if p is not None else dy.new_empty((0,))

    dx = dy.new_empty(dy.shape, dtype=x_dtype)
    dresidual = dy.new_empty(dy.shape, dtype=residual_dtype) if store_dresidual else dy.new_empty((0,))
    dbias = dy.new_empty(dy.shape[1:], dtype=bias_dtype) if bias_dtype is not None else dy.new_empty((0,))
    return dx, dresidual, grad_like(weight), dbias, grad_like(residual_scale)
