"""The CPU eager path (issue 15, item 3): ATen's own ops under autograd, where they compute what the
torch backend computes.

On the CPU there is no fused kernel: the "torch" backend is a reference written for clarity. For the calls
that ATen's composed ops compute with the same roundings, the eager layer (``fusednorm.functional``) runs the
function ``specialize`` made for the call's signature (kept in its plan, ``fusednorm._plan``) instead of the
autograd Function, so a CPU model costs what torch.nn's own modules cost:

- h = residual * s + dropout(x), without dropout: ``x + residual`` (ATen rounds the float32 sum once to h's
  dtype, as the backend does); with a scale, ``torch.add(x, residual, alpha=s)`` / ``torch.addcmul(x, residual,
  s)`` for float32 x and residual where h is not returned (ATen fuses the product into the sum: one float32
  rounding less than the backend's) and for 16-bit x, residual and learned scale of one dtype (exact: h is the
  backend's bit for bit), differentiated by autograd (ds included): see ``_sum_recipe``. Otherwise (dropout; a
  16-bit x with a constant or float32 scale; a returned float32 h; dtype mixes) ``_PreNormSum``, a small
  autograd Function that computes h in float32 exactly as the backend does (the same products and sums, in
  compiled code: ``fusednorm._philox_cpu.pre_norm_sum``) rounded once to h's dtype, and saves only the residual
  (for a learned scale) and the dropout seed: its backward regenerates the mask and never stores one.
- the norm: ``torch.layer_norm`` (ATen's fused kernels, forward and backward) on h as stored, or ``_RMSNorm``
  (ATen's fused forward, the backend's backward); the affine parameters in h's dtype, or upcast to float32
  (exact) where their dtype differs, ``weight + weight_offset`` summed in float32. LayerNorm over 16-bit h gets
  float32 parameters (a float32 ones weight where it has none) where a backward will run: ATen's mixed-dtype
  kernel keeps float32 statistics for it (see ``_build``).

Each call signature's decisions are taken once: ``specialize`` returns a function for one signature that runs
only the ops.

What differs from the Function path, within DESIGN section 6 (tests/test_correctness.py's "cpu-path" target):
where the backend normalizes an h it does not store (a learned scale in the Post-LN layout, dropout without a
residual), the direct path normalizes h rounded to x's dtype (16-bit x), as torch's composed ops do; the
statistics are those of that h, and ATen's backward rebuilds xhat from it (DESIGN section 2). Autograd rounds
16-bit gradients between ATen's ops (dh before dresidual = dh * s or the Pre-LN sum dh + dh_in; with a 16-bit
learned scale, each dh * residual before ATen sums them into ds), and ATen's LayerNorm backward forms xhat as
h * rstd - mean * rstd. ATen's scaled sums round r * s + x once in float32 where the backend rounds the product
and the sum (Post-LN only). A returned h is the backend's bit for bit.

``usable`` decides, once per call signature (the plan cache, ``fusednorm._plan``), from facts that
signature holds: dtypes, devices, shapes, the Variant, the backend. What it leaves to the Function path:

- float64 x: ATen's LayerNorm backward takes xhat as h * rstd - mean * rstd and misses DESIGN section 6's
  bound for a constant float64 row with eps = 1e-60 (tests/test_host_scalars.py), and gradcheck must stay
  exact; the Function path (centered rows) is kept for every float64 call.
- LayerNorm at N = 1: the same cancellation in ATen's dweight (2.6e-5 against a bound of 3.8e-6).
- LayerNorm over a 16-bit h when ``LAYER_NORM_16BIT_ON_ATEN`` is False (see there: constant rows).
- telemetry (the row statistics of ``store_stats``), non-CPU devices, backends other than "torch".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from . import dropout as dropout_module
from .backends.contract import compute_dtype
from .dropout import draw_seed, dropout_keep_mask
from .variant import ScaleKind, Variant

_FLOAT_16_32 = (torch.float16, torch.bfloat16, torch.float32)
_PLAIN = (Tensor, torch.nn.Parameter)  # tensor types the CPU path takes (subclasses such as DTensor: the Function)
_enabled = True
# LayerNorm over a 16-bit h on ATen's kernel: y = h * (rstd * w) + (b - mean * rstd * w) rounds where the torch
# backend's (h - mean) * rstd * w + b does not, so a constant row at a large offset gives bias only to within
# ~|mean| * rstd * 2^-24 * |w| (1e4 * 316 * 6e-8 ~ 0.2 at eps = 1e-5), where the backend gives it exactly (README:
# "Constant rows"); elsewhere within DESIGN section 6. False: such calls take the autograd Function (exact,
# 2-2.5x ATen's time at 512x1024 bf16 on this machine).
LAYER_NORM_16BIT_ON_ATEN = True


def enabled() -> bool:
    """Whether eligible calls take the direct path (tests turn it off with ``disabled``)."""
    return _enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run every call through the autograd Function (the torch backend itself), e.g. to test that backend.
    The eager layer's plan cache, which remembers ``usable``'s answer per signature, is cleared on the way
    in and out."""
    global _enabled
    from . import _plan

    previous, _enabled = _enabled, False
    _plan.clear()
    try:
        yield
    finally:
        _enabled = previous
        _plan.clear()


