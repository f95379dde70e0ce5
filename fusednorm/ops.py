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
from .backends.common import dresidual_is_dx, empty_backward_results, empty_forward_results


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
    return empty_forward_results(x, is_rms, store_h, h_dtype)


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
    store_dresidual = residual_dtype is not None and not dresidual_is_dx(
        residual_scale, scale_value, dropout_p, x_dtype, residual_dtype)
    return empty_backward_results(dy, weight, bias_dtype, residual_scale, x_dtype, store_dresidual, residual_dtype)
