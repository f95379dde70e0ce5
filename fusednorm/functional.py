"""Autograd Functions (Apex-style drop-ins) and the public functional API.

Each Function validates its arguments, describes the call as a ``Variant``, flattens the leading
dimensions to (M, N) rows and runs the custom ops of ``fusednorm.ops``. It saves exactly
``variant.saved`` (DESIGN section 5: h, or x and the residual to rebuild it; the residual beside h
for a learned scale in the Pre-LN layout; the parameters the backward reads; per-row float32
mean/rstd; the dropout seed), never a dropout mask.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar

import torch
from torch import Tensor

from . import _validate, backends, ops
from .backends.contract import BackwardArgs, ForwardArgs, compute_dtype
from .dropout import draw_seed
from .variant import ScaleKind, Variant

ResidualScale = float | Tensor | None

# Telemetry hook (fusednorm.monitor; DESIGN section 7). While a monitor sets it around a module's call, the
# forward asks the kernels for the row statistics (Variant.store_stats) and hands them to this callable:
# sink(stats: (M, 8) float32, N). None (the default): nothing is asked or computed. Compiled regions never
# ask: torch.compile traces every call with the flag off.
stats_sink: ContextVar[Callable[[Tensor, int], None] | None] = ContextVar("fusednorm_stats_sink", default=None)


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N) with unit stride along N; at most one copy."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _unit_stride(p: Tensor | None) -> Tensor | None:
    """A (N,) or 0-d parameter with unit stride (a copy only when it is a strided view)."""
    return p.contiguous() if p is not None else None


def _scale_kind(residual_scale: ResidualScale) -> ScaleKind:
    if isinstance(residual_scale, Tensor):
        return ScaleKind.VECTOR if residual_scale.dim() == 1 else ScaleKind.SCALAR
    if residual_scale is None or float(residual_scale) == 1.0:
        return ScaleKind.NONE
    return ScaleKind.CONSTANT


def _norm_forward(ctx, is_rms: bool, x: Tensor, residual: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None, eps, residual_scale: ResidualScale, dropout_p, prenorm,
                  residual_in_fp32, weight_offset, backend: str | None):
    if type(x) is not Tensor and not torch.compiler.is_compiling():
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
    sink = None if torch.compiler.is_compiling() else stats_sink.get()

    variant = Variant.from_call(
        is_rms=is_rms, x_dtype=x.dtype, residual_dtype=residual.dtype if residual is not None else None,
        scale_kind=_scale_kind(residual_scale), dropout_p=dropout_p, prenorm=prenorm,
        residual_in_fp32=residual_in_fp32, has_weight=weight is not None, has_bias=bias is not None,
        store_stats=sink is not None)
    # Kernels index the (N,) parameters with unit stride: a strided view (w[::2], a column of a
    # matrix) is copied once here (N elements) instead of being read with the wrong stride.
    args = ForwardArgs(
        x=_rows(x), residual=_rows(residual) if residual is not None else None, weight=_unit_stride(weight),
        bias=_unit_stride(bias),
        residual_scale=_unit_stride(residual_scale) if variant.learned_scale else None,
        seed=draw_seed(x.device) if variant.has_dropout else None, eps=eps,
        scale_value=float(residual_scale) if variant.scale_kind == ScaleKind.CONSTANT else 1.0,
        dropout_p=dropout_p, weight_offset=weight_offset)
    out = ops.forward(variant, args, name)
    if sink is not None:
        sink(out.stats, args.x.shape[-1])

    available = dict(x=args.x, residual=args.residual, h=out.h, weight=args.weight,
                     residual_scale=args.residual_scale, mean=out.mean, rstd=out.rstd, seed=args.seed)
    ctx.save_for_backward(*(available[k] for k in variant.saved))
    ctx.set_materialize_grads(False)
    ctx.fusednorm = dict(variant=variant, backend=name, x_shape=x.shape, x_dtype=x.dtype, scale_value=args.scale_value,
                         dropout_p=dropout_p, weight_offset=weight_offset,
                         bias_dtype=bias.dtype if bias is not None else None)
    y = _as_output(out.y, x.shape)
    if prenorm:
        return y, _as_output(out.h, x.shape)
    return y


def _register_dtensor_rules(x) -> None:
    """DTensors reach the custom ops through sharding rules (fusednorm.distributed), registered at the
    first DTensor call so that ``import fusednorm`` never imports torch.distributed."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(x, dtensor.DTensor):
        from . import distributed

        distributed.register_sharding_rules()