def usable(variant: Variant, backend: str, x: Tensor, residual: Tensor | None, weight: Tensor | None,
           bias: Tensor | None, residual_scale: float | Tensor | None, weight_offset: float) -> bool:
    """True when ``specialize``'s function computes this call as the torch backend would (eager, plain CPU
    tensors or module parameters, backend "torch", no telemetry). Depends only on types, dtypes, devices, shapes
    and the Variant."""
    if not _enabled or backend != "torch" or variant.store_stats:
        return False
    tensors = [t for t in (x, residual, weight, bias, residual_scale) if isinstance(t, Tensor)]
    # nn.Parameter is a plain tensor to ATen (no __torch_function__ of its own): every module's weight is one.
    if any(type(t) not in _PLAIN or t.device.type != "cpu" or t.layout != torch.strided for t in tensors):
        return False
    if x.dtype not in _FLOAT_16_32 or (residual is not None and residual.dtype not in _FLOAT_16_32):
        return False
    if x.dim() == 0 or x.numel() == 0:
        return False
    if variant.is_rms:
        return True
    return x.shape[-1] > 1 and (LAYER_NORM_16BIT_ON_ATEN or variant.h_dtype(x.dtype) == torch.float32)


def specialize(variant: Variant, x_dtype: torch.dtype, residual_dtype: torch.dtype | None,
               weight_dtype: torch.dtype | None, bias_dtype: torch.dtype | None, scale_dtype: torch.dtype | None,
               eps: float, scale_value: float, dropout_p: float, weight_offset: float = 0.0
               ) -> Callable[[Tensor, Tensor | None, Tensor | None, Tensor | None, float | Tensor | None],
                             Tensor | tuple[Tensor, Tensor]]:
    """The CPU path for one call signature: a function ``run(x, residual, weight, bias, residual_scale)`` that
    returns y, or (y, h) for a Pre-LN variant, in x's shape, differentiable by autograd (x, residual: (..., N) as
    the caller gave them; weight, bias: (N,); residual_scale: as given). y in x's dtype; h in
    ``variant.h_dtype(x.dtype)``; each gradient in its input's dtype; the affine weight is (weight + weight_offset),
    summed in float32 (Gemma's (1 + w)). Every decision that the signature fixes is taken here, once: per call
    ``run`` runs only the ops. The signature: the Variant, the dtypes of x / residual / weight / bias / a tensor
    residual_scale (None where absent or a Python number), eps, scale_value (the constant scale, 1.0 for none),
    dropout_p and weight_offset; the shapes are not part of it. Valid for calls that ``usable`` accepts with those
    facts. Cached here (the same function for the same signature)."""
    key = (variant, x_dtype, residual_dtype, weight_dtype, bias_dtype, scale_dtype, eps, scale_value, dropout_p,
           weight_offset)
    run = _SPECIALIZED.get(key)
    if run is None:
        if len(_SPECIALIZED) >= _MAX_SPECIALIZED:
            _SPECIALIZED.clear()
        run = _SPECIALIZED[key] = _build(*key)
    return run


