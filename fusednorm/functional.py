"""Autograd Functions (Apex-style drop-ins) and the public functional API.

A call's arguments are checked and described once per call signature (its plan: ``fusednorm._plan``, with
the ``Variant``); the public functions hand the plan to the internal Functions ``_Norm*`` (the Apex-style
``*Function`` classes look it up themselves), which flatten the leading dimensions to (M, N) rows and run
the op layer of ``fusednorm.ops``. Every eager call pays this on the host (benchmarks/overhead.py): the
hot path avoids what costs there (keyword calls, frozen dataclasses, per-call dicts and generators). It
saves exactly
``variant.saved`` (DESIGN section 5: h, or x and the residual to rebuild it; the residual beside h
for a learned scale in the Pre-LN layout; the parameters the backward reads; per-row float32
mean/rstd; the dropout seed), never a dropout mask.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import torch
from torch import Tensor

from . import _plan, ops
from .backends.contract import BackwardArgs, ForwardArgs, compute_dtype
from .dropout import draw_seed
from .variant import Variant

ResidualScale = float | Tensor | None

# The checks every eager call makes, bound once: each dotted lookup costs on the hot path (benchmarks/overhead.py).
# torch.compile recognises these functions by identity, under any name.
_is_compiling = torch.compiler.is_compiling
_functorch_level = torch._C._functorch.maybe_current_level
_grad_enabled = torch.is_grad_enabled

# Telemetry hook (fusednorm.monitor; DESIGN section 7). While a monitor sets it around a module's call, the
# forward asks the kernels for the row statistics (Variant.store_stats) and hands them to this callable:
# sink(stats: (M, 8) float32, N). None (the default): nothing is asked or computed. Compiled regions never
# ask: torch.compile traces every call with the flag off.
stats_sink: ContextVar[Callable[[Tensor, int], None] | None] = ContextVar("fusednorm_stats_sink", default=None)


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N) with unit stride along N; at most one copy (none, and no view, for a 2-d input)."""
    if not t.is_contiguous() and t.stride(-1) != 1:  # is_contiguous first: the common answer, and the cheaper
        t = t.contiguous()
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _forward_args(plan: _plan.Plan, x: Tensor, residual: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None, residual_scale: ResidualScale) -> ForwardArgs:
    """The backend's arguments as (M, N) rows (views, or copies where the strides need them)."""
    seed = draw_seed(x.device) if plan.variant.has_dropout else None
    # Kernels index the (N,) parameters with unit stride: a strided view (w[::2], a column of a
    # matrix) is copied once here (N elements) instead of being read with the wrong stride.
    return ForwardArgs(
        _rows(x), None if residual is None else _rows(residual),
        weight.contiguous() if weight is not None else None, bias.contiguous() if bias is not None else None,
        residual_scale.contiguous() if plan.learned_scale else None, seed, plan.eps, plan.scale_value,
        plan.dropout_p, plan.weight_offset)


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


def _call(is_rms: bool, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
          weight_offset, backend):
    """A public function's call (the modules call it too): traced, or by the CPU path, or without autograd
    (nothing saved), or through the autograd Function ``_Norm``."""
    if is_rms and eps is None:
        eps = _rms_eps(eps, x)
    if _is_compiling():
        return _traced_call(is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm,
                            residual_in_fp32, weight_offset, backend)
    if _functorch_level() is not None:  # inside a torch.func transform
        raise RuntimeError(FUNCTORCH_MESSAGE)
    plan = _plan.lookup(is_rms, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                        weight_offset, backend, stats_sink.get() is not None, False)  # telemetry: a monitor is on
    direct = plan.direct
    if direct is not None:  # the CPU path (fusednorm.cpu_path): autograd records ATen's own ops
        return direct(x, residual, weight, bias, residual_scale)
    if _grad_enabled():
        if residual is None:  # fewer arguments: each costs in apply
            return _NormNoResidual.apply(plan, x, weight, bias)
        if not plan.learned_scale:  # a constant scale is in the plan
            return _NormConstantScale.apply(plan, x, weight, bias, residual)
        return _Norm.apply(plan, x, weight, bias, residual, residual_scale)
    return _norm_forward(None, plan, x, weight, bias, residual, residual_scale)


