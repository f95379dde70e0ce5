"""Autograd Functions (Apex-style drop-ins) and the public functional API.

Each Function validates its arguments, describes the call as a ``Variant``, flattens the leading
dimensions to (M, N) rows and runs the custom ops of ``fusednorm.ops``. It saves exactly
``variant.saved`` (DESIGN section 5: h, or x and the residual to rebuild it; the residual beside h
for a learned scale in the Pre-LN layout; the parameters the backward reads; per-row float32
mean/rstd; the dropout seed), never a dropout mask.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import torch
from torch import Tensor

from . import _plan, cpu_path, ops
from .backends.contract import BackwardArgs, ForwardArgs, compute_dtype
from .dropout import draw_seed
from .variant import Variant

ResidualScale = float | Tensor | None

# Telemetry hook (fusednorm.monitor; DESIGN section 7). While a monitor sets it around a module's call, the
# forward asks the kernels for the row statistics (Variant.store_stats) and hands them to this callable:
# sink(stats: (M, 8) float32, N). None (the default): nothing is asked or computed. Compiled regions never
# ask: torch.compile traces every call with the flag off.
stats_sink: ContextVar[Callable[[Tensor, int], None] | None] = ContextVar("fusednorm_stats_sink", default=None)


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N) with unit stride along N; at most one copy (none, and no view, for a 2-d input)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _rows_or_none(t: Tensor | None) -> Tensor | None:
    return _rows(t) if t is not None else None


def _unit_stride(p: Tensor | None) -> Tensor | None:
    """A (N,) or 0-d parameter with unit stride (a copy only when it is a strided view)."""
    return p.contiguous() if p is not None else None


def _forward_args(plan: _plan.Plan, x: Tensor, residual: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None, residual_scale: ResidualScale) -> ForwardArgs:
    """The backend's arguments as (M, N) rows."""
    # Kernels index the (N,) parameters with unit stride: a strided view (w[::2], a column of a
    # matrix) is copied once here (N elements) instead of being read with the wrong stride.
    variant = plan.variant
    return ForwardArgs(
        x=_rows(x), residual=_rows(residual) if residual is not None else None, weight=_unit_stride(weight),
        bias=_unit_stride(bias), residual_scale=_unit_stride(residual_scale) if variant.learned_scale else None,
        seed=draw_seed(x.device) if variant.has_dropout else None, eps=plan.eps, scale_value=plan.scale_value,
        dropout_p=plan.dropout_p, weight_offset=plan.weight_offset)


def _traced_call(is_rms: bool, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                 weight_offset, backend):
    """Under torch.compile / torch.export: ``fusednorm::fwd`` with its own autograd formula, no autograd
    Function around it (what an exported program keeps; the backend name stays as given, "auto" included)."""
    plan = _plan.lookup(is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm,
                        residual_in_fp32, weight_offset, backend, False, True)
    args = _forward_args(plan, x, residual, weight, bias, residual_scale)
    variant = plan.variant
    out = ops.fwd(args.x, args.residual, args.weight, args.bias, args.residual_scale, args.seed, variant.flags,
                  args.eps, args.scale_value, args.dropout_p, args.weight_offset, plan.backend)
    y = out[0].view(x.shape)
    return (y, out[1].view(x.shape)) if variant.prenorm else y


def _applied_plan(is_rms: bool, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm,
                  residual_in_fp32, weight_offset, backend) -> _plan.Plan:
    """The plan of a Function applied directly (``LayerNormFunction.apply(...)``, also under torch.compile)."""
    compiling = torch.compiler.is_compiling()
    store_stats = not compiling and stats_sink.get() is not None
    return _plan.lookup(is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                        weight_offset, backend, store_stats, compiling)


def _eager_plan(is_rms: bool, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                weight_offset, backend) -> _plan.Plan:
    """The plan of an eager call of a public function (telemetry asked while a monitor is active)."""
    _eager_checks()
    return _plan.lookup(is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                        weight_offset, backend, stats_sink.get() is not None, False)


def _direct(plan: _plan.Plan, x, residual, weight, bias, residual_scale):
    """The CPU path's result (``fusednorm.cpu_path``; autograd records ATen's own ops)."""
    if plan.weight_offset != 0.0:  # the affine weight is (weight + weight_offset): cpu_path sums it in float32
        return cpu_path.call(plan.variant, x, residual, weight, bias, residual_scale, plan.eps, plan.scale_value,
                             plan.dropout_p, weight_offset=plan.weight_offset)
    return cpu_path.call(plan.variant, x, residual, weight, bias, residual_scale, plan.eps, plan.scale_value,
                         plan.dropout_p)