_SPECIALIZED: dict[tuple, Callable] = {}
_MAX_SPECIALIZED = 4096  # eps and the scale are keys: a bound for callers that vary them per call

# How h is formed (``_build``): x itself; x + residual, torch.add(x, residual, alpha=s), torch.addcmul(x, residual, s)
# (ATen's, differentiated by autograd); _PreNormSum (compiled, the mask regenerated in its backward).
_H_IS_X, _H_ADD, _H_ADD_ALPHA, _H_ADDCMUL, _H_PRE_NORM_SUM = range(5)
_F32 = torch.float32


def _sum_recipe(variant: Variant, x_dtype, residual_dtype, scale_dtype) -> int:
    """How h is formed. ATen's sums are taken where they compute what the backend does, the float32 sum of
    float32 operands rounded once to h's dtype, with no dtype mix: x + residual, exact; with a scale, ATen's
    float32 kernels fuse the product into the sum (one rounding where the backend rounds twice: h differs by at
    most one float32 ulp, within DESIGN section 6), taken for float32 x and residual where h is not returned
    (Post-LN); 16-bit x, residual and learned scale of one dtype: their product is exact in float32, and h is the
    backend's bit for bit. Left to _PreNormSum: 16-bit x with a constant scale (ATen's 16-bit add rounds alpha to
    16 bits; its float32 addcmul with a (1,) float32 scale costs 2x ATen's time and 2.5x its memory in training at
    512x1024, through float32 temporaries and casts), and dtype mixes (float32 temporaries likewise)."""
    h_dtype = variant.h_dtype(x_dtype)
    if not variant.has_residual and not variant.has_dropout and not variant.prenorm:
        return _H_IS_X
    if not variant.has_residual or variant.has_dropout:  # the mask: regenerated in _PreNormSum's backward
        return _H_PRE_NORM_SUM
    if variant.scale_kind == ScaleKind.NONE:
        return _H_ADD if torch.promote_types(x_dtype, residual_dtype) == h_dtype else _H_PRE_NORM_SUM
    all_f32 = x_dtype == residual_dtype == h_dtype == _F32 and not variant.prenorm
    if variant.scale_kind == ScaleKind.CONSTANT:
        return _H_ADD_ALPHA if all_f32 else _H_PRE_NORM_SUM
    if (all_f32 and scale_dtype in _FLOAT_16_32) or x_dtype == residual_dtype == scale_dtype == h_dtype != _F32:
        return _H_ADDCMUL  # float32 x and residual: a 16-bit scale is promoted exactly
    return _H_PRE_NORM_SUM


