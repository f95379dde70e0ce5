"""Call plans: what a call's checked arguments decide, cached per call signature.

Eager models repeat the same few call signatures (one per norm of a model): the argument checks, the
Variant, the resolved backend and whether the CPU path (``fusednorm.cpu_path``) takes the call are
computed once per signature and reused. Traced calls (torch.compile / torch.export) and tensor subclasses
are checked on every call (no cache; tracing pays it once).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from . import _validate, backends, cpu_path
from .variant import ScaleKind, Variant


class Plan(NamedTuple):
    """What a call's checked arguments decide (see ``lookup``)."""

    variant: Variant
    backend: str  # resolved in eager mode; as given (maybe "auto") when traced
    eps: float
    scale_value: float
    dropout_p: float
    weight_offset: float
    saved: tuple[str, ...]  # variant.saved
    bias_dtype: torch.dtype | None
    x_dtype: torch.dtype
    # The CPU path's function for this signature (cpu_path.specialize), for an eager call it computes
    # (cpu_path.usable): direct(x, residual, weight, bias, residual_scale), no autograd Function, no backend.
    direct: Callable[..., Tensor | tuple[Tensor, Tensor]] | None
    learned_scale: bool  # variant.learned_scale (a property: looked up once here)
    dresidual_is_dx: bool  # variant.dresidual_is_dx
    shape: torch.Size  # x's
    is_rows: bool  # x is 2-d: the (M, N) rows the backends take and give are x's shape (no view to make)
    # saved = pick_saved((x, residual, h, weight, residual_scale, mean, rstd, seed)) in the forward, and
    # (x, residual, h, weight, residual_scale, mean, rstd, seed) = unpack_saved(saved + (None,)) in the backward
    # (None for what is not saved): itemgetters, built once per plan.
    pick_saved: Callable[[tuple], tuple]
    unpack_saved: Callable[[tuple], tuple]
    # The backend module an eager forward on plain tensors calls directly (ops.forward's eager path, decided
    # once here); None for traced calls, tensor subclasses and meta tensors: these go through fusednorm::fwd.
    impl: ModuleType | None


SAVED_ORDER = ("x", "residual", "h", "weight", "residual_scale", "mean", "rstd", "seed")  # see Plan.pick_saved

# Eager calls repeat the same signature: its checks and Variant are computed once.
_PLANS: dict[tuple, Plan] = {}
_MAX_PLANS = 4096


def clear() -> None:
    """Forget every cached plan (after a change that the signature does not hold, e.g. in tests)."""
    _PLANS.clear()


def scale_kind(residual_scale) -> ScaleKind:
    if isinstance(residual_scale, Tensor):
        return ScaleKind.VECTOR if residual_scale.dim() == 1 else ScaleKind.SCALAR
    if residual_scale is None or float(residual_scale) == 1.0:
        return ScaleKind.NONE
    return ScaleKind.CONSTANT


