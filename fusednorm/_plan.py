"""Call plans: what a call's checked arguments decide, cached per call signature.

Eager models repeat the same few call signatures (one per norm of a model): the argument checks, the
Variant, the resolved backend and whether the CPU path (``fusednorm.cpu_path``) takes the call are
computed once per signature and reused. Traced calls (torch.compile / torch.export) and tensor subclasses
are checked on every call (no cache; tracing pays it once).
"""

from __future__ import annotations

import sys
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
    direct: bool  # an eager call the CPU path computes (cpu_path.usable): no autograd Function, no backend


# Eager calls repeat the same signature: its checks and Variant are computed once.
_PLANS: dict[tuple, Plan] = {}
_MAX_PLANS = 4096


def clear() -> None:
    """Forget every cached plan (after a change that the signature does not hold, e.g. in tests)."""
    _PLANS.clear()


def _tensor_signature(t) -> tuple | None:
    return None if t is None else (type(t), t.layout, t.dtype, t.device, t.shape)


def _signature(is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
               weight_offset, backend, store_stats) -> tuple | None:
    """Everything the checks and the plan depend on, as a hashable key; None when the call is not a plain
    eager one (the full checks then run, and raise with their exact messages if something is off). Python
    scalars go in with their types: True == 1.0 as keys, but the checks treat them differently."""
    if type(x) is not Tensor:
        return None
    scale = _tensor_signature(residual_scale) if isinstance(residual_scale, Tensor) else (
        type(residual_scale), residual_scale)
    return (is_rms, x.layout, x.dtype, x.device, x.shape, _tensor_signature(residual), _tensor_signature(weight),
            _tensor_signature(bias), scale, type(eps), eps, type(dropout_p), dropout_p, prenorm, type(prenorm),
            residual_in_fp32, type(residual_in_fp32), type(weight_offset), weight_offset, backend,
            backends.get_backend(), store_stats)


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
    direct = (not compiling and name == "torch" and type(x) is Tensor and x.device.type == "cpu" and not store_stats
              and cpu_path.usable(variant, name, x, residual, weight, bias, residual_scale, weight_offset))
    return Plan(variant, name, eps, scale_value, dropout_p, weight_offset, variant.saved,
                bias.dtype if bias is not None else None, x.dtype, bool(direct))


def lookup(is_rms: bool, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
           weight_offset, backend: str | None, store_stats: bool, compiling: bool) -> Plan:
    """The plan of a call: cached per signature in eager mode, checked on every traced call."""
    call = (is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
            weight_offset, backend, store_stats)
    if compiling:
        return checked(*call, True)
    try:
        key = _signature(*call)
        plan = _PLANS.get(key) if key is not None else None
    except (TypeError, AttributeError, IndexError, RuntimeError):  # unhashable, not a tensor, nested: the checks say so
        key = plan = None
    if plan is None:
        plan = checked(*call, False)
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def _register_dtensor_rules(x) -> None:
    """DTensors reach the custom ops through sharding rules (fusednorm.distributed), registered at the
    first DTensor call so that ``import fusednorm`` never imports torch.distributed."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(x, dtensor.DTensor):
        from . import distributed

        distributed.register_sharding_rules()