def _call_norm(is_rms: bool, x, weight, bias, eps, weight_offset, backend):
    """``_call`` of layer_norm / rms_norm and their modules (no residual, scale or dropout). Its steps repeat
    ``_call``'s with five arguments fewer at each level: on the most frequent call each argument and each extra
    frame is a visible part of the host cost (benchmarks/overhead.py)."""
    if is_rms and eps is None:
        eps = _rms_eps(eps, x)
    if _is_compiling():
        return _traced_call(is_rms, x, None, weight, bias, eps, None, 0.0, False, False, weight_offset, backend)
    if _functorch_level() is not None:  # inside a torch.func transform
        raise RuntimeError(FUNCTORCH_MESSAGE)
    plan = _plan.lookup_norm(is_rms, x, weight, bias, eps, weight_offset, backend, stats_sink.get() is not None)
    direct = plan.direct
    if direct is not None:  # the CPU path (fusednorm.cpu_path): autograd records ATen's own ops
        return direct(x, None, weight, bias, None)
    if _grad_enabled():
        return _NormNoResidual.apply(plan, x, weight, bias)
    return _norm_forward(None, plan, x, weight, bias)


def _norm_forward(ctx, plan: _plan.Plan, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  residual: Tensor | None = None, residual_scale: ResidualScale = None):
    """The eager forward; ``ctx`` None: no autograd (nothing is saved). The arguments in the order of the
    Functions' applies, the optional ones last: each Function's forward is this function itself (no extra frame)."""
    variant = plan.variant
    if plan.as_given:  # the common eager call: nothing to view or copy (the plan checked the strides)
        args = ForwardArgs(x, residual, weight, bias, residual_scale if plan.learned_scale else None,
                           draw_seed(x.device) if variant.has_dropout else None, plan.eps, plan.scale_value,
                           plan.dropout_p, plan.weight_offset)
    else:
        args = _forward_args(plan, x, residual, weight, bias, residual_scale)
    out = ops.forward(variant, args, plan.backend, plan.impl)
    if variant.store_stats:
        sink = stats_sink.get()
        if sink is not None:
            sink(out.stats, args.x.shape[-1])
    if ctx is not None:
        # x and the residual are saved as the caller gave them, not as the (M, N) views made here under
        # no_grad: changing them in place before the backward then fails with autograd's "modified by an
        # inplace operation" (a view made in no_grad mode would fail with a message about views instead).
        ctx.save_for_backward(*plan.pick_saved((x, residual, out.h, args.weight, args.residual_scale, out.mean,
                                                out.rstd, args.seed)))
        if variant.prenorm:  # a y without a gradient reaches the backward as None (not zeros)
            ctx.set_materialize_grads(False)
        ctx.fusednorm = plan
    if plan.is_rows:
        return (out.y, out.h) if variant.prenorm else out.y
    y = _as_output(out.y, x.shape)
    return (y, _as_output(out.h, x.shape)) if variant.prenorm else y


def _as_output(t: Tensor, shape: torch.Size) -> Tensor:
    """An (M, N) result in x's shape, returned as a tensor of its own rather than an autograd view of a
    tensor made in the forward: autograd forbids in-place changes of such views, while callers may
    modify torch.nn.functional.layer_norm's result in place (y.mul_(), Dropout(inplace=True)). The
    storage and version counter stay shared, so changing a saved h in place still fails the backward."""
    return t if t.shape == shape else t.view(shape).detach()


def _norm_backward(ctx, dy: Tensor | None, dh_in: Tensor | None = None) -> tuple:
    """(dx, dresidual, dweight, dbias, dscale); None where the forward has no such input or it gets none."""
    plan: _plan.Plan = ctx.fusednorm
    variant: Variant = plan.variant
    x, residual, h, weight, residual_scale, mean, rstd, seed = plan.unpack_saved(ctx.saved_tensors + (None,))
    y_unused = dy is None
    if y_unused:  # only h got a gradient; zeros_like keeps dh_in's DTensor placement, if it has one
        dy = (torch.zeros_like(dh_in, dtype=plan.x_dtype) if dh_in is not None
              else torch.zeros(plan.shape, dtype=plan.x_dtype, device=rstd.device))
    args = BackwardArgs(
        _rows(dy), mean if mean is not None else rstd.new_empty((0,)), rstd,
        _rows(dh_in) if dh_in is not None else None, _rows(x) if x is not None else None,
        _rows(residual) if residual is not None else None, h, weight, residual_scale, seed, plan.bias_dtype,
        plan.scale_value, plan.dropout_p, plan.weight_offset)
    if torch.is_grad_enabled():  # create_graph=True: the backward kernels record nothing
        with torch.no_grad():
            grads = ops.backward(variant, args, plan.backend)
    else:
        grads = ops.backward(variant, args, plan.backend)
    dx = grads.dx if plan.is_rows else _as_output(grads.dx, plan.shape)
    if not variant.has_residual:
        dresidual = None
    elif plan.dresidual_is_dx:
        dresidual = dx  # the backend wrote dh once; both inputs get it
    else:
        dresidual = grads.dresidual if plan.is_rows else _as_output(grads.dresidual, plan.shape)
    # y unused (a Pre-LN call whose caller only reads h): weight and bias take no part in h, so they get no
    # gradient (None, as eager autograd gives), not a zero one that weight decay would then act on.
    return (dx, dresidual, grads.dweight if variant.has_weight and not y_unused else None,
            grads.dbias if plan.bias_dtype is not None and not y_unused else None,
            grads.dscale if plan.learned_scale else None)