def _norm_forward(ctx, plan: _plan.Plan, x: Tensor, residual: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None, residual_scale: ResidualScale):
    """The eager forward; ``ctx`` None: no autograd (nothing is saved)."""
    sink = stats_sink.get() if plan.variant.store_stats else None
    args = _forward_args(plan, x, residual, weight, bias, residual_scale)
    out = ops.forward(plan.variant, args, plan.backend)
    if sink is not None:
        sink(out.stats, args.x.shape[-1])
    if ctx is not None:
        ctx.save_for_backward(*(_saved_tensor(name, args, out, x, residual) for name in plan.saved))
        ctx.set_materialize_grads(False)
        ctx.fusednorm = (plan, x.shape)
    y = _as_output(out.y, x.shape)
    if plan.variant.prenorm:
        return y, _as_output(out.h, x.shape)
    return y


def _saved_tensor(name: str, args: ForwardArgs, out, x: Tensor, residual: Tensor | None) -> Tensor:
    """One of ``Variant.saved``: an output of the forward kernel or one of its arguments. x and the residual
    are saved as the caller gave them, not as the (M, N) views made here under no_grad: changing them in
    place before the backward then fails with autograd's "modified by an inplace operation" (a view made
    in no_grad mode would fail with a message about views instead); the backward takes the rows again."""
    if name in ("h", "mean", "rstd"):
        return getattr(out, name)
    if name == "x":
        return x
    if name == "residual":
        return residual
    return getattr(args, name)


def _as_output(t: Tensor, shape: torch.Size) -> Tensor:
    """An (M, N) result in x's shape, returned as a tensor of its own rather than an autograd view of a
    tensor made in the forward: autograd forbids in-place changes of such views, while callers may
    modify torch.nn.functional.layer_norm's result in place (y.mul_(), Dropout(inplace=True)). The
    storage and version counter stay shared, so changing a saved h in place still fails the backward."""
    return t if t.shape == shape else t.view(shape).detach()


def _norm_backward(ctx, dy: Tensor | None, dh_in: Tensor | None = None) -> dict[str, Tensor | None]:
    """Gradients by argument name; the caller orders them for its own forward signature."""
    plan, shape = ctx.fusednorm
    variant: Variant = plan.variant
    saved = dict(zip(plan.saved, ctx.saved_tensors, strict=True))
    y_unused = dy is None
    if y_unused:  # only h got a gradient; zeros_like keeps dh_in's DTensor placement, if it has one
        dy = (torch.zeros_like(dh_in, dtype=plan.x_dtype) if dh_in is not None
              else torch.zeros(shape, dtype=plan.x_dtype, device=saved["rstd"].device))
    args = BackwardArgs(
        dy=_rows(dy), mean=saved.get("mean", saved["rstd"].new_empty((0,))), rstd=saved["rstd"],
        dh_in=_rows(dh_in) if dh_in is not None else None, x=_rows_or_none(saved.get("x")),
        residual=_rows_or_none(saved.get("residual")),
        h=saved.get("h"), weight=saved.get("weight"), residual_scale=saved.get("residual_scale"),
        seed=saved.get("seed"), bias_dtype=plan.bias_dtype, scale_value=plan.scale_value,
        dropout_p=plan.dropout_p, weight_offset=plan.weight_offset)
    with torch.no_grad():
        grads = ops.backward(variant, args, plan.backend)
    dx = _as_output(grads.dx, shape)
    if not variant.has_residual:
        dresidual = None
    elif variant.dresidual_is_dx:
        dresidual = dx  # the backend wrote dh once; both inputs get it
    else:
        dresidual = _as_output(grads.dresidual, shape)
    # y unused (a Pre-LN call whose caller only reads h): weight and bias take no part in h, so they get no
    # gradient (None, as eager autograd gives), not a zero one that weight decay would then act on.
    return dict(x=dx, residual=dresidual, weight=grads.dweight if variant.has_weight and not y_unused else None,
                bias=grads.dbias if plan.bias_dtype is not None and not y_unused else None,
                residual_scale=grads.dscale if variant.learned_scale else None)


