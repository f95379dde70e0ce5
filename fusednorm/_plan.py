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
    # x (and the residual) are (M, N) rows with unit stride along N, and the (N,) parameters (and a learned
    # scale) are contiguous: the backend takes them as given, nothing to check or view per call. Decided for
    # eager calls only: a cached plan serves only tensors of the same sizes and strides (``_facts_check``).
    as_given: bool


SAVED_ORDER = ("x", "residual", "h", "weight", "residual_scale", "mean", "rstd", "seed")  # see Plan.pick_saved

# Eager calls repeat the same signature: its checks and Variant are computed once. Key (see ``lookup``): the
# scalars, the tensors' types and x's shape; value: (check of the tensors' facts, plan) pairs, newest last.
_PLANS: dict[tuple, list[tuple[Callable[..., bool], Plan]]] = {}
_MAX_PLANS = 4096
_MAX_PLANS_PER_KEY = 8  # e.g. the same call with and without requires_grad, under autocast or inference_mode
# Stand for absent tensor arguments in a facts check (which takes tensors only); one per argument, because torch's
# tensor guard rejects a tensor given twice.
_NO_RESIDUAL, _NO_WEIGHT, _NO_BIAS, _NO_SCALE = (torch.empty(0) for _ in range(4))


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
                unpack_saved, backends.implementation(name) if eager else None,
                not compiling and _as_rows(x) and (residual is None or _as_rows(residual))
                and all(t is None or t.is_contiguous() for t in (weight, bias))
                and (not variant.learned_scale or residual_scale.is_contiguous()))


def _as_rows(t: Tensor) -> bool:
    """Whether functional._rows(t) is t itself: 2-d with unit stride along N (or contiguous: N == 1)."""
    return t.dim() == 2 and (t.stride(-1) == 1 or t.is_contiguous())


def lookup(is_rms: bool, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
           weight_offset, backend: str | None, store_stats: bool, compiling: bool) -> Plan:
    """The plan of a call: cached per signature in eager mode, checked on every traced call.

    The signature holds everything the checks and the plan depend on; a call that is not a plain eager one
    (x not a plain tensor, unhashable arguments) gets the full checks, which raise with their exact messages
    if something is off. Each tensor goes in by its facts, never by identity: a module's parameter can change
    dtype or device in place (module.to()). Python scalars go in with their types: True == 1 == 1.0 as keys,
    but the checks treat them differently.

    The facts are split in two, because reading them is what costs (each tensor attribute read builds a Python
    object, ~50 ns): the dict key holds the scalars, the tensors' Python types and x's shape; the tensors'
    dtypes, devices, sizes, strides and layouts are compared by one check per cached plan (``_facts_check``:
    one C++ call for all of them, where available)."""
    if compiling:
        return checked(is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                       weight_offset, backend, store_stats, compiling)
    if (residual is None and residual_scale is None and type(dropout_p) is float and not dropout_p
            and prenorm is False and residual_in_fp32 is False):  # an add_* call without a residual: a norm's
        return lookup_norm(is_rms, x, weight, bias, eps, weight_offset, backend, store_stats)
    key = facts = None
    if type(x) is Tensor:
        try:
            # isinstance(_, Tensor) runs torch's metaclass check in Python (~90 ns): None and floats skip it
            scale_is_tensor = (residual_scale is not None and type(residual_scale) is not float
                               and isinstance(residual_scale, Tensor))
            key = (is_rms, x.shape, eps, type(eps), weight_offset, type(weight_offset), backend,
                   backends._global_backend, store_stats, type(weight), type(bias), dropout_p, type(dropout_p),
                   prenorm, type(prenorm), residual_in_fp32, type(residual_in_fp32), type(residual),
                   type(residual_scale), None if scale_is_tensor else residual_scale)
            facts = (x, _NO_RESIDUAL if residual is None else residual, _NO_WEIGHT if weight is None else weight,
                     _NO_BIAS if bias is None else bias, residual_scale if scale_is_tensor else _NO_SCALE)
            for same_facts, plan in _PLANS.get(key, ()):
                if same_facts(*facts):
                    return plan
        except (TypeError, AttributeError, IndexError, RuntimeError):  # unhashable, not a tensor, nested: checks say
            key = None
    return _checked_and_cached(key, facts, is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p,
                               prenorm, residual_in_fp32, weight_offset, backend, store_stats)