def _ordered(ctx, grads: tuple) -> tuple:
    """One gradient per forward argument (``grads`` in the forward's order, padded with None), None where an
    argument needs no grad."""
    needed = ctx.needs_input_grad
    result = tuple(g if need else None for g, need in zip(grads, needed, strict=False))
    result += (None,) * (len(needed) - len(result))
    return _not_differentiable_again(result)


def _not_differentiable_again(grads: tuple) -> tuple:
    """With create_graph=True, gradients whose own backward raises a clear error: the backward kernels have
    no derivative (the torch backend's ops would otherwise record a partial, wrong one)."""
    if torch._C._functorch.maybe_current_level() is not None:  # inside a torch.func transform
        raise RuntimeError(FUNCTORCH_MESSAGE)
    if not torch.is_grad_enabled():
        return grads
    present = [g for g in grads if g is not None]
    error = torch._C._functions.DelayedError(ops.DOUBLE_BACKWARD_MESSAGE, len(present))
    marked = iter(error(*[g.detach().requires_grad_(True) for g in present]))
    return tuple(next(marked) if g is not None else None for g in grads)


class _Norm(torch.autograd.Function):
    """The autograd Function of the public functions' eager calls: ``_Norm.apply(plan, x, weight, bias, residual,
    residual_scale)`` with the call's checked plan (no second lookup; few arguments: each costs in apply)."""

    forward = staticmethod(_norm_forward)  # (ctx, plan, x, weight, bias, residual, residual_scale): no extra frame

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        # Gradients of inputs that need none are dropped by autograd: no needs_input_grad filter to pay for.
        dx, dresidual, dweight, dbias, dscale = _norm_backward(ctx, dy, dh_in)
        return _not_differentiable_again((None, dx, dweight, dbias, dresidual, dscale))


class _NormNoResidual(torch.autograd.Function):
    """``_Norm`` for the calls without a residual (and so without a residual_scale): ``apply(plan, x, weight,
    bias)``."""

    forward = staticmethod(_norm_forward)  # (ctx, plan, x, weight, bias): residual and residual_scale None

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        dx, _, dweight, dbias, _ = _norm_backward(ctx, dy, dh_in)
        return _not_differentiable_again((None, dx, dweight, dbias))


class _NormConstantScale(torch.autograd.Function):
    """``_Norm`` for the calls with a residual and no learned scale: ``apply(plan, x, weight, bias, residual)``."""

    forward = staticmethod(_norm_forward)  # (ctx, plan, x, weight, bias, residual): residual_scale None

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        dx, dresidual, dweight, dbias, _ = _norm_backward(ctx, dy, dh_in)
        return _not_differentiable_again((None, dx, dweight, dbias, dresidual))