def _ordered(ctx, grads: dict, names: tuple[str, ...]) -> tuple:
    """One gradient per forward argument, the first ones named by ``names`` in the forward's order
    (None where an argument is not a tensor, needs no grad, or is not named)."""
    names = names + ("",) * (len(ctx.needs_input_grad) - len(names))
    result = tuple(grads.get(name) if needed else None
                   for name, needed in zip(names, ctx.needs_input_grad, strict=True))
    return _not_differentiable_again(result)


def _not_differentiable_again(grads: tuple) -> tuple:
    """With create_graph=True, gradients whose own backward raises a clear error: the backward kernels have
    no derivative (the torch backend's ops would otherwise record a partial, wrong one)."""
    _eager_checks()
    if not torch.is_grad_enabled():
        return grads
    present = [g for g in grads if g is not None]
    error = torch._C._functions.DelayedError(ops.DOUBLE_BACKWARD_MESSAGE, len(present))
    marked = iter(error(*[g.detach().requires_grad_(True) for g in present]))
    return tuple(next(marked) if g is not None else None for g in grads)


class LayerNormFunction(torch.autograd.Function):
    """``LayerNormFunction.apply(x, weight=None, bias=None, eps=1e-5[, weight_offset, backend])`` -> y."""

    @staticmethod
    def forward(ctx, x, weight=None, bias=None, eps=1e-5, weight_offset=0.0, backend=None, plan=None):
        if plan is None:
            plan = _applied_plan(False, x, None, weight, bias, eps, None, 0.0, False, False, weight_offset, backend)
        return _norm_forward(ctx, plan, x, None, weight, bias, None)

    @staticmethod
    def backward(ctx, dy):
        return _ordered(ctx, _norm_backward(ctx, dy), ("x", "weight", "bias"))


class RMSNormFunction(torch.autograd.Function):
    """``RMSNormFunction.apply(x, weight=None, eps=1e-6[, weight_offset, backend])`` -> y."""

    @staticmethod
    def forward(ctx, x, weight=None, eps=1e-6, weight_offset=0.0, backend=None, plan=None):
        if plan is None:
            plan = _applied_plan(True, x, None, weight, None, _rms_eps(eps, x), None, 0.0, False, False,
                                 weight_offset, backend)
        return _norm_forward(ctx, plan, x, None, weight, None, None)

    @staticmethod
    def backward(ctx, dy):
        return _ordered(ctx, _norm_backward(ctx, dy), ("x", "weight"))


class AddLayerNormFunction(torch.autograd.Function):
    """``AddLayerNormFunction.apply(x, residual, weight, bias=None, eps=1e-5, residual_scale=None,
    dropout_p=0.0, prenorm=False, residual_in_fp32=False[, weight_offset, backend])`` -> y or (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias=None, eps=1e-5, residual_scale=None, dropout_p=0.0,
                prenorm=False, residual_in_fp32=False, weight_offset=0.0, backend=None, plan=None):
        if plan is None:
            plan = _applied_plan(False, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm,
                                 residual_in_fp32, weight_offset, backend)
        return _norm_forward(ctx, plan, x, residual, weight, bias, residual_scale)

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        grads = _norm_backward(ctx, dy, dh_in)
        return _ordered(ctx, grads, ("x", "residual", "weight", "bias", "", "residual_scale"))


class AddRMSNormFunction(torch.autograd.Function):
    """``AddRMSNormFunction.apply(x, residual, weight, eps=1e-6, residual_scale=None, dropout_p=0.0,
    prenorm=False, residual_in_fp32=False[, weight_offset, backend])`` -> y or (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps=1e-6, residual_scale=None, dropout_p=0.0, prenorm=False,
                residual_in_fp32=False, weight_offset=0.0, backend=None, plan=None):
        if plan is None:
            plan = _applied_plan(True, x, residual, weight, None, _rms_eps(eps, x), residual_scale, dropout_p,
                                 prenorm, residual_in_fp32, weight_offset, backend)
        return _norm_forward(ctx, plan, x, residual, weight, None, residual_scale)

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        grads = _norm_backward(ctx, dy, dh_in)
        return _ordered(ctx, grads, ("x", "residual", "weight", "", "residual_scale"))


FUNCTORCH_MESSAGE = ("fusednorm does not support torch.func transforms (vmap, grad, jacrev, jvp, ...): its autograd "
                     "Functions save intermediate row statistics, which these transforms cannot wrap. Call fusednorm "
                     "outside the transform, or use torch.nn.functional.layer_norm / rms_norm inside it")