def lookup_norm(is_rms: bool, x, weight, bias, eps, weight_offset, backend: str | None, store_stats: bool) -> Plan:
    """``lookup`` of an eager call without a residual, scale or dropout (layer_norm / rms_norm): fewer
    arguments and conditions on the most frequent call."""
    key = facts = None
    if type(x) is Tensor:
        try:
            key = (is_rms, x.shape, eps, type(eps), weight_offset, type(weight_offset), backend,
                   backends._global_backend, store_stats, type(weight), type(bias))
            facts = (x, _NO_WEIGHT if weight is None else weight, _NO_BIAS if bias is None else bias)
            for same_facts, plan in _PLANS.get(key, ()):
                if same_facts(*facts):
                    return plan
        except (TypeError, AttributeError, IndexError, RuntimeError):  # unhashable, not a tensor, nested: checks say
            key = None
    return _checked_and_cached(key, facts, is_rms, x, None, weight, bias, eps, None, 0.0, False, False,
                               weight_offset, backend, store_stats)


def _checked_and_cached(key, facts, is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm,
                        residual_in_fp32, weight_offset, backend, store_stats) -> Plan:
    """The checked plan of an eager call that missed the cache, cached under ``key`` (None: not cacheable)
    with the check of its tensors' ``facts``."""
    plan = checked(is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                   weight_offset, backend, store_stats, False)
    same_facts = _facts_check(facts) if key is not None else None
    if same_facts is not None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        entries = _PLANS.setdefault(key, [])
        if len(entries) >= _MAX_PLANS_PER_KEY:
            del entries[0]
        entries.append((same_facts, plan))
    return plan


def _facts_check(tensors: tuple[Tensor, ...]) -> Callable[..., bool] | None:
    """``check(*others) -> bool``: whether ``others`` (as many tensors, in the same order) have the facts of
    ``tensors`` that a plan depends on: dtype, device, sizes, strides and layout (torch's check below also
    keeps the plans of calls with and without requires_grad apart: harmless). With torch's C++ tensor
    guard (``torch._C._dynamo.guards.TensorGuards``, what torch.compile checks its graphs' inputs with:
    dispatch keys, which hold the device type and layout, device index, dtype, sizes, strides, requires_grad)
    one call checks all of them at about the cost of reading two tensor attributes in Python. That is a
    private API: it is used only when ``_tensor_guards_work()`` passed at import, else the facts are read
    and compared in Python. None when neither can describe the tensors."""
    if _TensorGuards is not None:
        try:
            check = _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                  dynamic_dims_strides=[list(t.stride()) for t in tensors]).check
            # It also rejects one tensor given twice (add_layer_norm(x, x, w)): such calls get the Python check.
            if check(*tensors):
                return check
        except (TypeError, RuntimeError, ValueError):
            pass
    try:
        expected = _facts(tensors)
    except (TypeError, AttributeError, RuntimeError):
        return None
    return lambda *others: _facts(others) == expected


def _facts(tensors: tuple[Tensor, ...]) -> list:
    # stride() raises for the layouts without strides (sparse): lookup then takes the full checks, which reject them
    return [(t.dtype, t.device, t.shape, t.stride()) for t in tensors]


def _tensor_guards_work() -> bool:
    """Whether torch's tensor guard exists and tells apart everything ``_facts_check`` promises (checked once, at
    import: a private API may change between torch versions)."""
    try:
        a = torch.zeros(2, 3)
        check = _TensorGuards(a, dynamic_dims_sizes=[[2, 3]], dynamic_dims_strides=[[3, 1]]).check
        return (check(torch.ones(2, 3)) and not check(torch.ones(3, 2).t()) and not check(torch.ones(2, 6)[:, ::2])
                and not check(torch.ones(2, 4))
                and not check(torch.ones(3, 2)) and not check(torch.ones(2, 3, 1))
                and not check(torch.ones(2, 3, dtype=torch.float64)) and not check(torch.ones(2, 3, device="meta"))
                and not check(torch.ones(2, 3).to_sparse()) and not check(torch.ones(2, 3, requires_grad=True)))
    except Exception:  # noqa: BLE001 -- any failure means: do not use it
        return False


try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover -- torch builds without dynamo
    _TensorGuards = None
if _TensorGuards is not None and not _tensor_guards_work():
    _TensorGuards = None


def _dtype(t) -> torch.dtype | None:
    return t.dtype if isinstance(t, Tensor) else None


def _register_dtensor_rules(x) -> None:
    """DTensors reach the custom ops through sharding rules (fusednorm.distributed), registered at the
    first DTensor call so that ``import fusednorm`` never imports torch.distributed."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(x, dtensor.DTensor):
        from . import distributed

        distributed.register_sharding_rules()
