"""Small @triton.jit pieces shared by the forward and backward kernels.

- ``philox_keep``: the dropout keep mask of ``fusednorm.dropout`` (Philox4x32-10, first word,
  24-bit integer compare), bit for bit, so the backward regenerates the forward's mask.
- ``load_row``, ``load_scale``, ``add_scaled``: the pieces of h = residual * s + dropout(x).
- ``row_rstd``: 1/sqrt(var + eps), correctly rounded in float32 (the fast sqrt/div of the GPU
  would add ~2 ulp to every output of the row).
- ``merge_moments``: Chan et al.'s pairwise merge of (count, mean, M2) for rows processed in
  chunks; stable like two-pass statistics (never E[h^2] - E[h]^2).
- ``row_sums``: both row sums of the backward in one two-output ``tl.reduce`` (one round of shuffles
  and shared memory instead of two) on the GPU.
- ``late_upcast``: a 16-bit tensor to float32 where it is used, so that only the 16-bit copy stays
  live across the code in between.
- ``host_scalar``: a host float passed as the bits of a float64, exact in float64 kernels.
- ``rounded_to``: a conversion for a store that rounds to nearest even, also in the interpreter.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ..dropout import PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_ROUND_A, PHILOX_ROUND_B, PHILOX_ROUNDS

KEEP_SHIFT: tl.constexpr = tl.constexpr(8)  # 32 - dropout.KEEP_BITS
_ROUND_A: tl.constexpr = tl.constexpr(PHILOX_ROUND_A)
_ROUND_B: tl.constexpr = tl.constexpr(PHILOX_ROUND_B)
_KEY_A: tl.constexpr = tl.constexpr(PHILOX_KEY_A)
_KEY_B: tl.constexpr = tl.constexpr(PHILOX_KEY_B)
_ROUNDS: tl.constexpr = tl.constexpr(PHILOX_ROUNDS)
# The interpreter (TRITON_INTERPRET=1, read when triton is imported) cannot run inline PTX.
_INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def philox_keep(seed, index, keep_threshold):
    """Keep mask for int64 ``index`` (row * N + col) under the int64 scalar ``seed``.

    counter = (index_lo, index_hi, 0, 0), key = (seed_lo, seed_hi); keep = (r0 >> 8) >= threshold.
    """
    k0 = seed.to(tl.uint32)  # truncation keeps the low word
    k1 = (seed >> 32).to(tl.uint32)
    c0 = index.to(tl.uint32)
    c1 = (index >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    round_a = tl.full((), _ROUND_A, tl.uint32)
    round_b = tl.full((), _ROUND_B, tl.uint32)
    for _ in tl.static_range(_ROUNDS):
        hi_b = tl.umulhi(c2, round_b)
        lo_b = c2 * round_b
        hi_a = tl.umulhi(c0, round_a)
        lo_a = c0 * round_a
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + tl.full((), _KEY_A, tl.uint32)
        k1 = k1 + tl.full((), _KEY_B, tl.uint32)
    return (c0 >> KEEP_SHIFT) >= tl.cast(keep_threshold, tl.uint32)  # an int or a constexpr 1


@triton.jit
def host_scalar(hi, lo, COMPUTE: tl.constexpr):
    """A host float, passed as the two 32-bit halves of its float64 bits (``fusednorm.triton.float_words``):
    exact in float64 kernels, rounded once to nearest in float32 ones. A float argument would be a
    float32: it loses digits, or overflows, for float64 inputs. Two int32 words (not one int64) keep
    the argument types, and so the compiled kernel, the same whatever the value."""
    bits = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)
    return bits.to(tl.float64, bitcast=True).to(COMPUTE)


@triton.jit
def rounded_to(value, PTR):
    """``value`` converted to the element type of ``PTR`` for a store, rounded to nearest even.

    The GPU rounds float32 -> bfloat16 to nearest even; the interpreter truncates. Under the
    interpreter the rounding is done here on the bits (NaN kept), so that CPU runs of the kernels give
    the GPU's (and torch's) bits.
    """
    if value.dtype == tl.float64 and PTR.dtype.element_ty.primitive_bitwidth == 16:
        # float64 -> 16 bits through float32, as torch converts (c10::BFloat16 / Half take a float); the
        # interpreter has no direct float64 -> bfloat16 conversion (it gave inf).
        value = value.to(tl.float32)
    if _INTERPRETED and PTR.dtype.element_ty == tl.bfloat16 and value.dtype == tl.float32:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        value = tl.where(value != value, value, (bits & 0xFFFF0000).to(tl.float32, bitcast=True))
    return value.to(PTR.dtype.element_ty)


@triton.jit
def load_row(PTR, row, stride, cols, mask, COMPUTE: tl.constexpr):
    """One row chunk of an (M, N) tensor, upcast to the compute dtype, 0 where masked out.
    ``row`` is int64: row * stride may exceed 2^31."""
    return tl.load(PTR + row * stride + cols, mask=mask, other=0.0).to(COMPUTE)


@triton.jit
def load_scale(S, cols, mask, scale, COMPUTE: tl.constexpr, SCALE_KIND: tl.constexpr):
    """The residual scale s: SCALE_KIND 0: 1 (unused), 1: the host constant ``scale``, 2: the 0-d
    tensor S, 3: the (N,) tensor S at ``cols``."""
    if SCALE_KIND == 2:
        s = tl.load(S).to(COMPUTE)
    elif SCALE_KIND == 3:
        s = tl.load(S + cols, mask=mask, other=0.0).to(COMPUTE)
    else:
        s = scale
    return s


@triton.jit
def add_scaled(h, r, s, SCALE_KIND: tl.constexpr):
    """residual * s + h (the residual term first, as the reference computes it)."""
    if SCALE_KIND == 0:
        return r + h
    else:
        return r * s + h


@triton.jit
def divide(a, b, COMPUTE: tl.constexpr):
    """a / b rounded to nearest (the GPU's default float32 division is approximate)."""
    if COMPUTE == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, tl.cast(b, tl.float32))