def checked(is_rms: bool, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
            weight_offset, backend: str | None, store_stats: bool, compiling: bool) -> Plan:
    """Validate a call (TypeError/ValueError naming a bad argument) and describe it.

    The name is resolved ("auto" -> a backend) in eager mode; traced calls keep the name as given (the op
    resolves it when it runs), after checking here that it can run on x's device."""
    if type(x) is not Tensor and not compiling:
        _register_dtensor_rules(x)
    _validate.check_input(x)
    _validate.check_residual(residual, x)
    _validate.check_param("weight", weight, x)
    _validate.check_param("bias", bias, x)
    eps = _validate.check_eps(eps)
    _validate.check_residual_scale(residual_scale, residual, x)
    dropout_p = _validate.check_dropout_p(dropout_p)
    prenorm = _validate.check_flag("prenorm", prenorm)
    residual_in_fp32 = _validate.check_flag("residual_in_fp32", residual_in_fp32)
    weight_offset = _validate.check_weight_offset(weight_offset, weight)
    name = backends.resolve(backend, x.device)
    if compiling:
        name = backends.get_backend() if backend is None else backend
    variant = Variant.from_call(
        is_rms=is_rms, x_dtype=x.dtype, residual_dtype=residual.dtype if residual is not None else None,
        scale_kind=scale_kind(residual_scale), dropout_p=dropout_p, prenorm=prenorm,
        residual_in_fp32=residual_in_fp32, has_weight=weight is not None, has_bias=bias is not None,
        store_stats=store_stats)
    scale_value = float(residual_scale) if variant.scale_kind == ScaleKind.CONSTANT else 1.0
    direct = None
    if (not compiling and name == "torch" and type(x) is Tensor and x.device.type == "cpu" and not store_stats
            and cpu_path.usable(variant, name, x, residual, weight, bias, residual_scale, weight_offset)):
        direct = cpu_path.specialize(
            variant, x.dtype, _dtype(residual), _dtype(weight), _dtype(bias), _dtype(residual_scale), eps, scale_value,
            dropout_p, weight_offset)
    saved = variant.saved  # at least two names (h or x, and rstd): the itemgetters return tuples
    pick_saved = operator.itemgetter(*(SAVED_ORDER.index(name) for name in saved))
    unpack_saved = operator.itemgetter(*(saved.index(name) if name in saved else -1 for name in SAVED_ORDER))
    eager = not compiling and type(x) is Tensor and not x.is_meta and name in backends.BACKENDS
    return Plan(variant, name, eps, scale_value, dropout_p, weight_offset, saved,
                bias.dtype if bias is not None else None, x.dtype, direct,
                variant.learned_scale, variant.dresidual_is_dx,
                x.shape, x.dim() == 2, pick_saved,
                unpack_saved, backends.implementation(name) if eager else None)


def lookup(is_rms: bool, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
           weight_offset, backend: str | None, store_stats: bool, compiling: bool) -> Plan:
    """The plan of a call: cached per signature in eager mode, checked on every traced call.

    The signature holds everything the checks and the plan depend on; a call that is not a plain eager one
    (x not a plain tensor, unhashable arguments) gets the full checks, which raise with their exact messages
    if something is off. Each tensor goes in by its facts (type, dtype, device, shape; x's layout too), never
    by identity: a module's parameter can change dtype or device in place (module.to()). Python scalars go
    in with their types: True == 1 == 1.0 as keys, but the checks treat them differently. One flat tuple,
    built inline: each fact costs a fraction of a microsecond, and this runs on every eager call."""
    key = None
    if not compiling and type(x) is Tensor:
        try:
            key = (is_rms, x.layout, x.dtype, x.device, x.shape, eps, type(eps), weight_offset, type(weight_offset),
                   backend, backends._global_backend, store_stats,
                   None if weight is None else (type(weight), weight.dtype, weight.device, weight.shape),
                   None if bias is None else (type(bias), bias.dtype, bias.device, bias.shape))
            if (residual is not None or residual_scale is not None or type(dropout_p) is not float or dropout_p
                    or prenorm is not False or residual_in_fp32 is not False):  # add_*; others pass None, 0.0, False
                key += (dropout_p, type(dropout_p), prenorm, type(prenorm), residual_in_fp32, type(residual_in_fp32),
                        None if residual is None else (type(residual), residual.dtype, residual.device, residual.shape),
                        (type(residual_scale), residual_scale.dtype, residual_scale.device, residual_scale.shape)
                        if isinstance(residual_scale, Tensor) else ("scale", type(residual_scale), residual_scale))
            plan = _PLANS.get(key)
        except (TypeError, AttributeError, IndexError, RuntimeError):  # unhashable, not a tensor, nested: checks say
            key = plan = None
        if plan is not None:
            return plan
    plan = checked(is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                   weight_offset, backend, store_stats, compiling)
    if key is not None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _dtype(t) -> torch.dtype | None:
    return t.dtype if isinstance(t, Tensor) else None


def _register_dtensor_rules(x) -> None:
    """DTensors reach the custom ops through sharding rules (fusednorm.distributed), registered at the
    first DTensor call so that ``import fusednorm`` never imports torch.distributed."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(x, dtensor.DTensor):
        from . import distributed

        distributed.register_sharding_rules()
