"""The op layer: two torch.library custom ops that every public function and module runs through.

    torch.ops.fusednorm.fwd(x, residual, weight, bias, residual_scale, seed, variant, eps, scale_value,
                            dropout_p, weight_offset, backend) -> (y, h, mean, rstd, stats)
    torch.ops.fusednorm.bwd(dy, dh_in, x, residual, h, weight, residual_scale, mean, rstd, seed, variant,
                            scale_value, dropout_p, weight_offset, bias_dtype, backend)
                            -> (dx, dresidual, dweight, dbias, dscale)

``variant`` is the flag word of a ``fusednorm.variant.Variant``; the tensors and scalars are the fields
of ``backends.contract.ForwardArgs`` / ``BackwardArgs`` (shapes and results: see that module). The ops
are flat because custom-op schemas are; ``forward`` / ``backward`` below take and give the parameter
objects, so no other layer spells the argument lists out.

The op layer is the only place that turns a backend name into an implementation; torch.compile
sees opaque ops with exact fake (meta) functions (``contract.allocate_*``), so it traces them
without graph breaks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .backends.contract import (
    BackwardArgs,
    ForwardArgs,
    ForwardResult,
    Gradients,
    allocate_backward,
    allocate_forward,
)
from .variant import Variant


@torch.library.custom_op("fusednorm::fwd", mutates_args=())
def fwd(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
        residual_scale: Tensor | None, seed: Tensor | None, variant: int, eps: float, scale_value: float,
        dropout_p: float, weight_offset: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = ForwardArgs(x, residual, weight, bias, residual_scale, seed, eps, scale_value, dropout_p, weight_offset)
    return tuple(backends.implementation(backend).forward(Variant.from_flags(variant), args))


@fwd.register_fake
def _fwd_fake(x, residual, weight, bias, residual_scale, seed, variant, eps, scale_value, dropout_p, weight_offset,
              backend):
    return tuple(allocate_forward(Variant.from_flags(variant), x))


@torch.library.custom_op("fusednorm::bwd", mutates_args=())
def bwd(dy: Tensor, dh_in: Tensor | None, x: Tensor | None, residual: Tensor | None, h: Tensor | None,
        weight: Tensor | None, residual_scale: Tensor | None, mean: Tensor, rstd: Tensor, seed: Tensor | None,
        variant: int, scale_value: float, dropout_p: float, weight_offset: float, bias_dtype: torch.dtype | None,
        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = BackwardArgs(dy, mean, rstd, dh_in, x, residual, h, weight, residual_scale, seed, bias_dtype, scale_value,
                        dropout_p, weight_offset)
    return tuple(backends.implementation(backend).backward(Variant.from_flags(variant), args))


@bwd.register_fake
def _bwd_fake(dy, dh_in, x, residual, h, weight, residual_scale, mean, rstd, seed, variant, scale_value, dropout_p,
              weight_offset, bias_dtype, backend):
    return tuple(allocate_backward(Variant.from_flags(variant), dy, weight, residual_scale, bias_dtype))


def forward(variant: Variant, args: ForwardArgs, backend: str) -> ForwardResult:
    """``fusednorm::fwd`` with the contract's parameter object."""
    a = args
    return ForwardResult(*fwd(a.x, a.residual, a.weight, a.bias, a.residual_scale, a.seed, variant.flags, a.eps,
                              a.scale_value, a.dropout_p, a.weight_offset, backend))


def backward(variant: Variant, args: BackwardArgs, backend: str) -> Gradients:
    """``fusednorm::bwd`` with the contract's parameter object."""
    a = args
    return Gradients(*bwd(a.dy, a.dh_in, a.x, a.residual, a.h, a.weight, a.residual_scale, a.mean, a.rstd, a.seed,
                          variant.flags, a.scale_value, a.dropout_p, a.weight_offset, a.bias_dtype, backend))