def _build(variant: Variant, x_dtype, residual_dtype, weight_dtype, bias_dtype, scale_dtype, eps: float,
           scale_value: float, dropout_p: float, weight_offset: float) -> Callable:
    """``specialize``'s function (see there), built from the signature's decisions."""
    h_dtype = variant.h_dtype(x_dtype)
    sum_kind = _sum_recipe(variant, x_dtype, residual_dtype, scale_dtype)
    sum_spec = _sum_spec(x_dtype, residual_dtype, dropout_p, scale_value, h_dtype)
    learned, has_dropout, prenorm, is_rms = variant.learned_scale, variant.has_dropout, variant.prenorm, variant.is_rms
    has_offset = weight_offset != 0.0
    # The affine parameters in h's dtype when they all have it, else in float32 (exact for 16-bit parameters:
    # the backend computes in float32); weight + weight_offset is summed in float32.
    params = [d for d in (weight_dtype, bias_dtype) if d is not None]
    same = all(d == h_dtype for d in params) and not has_offset
    p_dtype = None if same and (is_rms or h_dtype == _F32) else _F32
    # LayerNorm over 16-bit h: float32 parameters where a backward will run, so that ATen takes its mixed-dtype
    # kernel, which keeps float32 mean/rstd for its backward (a float32 ones weight where there is none). Its
    # 16-bit kernel rounds them to 16 bits: for a row far from 0 whose mean falls between two 16-bit values, that
    # moves xhat by up to rstd * |mean| * 2^-9 (dweight off by ~100% for a row of 1000s and 1004s, dx beyond
    # section 6 without parameters: tests/test_cpu_path.py). Without a backward, parameters of h's dtype go in as
    # given: y is the same bit for bit (both kernels compute y in float32 from float32 statistics), without the
    # casts. Other dtype mixes are cast on every call (ATen takes the parameters in one dtype).
    cast_only_for_backward = p_dtype is not None and same
    ones_weight = not is_rms and weight_dtype is None and p_dtype is not None and h_dtype != _F32
    # RMSNorm: ATen's fused kernel over 16-bit h with a weight of h's dtype computes in float32 and rounds y once,
    # as over the float32 h (tests/test_cpu_path.py); other dtype mixes go in as float32.
    rms_in_f32 = is_rms and h_dtype != _F32 and p_dtype is not None
    seed_of = draw_seed
    layer_norm, grad_enabled = torch.layer_norm, torch.is_grad_enabled

    def run(x, residual, weight, bias, residual_scale):
        grad = grad_enabled()
        if sum_kind == _H_IS_X:
            h = x
        elif sum_kind == _H_ADD:
            h = x + residual  # the float32 sum rounded once to h's dtype, as the backend does
        elif sum_kind == _H_ADDCMUL:
            h = torch.addcmul(x, residual, residual_scale)
        elif sum_kind == _H_ADD_ALPHA:
            h = torch.add(x, residual, alpha=scale_value)
        else:
            # h in its dtype, also where the backend does not store it (a learned scale in the Post-LN layout,
            # dropout without a residual) and normalizes the float32 sum: the statistics are then those of the
            # rounded h, from which ATen's backward rebuilds xhat (DESIGN section 2), as torch's composed ops do.
            scale = residual_scale if learned else None
            seed = seed_of(x.device) if has_dropout else None
            if grad:
                h = _PreNormSum.apply(x, residual, scale, seed, sum_spec)
            else:  # inference: no autograd Function (its apply costs more than a small call's arithmetic)
                h = _pre_norm_sum(x, residual, scale, seed, sum_spec)
        if has_offset and weight is not None:
            weight = weight.float() + weight_offset
        if p_dtype is not None and not (cast_only_for_backward and not (
                grad and (h.requires_grad or weight is not None and weight.requires_grad
                          or bias is not None and bias.requires_grad))):
            if weight is not None:
                weight = weight.float()
            if bias is not None:
                bias = bias.float()
            if ones_weight:  # made per call, on h's device: a cached one would keep the device or fake-tensor
                weight = torch.ones(h.shape[-1], dtype=_F32, device=h.device)  # mode of the call that made it
        if is_rms:
            if grad:
                y = _RMSNorm.apply(h, weight, eps, rms_in_f32)
            else:
                y = _rms_forward(h, weight, eps, rms_in_f32)
        else:
            y = layer_norm(h, (h.shape[-1],), weight, bias, eps)
        if y.dtype != x_dtype:
            y = y.to(dtype=x_dtype)
        return (y, h) if prenorm else y

    # The commonest calls, LayerNorm of x or of x + residual with parameters of h's dtype, get a function with
    # nothing but the op: at small shapes each branch of ``run`` costs a visible fraction of ATen's call.
    if (is_rms or prenorm or has_offset or ones_weight or sum_kind not in (_H_IS_X, _H_ADD) or h_dtype != x_dtype
            or p_dtype is not None and not cast_only_for_backward):
        return run
    if p_dtype is None:
        if sum_kind == _H_IS_X:
            def norm_of_x(x, residual, weight, bias, residual_scale):
                return layer_norm(x, (x.shape[-1],), weight, bias, eps)
            return norm_of_x

        def norm_of_sum(x, residual, weight, bias, residual_scale):
            return layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)
        return norm_of_sum
    # 16-bit parameters: cast only for a backward (``run``); the op itself without one (no call in between)
    if sum_kind == _H_IS_X:
        def norm_of_x_without_grad(x, residual, weight, bias, residual_scale):
            if grad_enabled():
                return run(x, residual, weight, bias, residual_scale)
            return layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return norm_of_x_without_grad

    def norm_of_sum_without_grad(x, residual, weight, bias, residual_scale):
        if grad_enabled():
            return run(x, residual, weight, bias, residual_scale)
        return layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)
    return norm_of_sum_without_grad


