"""Autograd Functions (Apex-style drop-ins) and the public functional API.

Each Function validates its arguments, flattens the leading dimensions to (M, N) rows, and runs the
custom ops of ``fusednorm.ops``. What the forward saves is exactly what DESIGN section 5 assumes
the backward reads: per-row mean/rstd, plus

- the stored h, when the layer returns it (Pre-LN) or when there is a residual and no learned
  scale (Post-LN: the backward reads dy and h);
- x and residual, when the scale is learned in the Post-LN layout (h is recomputed in float32);
- x alone, for a plain norm;
- the residual besides h for a learned scale in the Pre-LN layout (ds needs it);
- weight and residual_scale (parameters) and the int64 dropout seed. Never a dropout mask.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import _validate, backends, ops
from .backends.common import compute_dtype, dresidual_is_dx
from .dropout import draw_seed

ResidualScale = float | Tensor | None


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N) with unit stride along N; at most one copy."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _unit_stride(p: Tensor | None) -> Tensor | None:
    """A (N,) or 0-d parameter with unit stride (a copy only when it is a strided view)."""
    return p.contiguous() if p is not None else None


def _norm_forward(ctx, is_rms: bool, x: Tensor, residual: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None, eps, residual_scale: ResidualScale, dropout_p, prenorm,
                  residual_in_fp32, backend: str | None):
    _validate.check_input(x)
    _validate.check_residual(residual, x)
    _validate.check_param("weight", weight, x)
    _validate.check_param("bias", bias, x)
    eps = _validate.check_eps(eps)
    _validate.check_residual_scale(residual_scale, residual, x)
    dropout_p = _validate.check_dropout_p(dropout_p)
    prenorm = _validate.check_flag("prenorm", prenorm)
    residual_in_fp32 = _validate.check_flag("residual_in_fp32", residual_in_fp32)
    name = backends.resolve(backend, x.device)

    # Kernels index the (N,) parameters with unit stride: a strided view (w[::2], a column of a
    # matrix) is copied once here (N elements) instead of being read with the wrong stride.
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    learned_scale = _unit_stride(residual_scale) if isinstance(residual_scale, Tensor) else None
    scale_value = float(residual_scale) if isinstance(residual_scale, numbers.Real) else 1.0
    if residual_in_fp32 and x.dtype != torch.float64:
        h_dtype = torch.float32
    else:
        h_dtype = residual.dtype if residual is not None else x.dtype
    # Read h back in the backward (DESIGN section 5) unless the scale is learned in the Post-LN
    # layout, where ds needs x and residual anyway and h is recomputed from them in float32.
    store_h = prenorm or (residual is not None and learned_scale is None)
    seed = draw_seed(x.device) if dropout_p > 0.0 else None

    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else None
    y, h, mean, rstd = ops.fwd(x2, r2, weight, bias, learned_scale, scale_value, eps, dropout_p, seed,
                               is_rms, store_h, h_dtype, name)

    saved_x = None if store_h else x2
    saved_residual = r2 if (learned_scale is not None) else None
    ctx.save_for_backward(saved_x, saved_residual, h if store_h else None, weight, learned_scale,
                          mean, rstd, seed)
    ctx.set_materialize_grads(False)
    ctx.fusednorm = dict(is_rms=is_rms, scale_value=scale_value, dropout_p=dropout_p, backend=name,
                         x_dtype=x.dtype, x_shape=x.shape,
                         residual_dtype=residual.dtype if residual is not None else None,
                         bias_dtype=bias.dtype if bias is not None else None)
    y = _as_output(y, x.shape)
    if prenorm:
        return y, _as_output(h, x.shape)
    return y


def _as_output(t: Tensor, shape: torch.Size) -> Tensor:
    """An (M, N) result in x's shape, returned as a tensor of its own rather than an autograd view of a
    tensor made in the forward: autograd forbids in-place changes of such views, while callers may
    modify torch.nn.functional.layer_norm's result in place (y.mul_(), Dropout(inplace=True)). The
    storage and version counter stay shared, so changing a saved h in place still fails the backward."""
    return t.view(shape).detach()


def _norm_backward(ctx, dy: Tensor | None, dh_in: Tensor | None = None) -> dict[str, Tensor | None]:
    """Gradients by argument name; the caller orders them for its own forward signature."""
    x, residual, h, weight, learned_scale, mean, rstd, seed = ctx.saved_tensors
    meta = ctx.fusednorm
    shape = meta["x_shape"]
    if dy is None:
        dy = torch.zeros(shape, dtype=meta["x_dtype"], device=rstd.device)
    dx, dresidual, dweight, dbias, dscale = ops.bwd(
        _rows(dy), _rows(dh_in) if dh_in is not None else None, x, residual, h, weight,
        meta["bias_dtype"], learned_scale, meta["scale_value"], mean, rstd, meta["dropout_p"], seed,
        meta["is_rms"], meta["x_dtype"], meta["residual_dtype"], meta["backend"])
    dx = dx.view(shape)
    if meta["residual_dtype"] is None:
        dresidual = None
    elif dresidual_is_dx(learned_scale, meta["scale_value"], meta["dropout_p"], meta["x_dtype"],
                         meta["residual_dtype"]):
        dresidual = dx  # the backend wrote dh once; both inputs get it
    else:
        dresidual = dresidual.view(shape)
    return dict(x=dx, residual=dresidual, weight=dweight if weight is not None else None,
                bias=dbias if meta["bias_dtype"] is not None else None,
                residual_scale=dscale if learned_scale is not None else None)


def _ordered(ctx, grads: dict, names: tuple[str, ...]) -> tuple:
    """One gradient per forward argument (None where it is not a tensor or needs no grad)."""
    out = []
    for i, name in enumerate(names):
        g = grads.get(name)
        out.append(g if g is not None and ctx.needs_input_grad[i] else None)
    return tuple(out)


class LayerNormFunction(torch.autograd.Function):
    """``LayerNormFunction.apply(x, weight=None, bias=None, eps=1e-5[, backend])`` -> y."""

    @staticmethod
    def forward(ctx, x, weight=None, bias=None, eps=1e-5, backend=None):
        return _norm_forward(ctx, False, x, None, weight, bias, eps, None, 0.0, False, False, backend)

    @staticmethod
    def backward(ctx, dy):
        return _ordered(ctx, _norm_backward(ctx, dy), ("x", "weight", "bias", "", ""))


class RMSNormFunction(torch.autograd.Function):
    """``RMSNormFunction.apply(x, weight=None, eps=1e-6[, backend])`` -> y."""

    @staticmethod
    def forward(ctx, x, weight=None, eps=1e-6, backend=None):
        return _norm_forward(ctx, True, x, None, weight, None, _rms_eps(eps, x), None, 0.0, False, False,
                             backend)

    @staticmethod
    def backward(ctx, dy):
        return _ordered(ctx, _norm_backward(ctx, dy), ("x", "weight", "", ""))


_ADD_NAMES_TAIL = ("residual_scale", "", "", "", "")


class AddLayerNormFunction(torch.autograd.Function):
    """``AddLayerNormFunction.apply(x, residual, weight, bias=None, eps=1e-5, residual_scale=None,
    dropout_p=0.0, prenorm=False, residual_in_fp32=False[, backend])`` -> y or (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias=None, eps=1e-5, residual_scale=None, dropout_p=0.0,
                prenorm=False, residual_in_fp32=False, backend=None):
        return _norm_forward(ctx, False, x, residual, weight, bias, eps, residual_scale, dropout_p,
                             prenorm, residual_in_fp32, backend)

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        grads = _norm_backward(ctx, dy, dh_in)
        return _ordered(ctx, grads, ("x", "residual", "weight", "bias", "") + _ADD_NAMES_TAIL)