def _as_output(t: Tensor, shape: torch.Size) -> Tensor:
    """An (M, N) result in x's shape, returned as a tensor of its own rather than an autograd view of a
    tensor made in the forward: autograd forbids in-place changes of such views, while callers may
    modify torch.nn.functional.layer_norm's result in place (y.mul_(), Dropout(inplace=True)). The
    storage and version counter stay shared, so changing a saved h in place still fails the backward."""
    return t.view(shape).detach()


def _norm_backward(ctx, dy: Tensor | None, dh_in: Tensor | None = None) -> dict[str, Tensor | None]:
    """Gradients by argument name; the caller orders them for its own forward signature."""
    meta = ctx.fusednorm
    variant: Variant = meta["variant"]
    saved = dict(zip(variant.saved, ctx.saved_tensors, strict=True))
    shape = meta["x_shape"]
    if dy is None:  # only h got a gradient; zeros_like keeps dh_in's DTensor placement, if it has one
        dy = (torch.zeros_like(dh_in, dtype=meta["x_dtype"]) if dh_in is not None
              else torch.zeros(shape, dtype=meta["x_dtype"], device=saved["rstd"].device))
    args = BackwardArgs(
        dy=_rows(dy), mean=saved.get("mean", saved["rstd"].new_empty((0,))), rstd=saved["rstd"],
        dh_in=_rows(dh_in) if dh_in is not None else None, x=saved.get("x"), residual=saved.get("residual"),
        h=saved.get("h"), weight=saved.get("weight"), residual_scale=saved.get("residual_scale"),
        seed=saved.get("seed"), bias_dtype=meta["bias_dtype"], scale_value=meta["scale_value"],
        dropout_p=meta["dropout_p"], weight_offset=meta["weight_offset"])
    grads = ops.backward(variant, args, meta["backend"])
    dx = grads.dx.view(shape)
    if not variant.has_residual:
        dresidual = None
    elif variant.dresidual_is_dx:
        dresidual = dx  # the backend wrote dh once; both inputs get it
    else:
        dresidual = grads.dresidual.view(shape)
    return dict(x=dx, residual=dresidual, weight=grads.dweight if variant.has_weight else None,
                bias=grads.dbias if meta["bias_dtype"] is not None else None,
                residual_scale=grads.dscale if variant.learned_scale else None)


def _ordered(ctx, grads: dict, names: tuple[str, ...]) -> tuple:
    """One gradient per forward argument, the first ones named by ``names`` in the forward's order
    (None where an argument is not a tensor, needs no grad, or is not named)."""
    names = names + ("",) * (len(ctx.needs_input_grad) - len(names))
    return tuple(grads.get(name) if needed else None for name, needed in zip(names, ctx.needs_input_grad, strict=True))


class LayerNormFunction(torch.autograd.Function):
    """``LayerNormFunction.apply(x, weight=None, bias=None, eps=1e-5[, weight_offset, backend])`` -> y."""

    @staticmethod
    def forward(ctx, x, weight=None, bias=None, eps=1e-5, weight_offset=0.0, backend=None):
        return _norm_forward(ctx, False, x, None, weight, bias, eps, None, 0.0, False, False, weight_offset, backend)

    @staticmethod
    def backward(ctx, dy):
        return _ordered(ctx, _norm_backward(ctx, dy), ("x", "weight", "bias"))


class RMSNormFunction(torch.autograd.Function):
    """``RMSNormFunction.apply(x, weight=None, eps=1e-6[, weight_offset, backend])`` -> y."""

    @staticmethod
    def forward(ctx, x, weight=None, eps=1e-6, weight_offset=0.0, backend=None):
        return _norm_forward(ctx, True, x, None, weight, None, _rms_eps(eps, x), None, 0.0, False, False,
                             weight_offset, backend)

    @staticmethod
    def backward(ctx, dy):
        return _ordered(ctx, _norm_backward(ctx, dy), ("x", "weight"))