class _SumSpec(NamedTuple):
    """What ``_PreNormSum`` needs of a call signature, computed once (``_sum_spec``): one argument of its apply
    (each argument costs there) and plain values in its backward."""

    p: float  # dropout probability, 0 without dropout
    scale_value: float
    out_dtype: torch.dtype  # h's
    x_dtype: torch.dtype
    residual_dtype: torch.dtype | None
    codes: tuple[int, int, int] | None  # x / residual (0 where absent) / h dtype codes of csrc/cpu/philox.c; None:
    # a dtype the compiled code does not take (float16)
    threshold: int  # dropout.keep_threshold(p)
    inv_keep: float  # 1 / (1 - p)


def _sum_spec(x_dtype, residual_dtype, p: float, scale_value: float, out_dtype) -> _SumSpec:
    codes = (_DTYPE_CODES.get(x_dtype), _DTYPE_CODES.get(residual_dtype, 0 if residual_dtype is None else None),
             _DTYPE_CODES.get(out_dtype))
    return _SumSpec(p, float(scale_value), out_dtype, x_dtype, residual_dtype, None if None in codes else codes,
                    dropout_module.keep_threshold(p) if p else 0, 1.0 / (1.0 - p) if p else 0.0)


class _PreNormSum(torch.autograd.Function):
    """h = residual * s + dropout(x), computed in float32 as the torch backend does and rounded once to h's
    dtype: in compiled code (``fusednorm._philox_cpu.pre_norm_sum``, one pass, no float32 temporaries) for
    float32/bfloat16 tensors, else with torch ops. Saves the residual only for a learned scale (ds reads it),
    and the dropout seed, never a mask. The seed goes through save_for_backward like the rest: activation
    checkpointing replaces it with the recomputed forward's (preserve_rng_state=False draws a new one), so the
    mask of dx stays the mask of the h the norm's backward sees."""

    @staticmethod
    def forward(ctx, x, residual, scale, seed, spec):
        h = _pre_norm_sum(x, residual, scale, seed, spec)
        ctx.save_for_backward(residual if scale is not None else None, scale, seed)
        ctx.spec = spec
        return h

    @staticmethod
    def backward(ctx, dh):
        return _first_order(_PreNormSum._gradients, ctx, dh)

    @staticmethod
    def _gradients(ctx, dh):
        residual, scale, seed = ctx.saved_tensors
        spec = ctx.spec
        p, scale_value, _, x_dtype, residual_dtype, codes, threshold, inv_keep = spec
        needs = ctx.needs_input_grad
        # Products of dh (h's dtype) with Python scalars round once to dh's dtype, as in float32 then rounded.
        wants_dresidual = residual_dtype is not None and needs[1]
        dx = dresidual = dscale = None
        if seed is not None:
            compiled = _dropout_backward_compiled(dh, seed, spec, wants_dresidual and scale is None)
            if compiled is not None:
                dx, dresidual = compiled
            else:
                keep = dropout_keep_mask(seed, dh.numel() // dh.shape[-1], dh.shape[-1], p).view(dh.shape)
                # where(), not a product: 0 at a dropped position even where dh is NaN, as the backend gives.
                dx = torch.where(keep, dh * inv_keep, torch.zeros((), dtype=dh.dtype, device=dh.device))
        if dx is None:
            dx = dh
        if dx.dtype != x_dtype:
            dx = dx.to(dtype=x_dtype)
        if dresidual is not None:
            return dx, dresidual, None, None, None
        if scale is not None and needs[2]:
            compiled = _scale_backward_compiled(dh, residual, scale, needs[1])
            if compiled is not None:
                return dx, compiled[0], compiled[1], None, None
        if wants_dresidual:
            if seed is None and scale is None and scale_value == 1.0 and residual_dtype == x_dtype:
                dresidual = dx  # dresidual = dx element for element: one tensor for both, as eager x + r gives
            elif scale is not None:
                dresidual = (dh * scale.to(dtype=compute_dtype(dh.dtype))).to(dtype=residual_dtype)
            else:
                dresidual = dh * scale_value if scale_value != 1.0 else dh
                if dresidual.dtype != residual_dtype:
                    dresidual = dresidual.to(dtype=residual_dtype)
        if scale is not None and needs[2]:
            cd = compute_dtype(x_dtype)
            per_column = (dh.to(cd) * residual.to(cd)).reshape(-1, dh.shape[-1]).sum(0)
            dscale = (per_column if scale.dim() == 1 else per_column.sum()).to(scale.dtype)
        return dx, dresidual, dscale, None, None


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # csrc/cpu/philox.c's codes


def _pre_norm_sum(x, residual, scale, seed, spec: _SumSpec) -> Tensor:
    h = _pre_norm_sum_compiled(x, residual, scale, seed, spec)
    if h is None:
        h = _pre_norm_sum_torch(x, residual, scale, seed, spec.p, spec.scale_value, spec.out_dtype)
    return h


def _pre_norm_sum_compiled(x, residual, scale, seed, spec: _SumSpec) -> Tensor | None:
    """h with ``_philox_cpu.pre_norm_sum``, or None where it does not apply (not built, float16/float64)."""
    module = dropout_module._philox_cpu
    codes = spec.codes
    if module is None or codes is None:
        return None
    # Every tensor whose address goes to the C code is held in a variable until it returns: a temporary
    # (``t.contiguous().data_ptr()``) would be freed before the call reads it.
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    h = torch.empty_like(x, dtype=spec.out_dtype)  # x is contiguous: so is h (empty_like costs half of empty)
    cols = x.shape[-1]
    if scale is not None:
        scale = scale.float().contiguous()
    module.pre_norm_sum(
        x.data_ptr(), codes[0], residual.data_ptr() if residual is not None else 0, codes[1],
        scale.data_ptr() if scale is not None else 0, scale.numel() if scale is not None else 0, spec.scale_value,
        int(seed) if seed is not None else 0, spec.threshold, spec.inv_keep, x.numel() // cols, cols, h.data_ptr(),
        codes[2])
    return h


def _dropout_backward_compiled(dh, seed, spec: _SumSpec, wants_dresidual: bool) -> tuple | None:
    """(dx, dresidual = dh * scale_value, or None without ``wants_dresidual``) of the dropped sum with
    ``_philox_cpu.dropout_backward`` (one pass, the mask regenerated on the fly), or None where it does not
    apply."""
    module = dropout_module._philox_cpu
    codes = spec.codes
    if module is None or codes is None:
        return None
    dh = dh.contiguous()  # dh has h's dtype (codes[2])
    cols = dh.shape[-1]
    dx = torch.empty_like(dh, dtype=spec.x_dtype)  # dh is contiguous: so are dx and dresidual
    dresidual = torch.empty_like(dh, dtype=spec.residual_dtype) if wants_dresidual else None
    module.dropout_backward(dh.data_ptr(), codes[2], int(seed), spec.threshold, spec.inv_keep, dh.numel() // cols,
                            cols, dx.data_ptr(), codes[0], dresidual.data_ptr() if dresidual is not None else 0,
                            codes[1] if dresidual is not None else codes[2], spec.scale_value)
    return dx, dresidual


def _scale_backward_compiled(dh, residual, scale, wants_dresidual: bool) -> tuple | None:
    """(dresidual or None, dscale) of a learned scale with ``_philox_cpu.scale_backward`` (one pass, no float32
    temporaries), or None where it does not apply."""
    module = dropout_module._philox_cpu
    codes = [_DTYPE_CODES.get(dh.dtype), _DTYPE_CODES.get(residual.dtype)]
    if module is None or None in codes:
        return None
    dh, residual = dh.contiguous(), residual.contiguous()
    scale_f32 = scale.to(torch.float32).contiguous()
    cols = dh.shape[-1]
    dresidual = torch.empty_like(residual) if wants_dresidual else None
    per_column = torch.zeros(cols, dtype=torch.float32, device=dh.device)
    module.scale_backward(dh.data_ptr(), codes[0], residual.data_ptr(), codes[1], scale_f32.data_ptr(),
                          scale_f32.numel(), dh.numel() // cols, cols,
                          dresidual.data_ptr() if dresidual is not None else 0, codes[1], per_column.data_ptr())
    return dresidual, (per_column if scale.dim() == 1 else per_column.sum()).to(scale.dtype)


def _pre_norm_sum_torch(x, residual, scale, seed, p, scale_value, out_dtype) -> Tensor:
    """h with torch ops, the backend's arithmetic (float32 temporaries)."""
    cd = compute_dtype(x.dtype)
    h = x.to(cd)
    if seed is not None:
        keep = dropout_keep_mask(seed, h.numel() // h.shape[-1], h.shape[-1], p).view(h.shape)
        h = h * (keep.to(cd) * (1.0 / (1.0 - p)))
    if residual is not None:
        stream = residual.to(cd)
        if scale is not None:
            stream = stream * scale.to(cd)
        elif scale_value != 1.0:
            stream = stream * scale_value
        h = stream + h
    return h.to(out_dtype, copy=h is x)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm with the torch backend's arithmetic: ATen's fused CPU forward (aten._fused_rms_norm) in float32
    (see ``_rms_forward``), and the backend's backward (ATen has no fused RMSNorm backward on the CPU; its
    composite one, through rsqrt's derivative rstd^3, overflows float32 for eps below ~1e-26 and gives NaN for a
    row of zeros: tests/test_host_scalars.py). Saves h as given (the stored h, or the float32 h), the weight and
    the (M, 1) float32 rstd. Not twice differentiable: double backward raises fusednorm's error, as the Function
    path."""

    @staticmethod
    def forward(ctx, h, weight, eps, in_f32):
        y, rstd = _rms_forward(h, weight, eps, in_f32, with_rstd=True)
        ctx.save_for_backward(h, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _first_order(_RMSNorm._gradients, ctx, dy)

    @staticmethod
    def _gradients(ctx, dy):
        h, weight, rstd = ctx.saved_tensors
        # 16-bit tensors to float32 (exact); float32 ones as they are (a no-op .to still costs ~1 us at 4x64)
        dyf = dy if dy.dtype == _F32 else dy.float()
        xhat = (h if h.dtype == _F32 else h.float()) * rstd
        g = dyf if weight is None else dyf * (weight if weight.dtype == _F32 else weight.float())
        dh = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dweight = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (dyf * xhat).reshape(-1, h.shape[-1]).sum(0).to(dtype=weight.dtype)
        return dh.to(dtype=h.dtype), dweight, None, None


def _rms_forward(h: Tensor, weight: Tensor | None, eps: float, in_f32: bool, with_rstd: bool = False):
    """y (and the (..., 1) float32 rstd) of RMSNorm by ATen's fused CPU kernel, in float32 as the backend. Over
    16-bit h with a weight of h's dtype (or none), the kernel computes in float32 itself and rounds y once to
    h's dtype, bit for bit what it gives over the float32 h (tests/test_cpu_path.py); ``in_f32``: h and the
    weight go in as float32 (other dtype mixes), y comes out in float32."""
    if in_f32:
        h = h.float()
        weight = weight.float() if weight is not None else None
    y, rstd = _FUSED_RMS_NORM(h, [h.shape[-1]], weight, eps)
    return (y, rstd) if with_rstd else y


# The Python binding is ~2x cheaper per call than the torch.ops route (15 against 30 us at 4x64).
_FUSED_RMS_NORM = getattr(torch, "_fused_rms_norm", torch.ops.aten._fused_rms_norm)


def _first_order(gradients, ctx, grad_output: Tensor) -> tuple:
    """The backward of this module's Functions: ``gradients(ctx, grad_output)`` computed without recording
    a graph, then marked so that a double backward raises fusednorm's clear error."""
    if not torch.is_grad_enabled():  # the usual backward (no create_graph): nothing records, nothing to mark
        return gradients(ctx, grad_output)
    with torch.no_grad():
        grads = gradients(ctx, grad_output)
    return _not_differentiable_again(grads)


def _not_differentiable_again(grads: tuple) -> tuple:
    """With create_graph=True, gradients whose own backward raises fusednorm's clear error (the compiled sums
    and the regenerated mask have no derivative that autograd could record)."""
    from .functional import _not_differentiable_again as mark

    return mark(grads) if torch.is_grad_enabled() else grads
