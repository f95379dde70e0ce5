"""The op layer: two torch.library custom ops, and the eager fast path beside them.

    torch.ops.fusednorm.fwd(x, residual, weight, bias, residual_scale, seed, variant, eps, scale_value,
                            dropout_p, weight_offset, backend) -> (y, h, mean, rstd, stats)
    torch.ops.fusednorm.bwd(dy, dh_in, x, residual, h, weight, residual_scale, mean, rstd, seed, variant,
                            scale_value, dropout_p, weight_offset, bias_dtype, backend)
                            -> (dx, dresidual, dweight, dbias, dscale)

``variant`` is the flag word of a ``fusednorm.variant.Variant``; the tensors and scalars are the fields
of ``backends.contract.ForwardArgs`` / ``BackwardArgs`` (shapes and results: see that module). The ops
are flat because custom-op schemas are; ``forward`` / ``backward`` below take and give the parameter
objects, so no other layer spells the argument lists out.

``backend`` is a name as the caller gave it ("auto" included): the op resolves it when it runs, on the
device of its tensors, so a graph traced or exported on one machine picks the backend of the machine
it runs on. torch.compile and torch.export see opaque ops with exact fake (meta) functions
(``contract.allocate_*``) and ``fusednorm::fwd``'s own autograd formula (``register_autograd``: its
backward is ``fusednorm::bwd``), so they trace without graph breaks and exported programs can be trained.

Eager calls on plain tensors skip the dispatcher: ``forward`` / ``backward`` call the backend directly
(the custom-op dispatch costs more host time than the whole of ATen's layer_norm call). Everything else
(tracing, DTensor and other tensor subclasses, an active TorchDispatchMode) goes through the ops.
"""

from __future__ import annotations

from types import ModuleType

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

_dispatch_modes = torch._C._len_torch_dispatch_stack  # active TorchDispatchModes; bound once (eager hot path)