class AddLayerNormFunction(torch.autograd.Function):
    """``AddLayerNormFunction.apply(x, residual, weight, bias=None, eps=1e-5, residual_scale=None,
    dropout_p=0.0, prenorm=False, residual_in_fp32=False[, weight_offset, backend])`` -> y or (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias=None, eps=1e-5, residual_scale=None, dropout_p=0.0,
                prenorm=False, residual_in_fp32=False, weight_offset=0.0, backend=None):
        return _norm_forward(ctx, False, x, residual, weight, bias, eps, residual_scale, dropout_p,
                             prenorm, residual_in_fp32, weight_offset, backend)

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        grads = _norm_backward(ctx, dy, dh_in)
        return _ordered(ctx, grads, ("x", "residual", "weight", "bias", "", "residual_scale"))


class AddRMSNormFunction(torch.autograd.Function):
    """``AddRMSNormFunction.apply(x, residual, weight, eps=1e-6, residual_scale=None, dropout_p=0.0,
    prenorm=False, residual_in_fp32=False[, weight_offset, backend])`` -> y or (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps=1e-6, residual_scale=None, dropout_p=0.0, prenorm=False,
                residual_in_fp32=False, weight_offset=0.0, backend=None):
        return _norm_forward(ctx, True, x, residual, weight, None, _rms_eps(eps, x), residual_scale,
                             dropout_p, prenorm, residual_in_fp32, weight_offset, backend)

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        grads = _norm_backward(ctx, dy, dh_in)
        return _ordered(ctx, grads, ("x", "residual", "weight", "", "residual_scale"))


def _rms_eps(eps, x):
    """eps=None means the machine epsilon of the dtype torch computes in, as torch.nn.RMSNorm does:
    float32's for 16-bit and 32-bit x (torch upcasts first), float64's for float64 x."""
    if eps is None and isinstance(x, Tensor) and x.is_floating_point():
        return torch.finfo(compute_dtype(x.dtype)).eps
    return eps


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
               *, weight_offset: float = 0.0, backend: str | None = None) -> Tensor:
    """LayerNorm over the last dimension with float32 statistics.

    x: (..., N) float16/bfloat16/float32/float64. weight, bias: (N,) in x's dtype or float32, or None.
    weight_offset: the affine weight is (weight + weight_offset), summed in float32 (Gemma's (1 + w)).
    Returns y: x's shape and dtype. backend: "auto", "torch", "triton", "cuda" or None (the global
    choice, see ``fusednorm.set_backend``). Raises TypeError/ValueError naming a bad argument.
    """
    return LayerNormFunction.apply(x, weight, bias, eps, weight_offset, backend)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float | None = 1e-6, *, weight_offset: float = 0.0,
             backend: str | None = None) -> Tensor:
    """RMSNorm over the last dimension: y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset).

    x: (..., N); weight: (N,) or None; eps=None uses the epsilon torch.nn.RMSNorm uses (float32's for
    16/32-bit x, float64's for float64 x).
    Returns y: x's shape and dtype.
    """
    return RMSNormFunction.apply(x, weight, eps, weight_offset, backend)


def add_layer_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None = None,
                   eps: float = 1e-5, *, residual_scale: ResidualScale = None, dropout_p: float = 0.0,
                   prenorm: bool = False, residual_in_fp32: bool = False, weight_offset: float = 0.0,
                   backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Fused h = residual * residual_scale + dropout(x); y = LayerNorm(h).

    x, residual: (..., N), same shape; residual in x's dtype or float32 (None: h = dropout(x)).
    residual_scale: None (1), a Python float (constant, DeepNorm's alpha) or a 0-d / (N,) tensor
    (learned, Admin's omega; it gets a gradient). dropout_p in [0, 1) applies dropout to x.
    Returns y (x's dtype), or (y, h) with prenorm=True; h is float32 with residual_in_fp32=True,
    else residual's dtype.
    """
    return AddLayerNormFunction.apply(x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm,
                                      residual_in_fp32, weight_offset, backend)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, eps: float | None = 1e-6, *,
                 residual_scale: ResidualScale = None, dropout_p: float = 0.0, prenorm: bool = False,
                 residual_in_fp32: bool = False, weight_offset: float = 0.0,
                 backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Fused h = residual * residual_scale + dropout(x); y = RMSNorm(h). Arguments as add_layer_norm."""
    return AddRMSNormFunction.apply(x, residual, weight, eps, residual_scale, dropout_p, prenorm,
                                    residual_in_fp32, weight_offset, backend)