class AddRMSNormFunction(torch.autograd.Function):
    """``AddRMSNormFunction.apply(x, residual, weight, eps=1e-6, residual_scale=None, dropout_p=0.0,
    prenorm=False, residual_in_fp32=False[, backend])`` -> y or (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps=1e-6, residual_scale=None, dropout_p=0.0, prenorm=False,
                residual_in_fp32=False, backend=None):
        return _norm_forward(ctx, True, x, residual, weight, None, _rms_eps(eps, x), residual_scale,
                             dropout_p, prenorm, residual_in_fp32, backend)

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        grads = _norm_backward(ctx, dy, dh_in)
        return _ordered(ctx, grads, ("x", "residual", "weight", "") + _ADD_NAMES_TAIL)


def _rms_eps(eps, x):
    """eps=None means the machine epsilon of the dtype torch computes in, as torch.nn.RMSNorm does:
    float32's for 16-bit and 32-bit x (torch upcasts first), float64's for float64 x."""
    if eps is None and isinstance(x, Tensor) and x.is_floating_point():
        return torch.finfo(compute_dtype(x.dtype)).eps
    return eps


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
               *, backend: str | None = None) -> Tensor:
    """LayerNorm over the last dimension with float32 statistics.

    x: (..., N) float16/bfloat16/float32/float64. weight, bias: (N,) in x's dtype or float32, or None.
    Returns y: x's shape and dtype. backend: "auto", "torch", "triton", "cuda" or None (the global
    choice, see ``fusednorm.set_backend``). Raises TypeError/ValueError naming a bad argument.
    """
    return LayerNormFunction.apply(x, weight, bias, eps, backend)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float | None = 1e-6, *,
             backend: str | None = None) -> Tensor:
    """RMSNorm over the last dimension: y = x * rsqrt(mean(x^2) + eps) * weight.

    x: (..., N); weight: (N,) or None; eps=None uses the epsilon torch.nn.RMSNorm uses (float32's for
    16/32-bit x, float64's for float64 x).
    Returns y: x's shape and dtype.
    """
    return RMSNormFunction.apply(x, weight, eps, backend)


def add_layer_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None = None,
                   eps: float = 1e-5, *, residual_scale: ResidualScale = None, dropout_p: float = 0.0,
                   prenorm: bool = False, residual_in_fp32: bool = False,
                   backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Fused h = residual * residual_scale + dropout(x); y = LayerNorm(h).

    x, residual: (..., N), same shape; residual in x's dtype or float32 (None: h = dropout(x)).
    residual_scale: None (1), a Python float (constant, DeepNorm's alpha) or a 0-d / (N,) tensor
    (learned, Admin's omega; it gets a gradient). dropout_p in [0, 1) applies dropout to x.
    Returns y (x's dtype), or (y, h) with prenorm=True; h is float32 with residual_in_fp32=True,
    else residual's dtype.
    """
    return AddLayerNormFunction.apply(x, residual, weight, bias, eps, residual_scale, dropout_p, prenorm,
                                      residual_in_fp32, backend)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, eps: float | None = 1e-6, *,
                 residual_scale: ResidualScale = None, dropout_p: float = 0.0, prenorm: bool = False,
                 residual_in_fp32: bool = False, backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Fused h = residual * residual_scale + dropout(x); y = RMSNorm(h). Arguments as add_layer_norm."""
    return AddRMSNormFunction.apply(x, residual, weight, eps, residual_scale, dropout_p, prenorm,
                                    residual_in_fp32, backend)