@torch.library.custom_op("fusednorm::fwd", mutates_args=())
def fwd(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
        residual_scale: Tensor | None, seed: Tensor | None, variant: int, eps: float, scale_value: float,
        dropout_p: float, weight_offset: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = ForwardArgs(x, residual, weight, bias, residual_scale, seed, eps, scale_value, dropout_p, weight_offset)
    impl = backends.implementation(backends.resolve(backend, x.device))
    return tuple(impl.forward(Variant.from_flags(variant), args))


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
    impl = backends.implementation(backends.resolve(backend, dy.device))
    return tuple(impl.backward(Variant.from_flags(variant), args))


@bwd.register_fake
def _bwd_fake(dy, dh_in, x, residual, h, weight, residual_scale, mean, rstd, seed, variant, scale_value, dropout_p,
              weight_offset, bias_dtype, backend):
    return tuple(allocate_backward(Variant.from_flags(variant), dy, weight, residual_scale, bias_dtype))


# ------------------------------------------------------------------ fusednorm::fwd's autograd formula

_FWD_INPUTS = ("x", "residual", "weight", "bias", "residual_scale", "seed", "variant", "eps", "scale_value",
               "dropout_p", "weight_offset", "backend")
DOUBLE_BACKWARD_MESSAGE = ("fusednorm does not support double backward (gradients of gradients, "
                           "create_graph=True through a fusednorm norm)")


def _fwd_setup_context(ctx, inputs, output) -> None:
    """Save exactly ``variant.saved`` (DESIGN section 5), as the autograd Functions of functional.py do."""
    given = dict(zip(_FWD_INPUTS, inputs, strict=True))
    variant = Variant.from_flags(given["variant"])
    available = dict(given, h=output[1], mean=output[2], rstd=output[3])
    ctx.save_for_backward(*(available[k] for k in variant.saved))
    bias = given["bias"]
    ctx.fusednorm = dict(variant=variant, backend=given["backend"], scale_value=given["scale_value"],
                         dropout_p=given["dropout_p"], weight_offset=given["weight_offset"],
                         bias_dtype=bias.dtype if bias is not None else None, y_shape=output[0].shape,
                         y_dtype=output[0].dtype)


def _fwd_backward(ctx, dy, dh_in, _dmean, _drstd, _dstats):
    meta = ctx.fusednorm
    variant: Variant = meta["variant"]
    saved = dict(zip(variant.saved, ctx.saved_tensors, strict=True))
    # The kernels read (M, N) rows with unit stride along N; autograd may hand an expanded gradient (stride 0).
    y_unused = dy is None
    if y_unused:
        dy = saved["rstd"].new_zeros(meta["y_shape"], dtype=meta["y_dtype"])
    dh_in = dh_in.contiguous() if dh_in is not None and variant.prenorm else None
    grads = bwd(dy.contiguous(), dh_in, saved.get("x"), saved.get("residual"), saved.get("h"), saved.get("weight"),
                saved.get("residual_scale"), saved.get("mean", saved["rstd"].new_empty((0,))), saved["rstd"],
                saved.get("seed"), variant.flags, meta["scale_value"], meta["dropout_p"], meta["weight_offset"],
                meta["bias_dtype"], meta["backend"])
    dresidual = None
    if variant.has_residual:
        dresidual = grads[0] if variant.dresidual_is_dx else grads[1]
    # y unused: weight and bias take no part in h; no gradient (None), as eager autograd gives.
    return (grads[0], dresidual, grads[2] if variant.has_weight and not y_unused else None,
            grads[3] if meta["bias_dtype"] is not None and not y_unused else None,
            grads[4] if variant.learned_scale else None) + (None,) * 7


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _bwd_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def _bwd_setup_context(ctx, inputs, output) -> None:
    pass


bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# --------------------------------------------------------------------- the layer functional.py calls

def _eager(t: Tensor) -> bool:
    """A plain tensor with data (meta tensors get the op's fake results), outside any trace and any
    TorchDispatchMode (a mode, e.g. a FLOP counter or a memory tracker, must see the op): the backend can be
    called directly."""
    return (type(t) is Tensor and not torch._C._len_torch_dispatch_stack() and not torch.compiler.is_compiling()
            and not t.is_meta)


def _implementation(backend: str, device: torch.device):
    """The backend module; the functional layer passes resolved names in eager mode (nothing to check)."""
    return backends.implementation(backend if backend in backends.BACKENDS else backends.resolve(backend, device))


def forward(variant: Variant, args: ForwardArgs, backend: str, impl: ModuleType | None = None) -> ForwardResult:
    """One forward: the backend directly in eager mode (``backend`` resolved), else ``fusednorm::fwd``.
    ``impl``: the backend module when the caller's plan already decided that the call is eager on plain
    tensors (``fusednorm._plan.Plan.impl``): then only an active TorchDispatchMode is checked here."""
    if impl is not None and not _dispatch_modes():
        return impl.forward(variant, args)
    a = args
    if _eager(a.x):
        if backend in backends.BACKENDS:  # resolved by the caller: the common case
            return backends.implementation(backend).forward(variant, args)
        return _implementation(backend, a.x.device).forward(variant, args)
    return ForwardResult(*fwd(a.x, a.residual, a.weight, a.bias, a.residual_scale, a.seed, variant.flags, a.eps,
                              a.scale_value, a.dropout_p, a.weight_offset, backend))


def backward(variant: Variant, args: BackwardArgs, backend: str) -> Gradients:
    """One backward: the backend directly in eager mode, else ``fusednorm::bwd``."""
    a = args
    if _eager(a.dy):
        if backend in backends.BACKENDS:
            return backends.implementation(backend).backward(variant, args)
        return _implementation(backend, a.dy.device).backward(variant, args)
    return Gradients(*bwd(a.dy, a.dh_in, a.x, a.residual, a.h, a.weight, a.residual_scale, a.mean, a.rstd, a.seed,
                          variant.flags, a.scale_value, a.dropout_p, a.weight_offset, a.bias_dtype, backend))
