"""The fused residual add + norm of a drop-in norm, and the hand-off of its output to the next layer.

A decoder layer's last residual add ``h = residual + m`` is normalised by a norm the layer does not own:
the next layer's ``input_layernorm`` (or the model's final norm), called by Hugging Face's model loop,
which passes one tensor, h, from layer to layer. The layer computes ``(y, h)`` in one fused call
(:func:`fused_add_norm`), returns h as before and *offers* y to that norm (:func:`offer`): a tuple kept in
an attribute of h itself. The norm, a :class:`HandoffConsumer` (the drop-in's class plus this check),
*takes* y (:func:`take`) instead of normalising h again -- only if all of these hold:

- the offer names this very norm module (a norm that was not linked, or a tensor that went elsewhere,
  computes as usual);
- grad mode is the same as when y was made (under reentrant checkpointing the forward runs without
  grad and the recomputation with grad: y made without grad is never used where a gradient is needed);
- outside torch.compile: neither h nor the norm's weight changed in place since (version counters;
  Dynamo cannot compare a graph input's version counter, so compiled code skips this check -- HF's
  model loops never modify the hidden states in place between layers).

Anything else -- a new tensor from a hook, ``h.to(other_device)``, a detached copy -- has no offer (a
new tensor object has no attributes), so the norm computes h's norm itself: the result is the same, only
unfused. The offer lives as long as h does (no registry to leak), and is dropped when taken without
grad. With grad it stays: non-reentrant checkpointing (HF's default) recomputes a layer with the very
input tensor, and the recomputation must take the same path as the forward did (it does: same offer,
same grad mode), so that the same tensors are saved.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from ..modules import LayerNorm, RMSNorm, autocast_norm_dtype
from .norms import HFRMSNorm, hf_output_dtype

__all__ = ["HandoffConsumer", "as_consumer", "fused_add_norm", "offer", "take"]

_ATTRIBUTE = "_fusednorm_offer"

try:  # torch.distributed may be absent from a build
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    FSDPModule = DTensor = ()


def _versions(h: Tensor, norm: nn.Module) -> tuple[int, int] | None:
    if torch.compiler.is_compiling():
        return None
    return h._version, norm.weight._version


def offer(h: Tensor, norm: nn.Module, y: Tensor) -> None:
    """Attach ``y = norm(h)`` to h for ``norm`` to take."""
    setattr(h, _ATTRIBUTE, (norm, torch.is_grad_enabled(), y, _versions(h, norm)))


def take(norm: nn.Module, h: Tensor) -> Tensor | None:
    """``norm(h)`` as offered by the layer that made h, or None when it must be computed (see module doc)."""
    entry = getattr(h, _ATTRIBUTE, None)
    if entry is None:
        return None
    target, grad_enabled, y, versions = entry
    if target is not norm or grad_enabled != torch.is_grad_enabled():
        return None
    if not torch.compiler.is_compiling() and versions != _versions(h, norm):
        return None
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        setattr(h, _ATTRIBUTE, None)  # no recomputation will need it: let y go with its last use
    return y


class HandoffConsumer:
    """Mixin: the norm first takes an offered output (see module doc), else computes as its base class."""

    def forward(self, x: Tensor) -> Tensor:
        y = take(self, x)
        return y if y is not None else super().forward(x)


class HandoffHFRMSNorm(HandoffConsumer, HFRMSNorm):
    """HFRMSNorm that takes the output offered by the previous decoder layer."""


class HandoffLayerNorm(HandoffConsumer, LayerNorm):
    """fusednorm.LayerNorm that takes the output offered by the previous decoder layer."""


class HandoffRMSNorm(HandoffConsumer, RMSNorm):
    """fusednorm.RMSNorm that takes the output offered by the previous decoder layer."""


_CONSUMERS = {HFRMSNorm: HandoffHFRMSNorm, LayerNorm: HandoffLayerNorm, RMSNorm: HandoffRMSNorm}


def as_consumer(norm: nn.Module) -> bool:
    """Make a drop-in norm a consumer of offers (its class, in place; state_dict and Parameters unchanged).
    False if it is not a fusednorm drop-in."""
    if isinstance(norm, HandoffConsumer):
        return True
    consumer = _CONSUMERS.get(type(norm))
    if consumer is None:
        return False
    norm.__class__ = consumer
    return True


def can_fuse(norm: nn.Module | None) -> bool:
    """Whether :func:`fused_add_norm` knows this norm (a fusednorm drop-in over one dimension)."""
    return isinstance(norm, (HFRMSNorm, LayerNorm, RMSNorm)) and (
        isinstance(norm, HFRMSNorm) or len(norm.normalized_shape) == 1)


def _fsdp_managed(module: nn.Module) -> bool:
    """A module FSDP manages: FSDP1 and FSDP2 (fully_shard) mark every module of their units for Dynamo."""
    return isinstance(module, FSDPModule) or getattr(module, "_is_fsdp_managed_module", False) is True


def weight_is_local(norm: nn.Module, x: Tensor, layer: nn.Module, owner: nn.Module) -> bool:
    """Whether ``layer`` may compute with the weight of ``norm``, which ``owner`` (another module) holds: a
    plain Parameter of x's width on x's device (not a DTensor shard, not FSDP1's flat-parameter view, not
    an offloaded weight), and neither module under FSDP (FSDP unshards a unit's parameters in its own
    pre-forward, frees them after, and reduces their gradients in its own post-backward, which a gradient
    computed in another layer's backward would miss). Under FSDP each layer keeps its own fused add only."""
    w = norm.weight
    return (isinstance(w, nn.Parameter) and not isinstance(w, DTensor) and w.device == x.device
            and w.shape == x.shape[-1:] and not _fsdp_managed(layer) and not _fsdp_managed(owner))


def fused_add_norm(norm: nn.Module, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(norm(residual + x), residual + x)`` in one fused call, with the dtypes Hugging Face's unfused
    ``residual + x`` and ``norm(...)`` give (h: promote_types(residual, x); y: the norm's rule), or None
    where that cannot be had exactly from one call (then the caller runs the two ops).

    x, residual: (..., N). norm: a fusednorm drop-in (see :func:`can_fuse`).
    """
    if not can_fuse(norm) or x.shape != residual.shape:
        return None
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    x, residual = x.to(h_dtype), residual.to(h_dtype)
    w = norm.weight
    if isinstance(norm, HFRMSNorm):
        out_dtype = hf_output_dtype(norm.out_dtype_rule, h_dtype, w.dtype)
        if out_dtype != h_dtype and torch.promote_types(h_dtype, out_dtype) == out_dtype:
            return None  # HF multiplies a rounded xhat by a wider weight: not one kernel's rounding
        if w.dtype not in (h_dtype, torch.float32):
            w = w.float()
        y, h = F.add_rms_norm(x, residual, w, norm.variance_epsilon, prenorm=True, weight_offset=norm.weight_offset)
        return (y if y.dtype == out_dtype else y.to(out_dtype)), h
    if autocast_norm_dtype(x) != h_dtype:
        return None  # CUDA autocast would compute the norm in float32 but the add in 16 bits
    if isinstance(norm, LayerNorm):
        return F.add_layer_norm(x, residual, w, norm.bias, norm.eps, prenorm=True, weight_offset=norm.weight_offset)
    if w is not None and w.dtype not in (h_dtype, torch.float32):
        w = w.to(torch.float64 if h_dtype == torch.float64 else torch.float32)
    return F.add_rms_norm(x, residual, w, norm.eps, prenorm=True, weight_offset=norm.weight_offset)