def _eager_checks() -> None:
    """Raise a clear error inside a torch.func transform (autograd's own says to 'override setup_context')."""
    if torch._C._functorch.maybe_current_level() is not None:
        raise RuntimeError(FUNCTORCH_MESSAGE)


def _rms_eps(eps, x):
    """eps=None means the machine epsilon of the dtype torch computes in, as torch.nn.RMSNorm does:
    float32's for 16-bit and 32-bit x (torch upcasts first), float64's for float64 x."""
    if eps is None and isinstance(x, Tensor) and x.is_floating_point():
        return torch.finfo(compute_dtype(x.dtype)).eps
    return eps


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
               *, weight_offset: float = 0.0, backend: str | None = None) -> Tensor:
    """LayerNorm over the last dimension with float32 statistics.

    x: (..., N) float16/bfloat16/float32/float64. weight, bias: (N,) in any of those dtypes (gradients in
    their own), or None.
    weight_offset: the affine weight is (weight + weight_offset), summed in float32 (Gemma's (1 + w)).
    Returns y: x's shape and dtype. backend: "auto", "torch", "triton", "cuda" or None (the global
    choice, see ``fusednorm.set_backend``). Raises TypeError/ValueError naming a bad argument.
    """
    if torch.compiler.is_compiling():
        return _traced_call(False, x, None, weight, bias, eps, None, 0.0, False, False, weight_offset, backend)
    plan = _eager_plan(False, x, None, weight, bias, eps, None, 0.0, False, False, weight_offset, backend)
    if plan.direct:
        return _direct(plan, x, None, weight, bias, None)
    if not torch.is_grad_enabled():  # inference: no autograd Function, nothing saved
        return _norm_forward(None, plan, x, None, weight, bias, None)
    return LayerNormFunction.apply(x, weight, bias, eps, weight_offset, backend, plan)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float | None = 1e-6, *, weight_offset: float = 0.0,
             backend: str | None = None) -> Tensor:
    """RMSNorm over the last dimension: y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset).

    x: (..., N); weight: (N,) or None; eps=None uses the epsilon torch.nn.RMSNorm uses (float32's for
    16/32-bit x, float64's for float64 x).
    Returns y: x's shape and dtype.
    """
    if torch.compiler.is_compiling():
        return _traced_call(True, x, None, weight, None, _rms_eps(eps, x), None, 0.0, False, False, weight_offset,
                            backend)
    plan = _eager_plan(True, x, None, weight, None, _rms_eps(eps, x), None, 0.0, False, False, weight_offset,
                       backend)
    if plan.direct:
        return _direct(plan, x, None, weight, None, None)
    if not torch.is_grad_enabled():
        return _norm_forward(None, plan, x, None, weight, None, None)
    return RMSNormFunction.apply(x, weight, eps, weight_offset, backend, plan)


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
    if torch.compiler.is_compiling():
        return _traced_call(False, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm,
                            residual_in_fp32, weight_offset, backend)
    plan = _eager_plan(False, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                       weight_offset, backend)
    if plan.direct:
        return _direct(plan, x, residual, weight, bias, residual_scale)
    if not torch.is_grad_enabled():
        return _norm_forward(None, plan, x, residual, weight, bias, residual_scale)
    return AddLayerNormFunction.apply(x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm,
                                      residual_in_fp32, weight_offset, backend, plan)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, eps: float | None = 1e-6, *,
                 residual_scale: ResidualScale = None, dropout_p: float = 0.0, prenorm: bool = False,
                 residual_in_fp32: bool = False, weight_offset: float = 0.0,
                 backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Fused h = residual * residual_scale + dropout(x); y = RMSNorm(h). Arguments as add_layer_norm."""
    if torch.compiler.is_compiling():
        return _traced_call(True, x, residual, weight, None, _rms_eps(eps, x), residual_scale, dropout_p, prenorm,
                            residual_in_fp32, weight_offset, backend)
    plan = _eager_plan(True, x, residual, weight, None, _rms_eps(eps, x), residual_scale, dropout_p, prenorm,
                       residual_in_fp32, weight_offset, backend)
    if plan.direct:
        return _direct(plan, x, residual, weight, None, residual_scale)
    if not torch.is_grad_enabled():
        return _norm_forward(None, plan, x, residual, weight, None, residual_scale)
    return AddRMSNormFunction.apply(x, residual, weight, eps, residual_scale, dropout_p, prenorm,
                                    residual_in_fp32, weight_offset, backend, plan)
