"""The op layer: two torch.library custom ops that every public function and module runs through.

    torch.ops.fusednorm.fwd(x, residual, weight, bias, residual_scale, scale_value, eps, dropout_p,
                            seed, is_rms, store_h, h_dtype, backend) -> (y, h, mean, rstd)
    torch.ops.fusednorm.bwd(dy, dh_in, x, residual, h, weight, bias_dtype, residual_scale, scale_value,
                            mean, rstd, dropout_p, seed, is_rms, x_dtype, residual_dtype, backend)
                            -> (dx, dresidual, dweight, dbias, dscale)

This is the contract every backend's ``forward``/``backward`` implements (same arguments, minus
``backend``). Shapes: x, residual, dy, dh_in, h are (M, N) with unit stride along N (rows may be
strided); weight, bias are (N,); residual_scale is a 0-d or (N,) tensor, or None with the constant
``scale_value`` (1.0: no scale); seed is an int64 tensor of shape (1,) on x's device, or None when
dropout_p == 0. Results are freshly allocated and contiguous:

- y: (M, N) in x's dtype. h: (M, N) in ``h_dtype`` when ``store_h``, else shape (0,). When h is
  stored, the statistics are those of the stored (rounded) h, because the backward reads it.
- mean (LayerNorm only, else shape (0,)) and rstd: (M,), float32 (float64 for float64 x).
- backward: reads h when it is given, else recomputes h from x and residual. dx: (M, N) x_dtype.
  dresidual: (M, N) residual_dtype, or shape (0,) when there is no residual or when it equals dx
  (``dresidual_is_dx``). dweight, dbias: (N,) in the parameter's dtype, or (0,) when the parameter
  is None. dscale: residual_scale's shape and dtype, or (0,) when it is None. Column sums are
  per-program float32 partials followed by one fixed-order reduction (bit-identical run to run).

The op layer is the only place that turns a backend name into an implementation; torch.compile
sees opaque ops with exact fake (meta) functions below, so it traces without graph breaks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .backends.common import compute_dtype, dresidual_is_dx


@torch.library.custom_op("fusednorm::fwd", mutates_args=())
def fwd(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
        residual_scale: Tensor | None, scale_value: float, eps: float, dropout_p: float,
        seed: Tensor | None, is_rms: bool, store_h: bool, h_dtype: torch.dtype,
        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backends.implementation(backend).forward(
        x, residual, weight, bias, residual_scale, scale_value, eps, dropout_p, seed, is_rms,
        store_h, h_dtype)


@fwd.register_fake
def _fwd_fake(x, residual, weight, bias, residual_scale, scale_value, eps, dropout_p, seed, is_rms,
              store_h, h_dtype, backend):
    rows = x.shape[0]
    stats = compute_dtype(x.dtype)
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape if store_h else (0,), dtype=h_dtype)
    mean = x.new_empty((0,) if is_rms else (rows,), dtype=stats)
    rstd = x.new_empty((rows,), dtype=stats)
    return y, h, mean, rstd


@torch.library.custom_op("fusednorm::bwd", mutates_args=())
def bwd(dy: Tensor, dh_in: Tensor | None, x: Tensor | None, residual: Tensor | None,
        h: Tensor | None, weight: Tensor | None, bias_dtype: torch.dtype | None,
        residual_scale: Tensor | None, scale_value: float, mean: Tensor, rstd: Tensor,
        dropout_p: float, seed: Tensor | None, is_rms: bool, x_dtype: torch.dtype,
        residual_dtype: torch.dtype | None, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backends.implementation(backend).backward(
        dy, dh_in, x, residual, h, weight, bias_dtype, residual_scale, scale_value, mean, rstd, dropout_p,
        seed, is_rms, x_dtype, residual_dtype)


@bwd.register_fake
def _bwd_fake(dy, dh_in, x, residual, h, weight, bias_dtype, residual_scale, scale_value, mean, rstd,
              dropout_p, seed, is_rms, x_dtype, residual_dtype, backend):
    def param_grad(p):
        return dy.new_empty(p.shape, dtype=p.dtype) if p is not None else dy.new_empty((0,))

    dx = dy.new_empty(dy.shape, dtype=x_dtype)
    if residual_dtype is None or dresidual_is_dx(residual_scale, scale_value, dropout_p, x_dtype, residual_dtype):
        dresidual = dy.new_empty((0,))
    else:
        dresidual = dy.new_empty(dy.shape, dtype=residual_dtype)
    dbias = dy.new_empty((0,)) if bias_dtype is None else dy.new_empty(dy.shape[1:], dtype=bias_dtype)
    return dx, dresidual, param_grad(weight), dbias, param_grad(residual_scale)