class LayerNormFunction(torch.autograd.Function):
    """``LayerNormFunction.apply(x, weight=None, bias=None, eps=1e-5[, weight_offset, backend])`` -> y."""

    @staticmethod
    def forward(ctx, x, weight=None, bias=None, eps=1e-5, weight_offset=0.0, backend=None):
        plan = _applied_plan(False, x, None, weight, bias, eps, None, 0.0, False, False, weight_offset, backend)
        return _norm_forward(ctx, plan, x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        dx, _, dweight, dbias, _ = _norm_backward(ctx, dy)
        return _ordered(ctx, (dx, dweight, dbias))


class RMSNormFunction(torch.autograd.Function):
    """``RMSNormFunction.apply(x, weight=None, eps=1e-6[, weight_offset, backend])`` -> y."""

    @staticmethod
    def forward(ctx, x, weight=None, eps=1e-6, weight_offset=0.0, backend=None):
        plan = _applied_plan(True, x, None, weight, None, _rms_eps(eps, x), None, 0.0, False, False, weight_offset,
                             backend)
        return _norm_forward(ctx, plan, x, weight, None)

    @staticmethod
    def backward(ctx, dy):
        dx, _, dweight, _, _ = _norm_backward(ctx, dy)
        return _ordered(ctx, (dx, dweight))


class AddLayerNormFunction(torch.autograd.Function):
    """``AddLayerNormFunction.apply(x, residual, weight, bias=None, eps=1e-5, residual_scale=None,
    dropout_p=0.0, prenorm=False, residual_in_fp32=False[, weight_offset, backend])`` -> y or (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias=None, eps=1e-5, residual_scale=None, dropout_p=0.0,
                prenorm=False, residual_in_fp32=False, weight_offset=0.0, backend=None):
        plan = _applied_plan(False, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm,
                             residual_in_fp32, weight_offset, backend)
        return _norm_forward(ctx, plan, x, weight, bias, residual, residual_scale)

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        dx, dresidual, dweight, dbias, dscale = _norm_backward(ctx, dy, dh_in)
        return _ordered(ctx, (dx, dresidual, dweight, dbias, None, dscale))


class AddRMSNormFunction(torch.autograd.Function):
    """``AddRMSNormFunction.apply(x, residual, weight, eps=1e-6, residual_scale=None, dropout_p=0.0,
    prenorm=False, residual_in_fp32=False[, weight_offset, backend])`` -> y or (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps=1e-6, residual_scale=None, dropout_p=0.0, prenorm=False,
                residual_in_fp32=False, weight_offset=0.0, backend=None):
        plan = _applied_plan(True, x, residual, weight, None, _rms_eps(eps, x), residual_scale, dropout_p,
                             prenorm, residual_in_fp32, weight_offset, backend)
        return _norm_forward(ctx, plan, x, weight, None, residual, residual_scale)

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        dx, dresidual, dweight, _, dscale = _norm_backward(ctx, dy, dh_in)
        return _ordered(ctx, (dx, dresidual, dweight, None, dscale))


FUNCTORCH_MESSAGE = ("fusednorm does not support torch.func transforms (vmap, grad, jacrev, jvp, ...): its autograd "
                     "Functions save intermediate row statistics, which these transforms cannot wrap. Call fusednorm "
                     "outside the transform, or use torch.nn.functional.layer_norm / rms_norm inside it")


def _rms_eps(eps, x):
    """eps=None means the machine epsilon of the dtype torch computes in, as torch.nn.RMSNorm does:
    float32's for 16-bit and 32-bit x (torch upcasts first), float64's for float64 x."""
    if eps is None and (type(x) is Tensor or isinstance(x, Tensor)) and x.is_floating_point():
        return _FLOAT64_EPS if compute_dtype(x.dtype) == torch.float64 else _FLOAT32_EPS  # (finfo costs ~0.5 us)
    return eps


_FLOAT32_EPS, _FLOAT64_EPS = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
               *, weight_offset: float = 0.0, backend: str | None = None) -> Tensor:
    """LayerNorm over the last dimension with float32 statistics.

    x: (..., N) float16/bfloat16/float32/float64. weight, bias: (N,) in any of those dtypes (gradients in
    their own), or None.
    weight_offset: the affine weight is (weight + weight_offset), summed in float32 (Gemma's (1 + w)).
    Returns y: x's shape and dtype. backend: "auto", "torch", "triton", "cuda" or None (the global
    choice, see ``fusednorm.set_backend``). Raises TypeError/ValueError naming a bad argument.
    """
    return _call_norm(False, x, weight, bias, eps, weight_offset, backend)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float | None = 1e-6, *, weight_offset: float = 0.0,
             backend: str | None = None) -> Tensor:
    """RMSNorm over the last dimension: y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset).

    x: (..., N); weight: (N,) or None; eps=None uses the epsilon torch.nn.RMSNorm uses (float32's for
    16/32-bit x, float64's for float64 x).
    Returns y: x's shape and dtype.
    """
    return _call_norm(True, x, weight, None, eps, weight_offset, backend)


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
    return _call(False, x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                 weight_offset, backend)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, eps: float | None = 1e-6, *,
                 residual_scale: ResidualScale = None, dropout_p: float = 0.0, prenorm: bool = False,
                 residual_in_fp32: bool = False, weight_offset: float = 0.0,
                 backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Fused h = residual * residual_scale + dropout(x); y = RMSNorm(h). Arguments as add_layer_norm."""
    return _call(True, x, residual, weight, None, eps, residual_scale, dropout_p, prenorm, residual_in_fp32,
                 weight_offset, backend)