@triton.jit
def row_rstd(var, eps, COMPUTE: tl.constexpr):
    """1 / sqrt(var + eps), IEEE-rounded (float64 sqrt and division are exact already)."""
    if COMPUTE == tl.float64:
        rstd = 1.0 / tl.sqrt(var + eps)
    else:
        rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    return rstd


@triton.jit
def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's parallel update: the (count, mean, M2) of the union of two disjoint sets."""
    count = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / count)
    return count, mean, m2


@triton.jit
def _sum_pair(a0, a1, b0, b1):
    """Combine function of ``tl.reduce((u, v), axis, _sum_pair)``: (sum(u), sum(v)) in one reduction."""
    return a0 + b0, a1 + b1


@triton.jit
def row_sums(u, v, AXIS: tl.constexpr):
    """(sum(u), sum(v)) along AXIS of two tensors of one shape, keeping the reduced dimension.

    On the GPU one two-output reduction (a tree: shuffles, then shared memory). The interpreter runs a
    custom ``tl.reduce`` as a sequential left fold, whose rounding error grows with N (2-6x torch's on a
    0-d residual scale's gradient at N >= 1000), so there it takes two pairwise ``tl.sum``s instead.
    """
    if _INTERPRETED:
        return tl.sum(u, axis=AXIS, keep_dims=True), tl.sum(v, axis=AXIS, keep_dims=True)
    else:
        return tl.reduce((u, v), AXIS, _sum_pair, keep_dims=True)


@triton.jit
def late_upcast(x, COMPUTE: tl.constexpr):
    """``x.to(COMPUTE)``, computed here even if x was converted before.

    A second ``.to(COMPUTE)`` of the same value would be merged with the first by the compiler
    (MLIR and LLVM common-subexpression elimination), which keeps the float32 copy live in between:
    twice the registers of the 16-bit one. An inline-PTX conversion (exact: every fp16 and bf16
    value is a float32) is opaque to that merge. float32/float64 inputs, and the interpreter, take
    the plain conversion.
    """
    if _INTERPRETED or x.dtype == COMPUTE or COMPUTE != tl.float32:
        return x.to(COMPUTE)
    elif x.dtype == tl.float16:
        return tl.inline_asm_elementwise("cvt.f32.f16 $0, $1;", "=r,h", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.inline_asm_elementwise("cvt.f32.bf16 $0, $1;", "=r,h", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
