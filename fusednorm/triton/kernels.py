"""The Triton kernel family: one forward kernel, one backward kernel; variants are constexpr flags.

Flags (the same names in both kernels and in the host code of ``__init__.py``):
COMPUTE (tl.float32, or tl.float64 for float64 inputs), BLOCK_N (columns per block), NUM_CHUNKS
(column blocks per row: 1 = the whole row in registers), IS_RMS, HAS_RESIDUAL, SCALE_KIND
(0: none, 1: host constant, 2: 0-d tensor, 3: (N,) tensor), HAS_DROPOUT, HAS_WEIGHT, HAS_BIAS;
forward: STORE_H; backward: RECOMPUTE_H (h is rebuilt from x and residual instead of read),
HAS_DH_IN (gradient flowing into the returned h), STORE_DRESIDUAL (dresidual differs from dx).

Forward, per row (DESIGN section 1):
    h = residual * s + dropout(x);  [stored h rounded to h's dtype and used rounded from then on]
    LayerNorm: mean = sum(h) / N;  var = sum((h - mean)^2) / N   (two passes over registers)
    RMSNorm:   var = sum(h^2) / N
    rstd = 1 / sqrt(var + eps);  xhat = (h - mean) * rstd;  y = xhat * weight + bias

Backward, per row, with g = dy * weight (DESIGN section 2):
    c1 = sum(g) / N (LayerNorm only),  c2 = sum(g * xhat) / N
    dh = rstd * (g - c1 - xhat * c2) + dh_in;  dx = dh * keep / (1 - p);  dresidual = dh * s
and per column, summed over the program's rows in float32 registers:
    dweight += dy * xhat,  dbias += dy,  dscale += dh * residual
The (N,) weight and scale are loaded once per program, except in one-pass blocks of
heuristics.PARAMS_PER_ROW_BLOCK_N columns or more with a learned scale: there they are re-read per
row where used, so that they do not hold registers across the row loop (see heuristics.py).
Each program writes its column sums to row ``pid`` of a (num_programs, N) buffer; the host reduces
it with one fixed-order torch.sum(0), so gradients are bit-identical run to run (no atomics).

Rows wider than BLOCK_N (NUM_CHUNKS > 1) are walked in column chunks:
- forward: chunk statistics (two-pass inside the chunk) merged with Chan's (count, mean, M2)
  update, then a second sweep that writes y, re-reading h from the h just written (STORE_H) or
  re-reading x and residual. Inputs are read twice, but the second sweep follows the first on the
  same row, so it mostly hits L2 (x and residual of a 65536-wide fp16 row are 256 KB).
- backward: sweep A computes each row's c1, c2 into a small (M, 2) scratch; sweep B walks column
  chunks outside and the program's rows inside, so the column accumulators still live in
  registers (a (num_programs, N) partial buffer, not (M, N)). dy and h (or x, residual) are read
  twice, the second time after the program's other rows: from DRAM unless they fit in L2.
Rows up to 16384 columns (forward) and 8192 (backward) take the one-pass path, the byte floor of
DESIGN section 5 (see heuristics.py for why the caps differ).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import heuristics
from .helpers import (
    add_scaled,
    divide,
    late_upcast,
    load_row,
    load_scale,
    merge_moments,
    philox_keep,
    row_rstd,
    row_sums,
    scalar_arg,
)

_PARAMS_PER_ROW_BLOCK_N: tl.constexpr = tl.constexpr(heuristics.PARAMS_PER_ROW_BLOCK_N)


@triton.jit
def _pre_norm_row(X, R, S, row, cols, mask, N, stride_x, stride_r, seed, keep_threshold, drop_scale, s,
                  COMPUTE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SCALE_KIND: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr):
    """h = residual * s + dropout(x) for one row chunk, in COMPUTE (0 where masked out)."""
    h = load_row(X, row, stride_x, cols, mask, COMPUTE)
    if HAS_DROPOUT:
        keep = philox_keep(seed, row * N + cols, keep_threshold)
        # A product, not a select: NaN/Inf at a dropped position still poisons its row (as F.dropout).
        h = h * tl.where(keep, drop_scale, 0.0)
    if HAS_RESIDUAL:
        h = add_scaled(h, load_row(R, row, stride_r, cols, mask, COMPUTE), s, SCALE_KIND)
    return h


@triton.jit
def _store_rounded_h(H, h, row, stride_h, cols, mask, COMPUTE: tl.constexpr):
    """Store h in H's dtype and return the rounded value: the backward will read exactly that."""
    h_stored = h.to(H.dtype.element_ty)
    tl.store(H + row * stride_h + cols, h_stored, mask=mask)
    return h_stored.to(COMPUTE)


@triton.jit
def _forward_kernel(
    X, R, W, B, S, SEED,  # x, residual: (M, N); weight, bias: (N,); residual_scale: () or (N,); seed: (1,) int64
    Y, H, MEAN, RSTD,  # y: (M, N) x's dtype; h: (M, N) h_dtype (STORE_H); mean, rstd: (M,) COMPUTE
    stride_x, stride_r, stride_y, stride_h,  # row strides, in elements (columns are contiguous)
    M, N, rows_per_program,
    eps_hi, eps_lo, scale_hi, scale_lo, drop_scale_hi, drop_scale_lo,  # host floats as hi + lo words
    keep_threshold,  # dropout: keep where (philox >> 8) >= keep_threshold
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_CHUNKS: tl.constexpr, IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, SCALE_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_H: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    row_start = tl.program_id(0) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    eps = scalar_arg(eps_hi, eps_lo, COMPUTE)
    scale = scalar_arg(scale_hi, scale_lo, COMPUTE)
    drop_scale = scalar_arg(drop_scale_hi, drop_scale_lo, COMPUTE)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    if NUM_CHUNKS == 1:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        # Parameters are loaded once per program, not once per row.
        s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
        if HAS_BIAS:
            b = tl.load(B + cols, mask=mask, other=0.0).to(COMPUTE)
        for row32 in range(row_start, row_end):
            row = tl.cast(row32, tl.int64)  # 64-bit offsets: row * stride may exceed 2^31
            h = _pre_norm_row(X, R, S, row, cols, mask, N, stride_x, stride_r, seed, keep_threshold, drop_scale,
                              s, COMPUTE, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT)
            if STORE_H:
                h = _store_rounded_h(H, h, row, stride_h, cols, mask, COMPUTE)
            if IS_RMS:
                xhat = h  # times rstd below
                var = divide(tl.sum(h * h, axis=0), N, COMPUTE)
            else:
                mean = divide(tl.sum(h, axis=0), N, COMPUTE)
                xhat = tl.where(mask, h - mean, 0.0)
                var = divide(tl.sum(xhat * xhat, axis=0), N, COMPUTE)
                tl.store(MEAN + row, mean)
            rstd = row_rstd(var, eps, COMPUTE)
            tl.store(RSTD + row, rstd)
            y = xhat * rstd
            if HAS_WEIGHT:
                y = y * w
            if HAS_BIAS:
                y = y + b
            tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        for row32 in range(row_start, row_end):
            row = tl.cast(row32, tl.int64)  # 64-bit offsets: row * stride may exceed 2^31
            # Sweep 1: statistics, chunk by chunk (and h written out).
            count = tl.zeros((), COMPUTE)
            mean = tl.zeros((), COMPUTE)
            m2 = tl.zeros((), COMPUTE)
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
                mask = cols < N
                s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
                h = _pre_norm_row(X, R, S, row, cols, mask, N, stride_x, stride_r, seed, keep_threshold,
                                  drop_scale, s, COMPUTE, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT)
                if STORE_H:
                    h = _store_rounded_h(H, h, row, stride_h, cols, mask, COMPUTE)
                if IS_RMS:
                    m2 += tl.sum(h * h, axis=0)
                else:
                    chunk_count = tl.minimum(N - chunk * BLOCK_N, BLOCK_N).to(COMPUTE)
                    chunk_mean = tl.sum(h, axis=0) / chunk_count
                    centered = tl.where(mask, h - chunk_mean, 0.0)
                    count, mean, m2 = merge_moments(count, mean, m2, chunk_count, chunk_mean,
                                                    tl.sum(centered * centered, axis=0))
            rstd = row_rstd(divide(m2, N, COMPUTE), eps, COMPUTE)
            if not IS_RMS:
                tl.store(MEAN + row, mean)
            tl.store(RSTD + row, rstd)
            if STORE_H:
                tl.debug_barrier()  # sweep 2 reads the h that other threads of this program wrote
            # Sweep 2: outputs.
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
                mask = cols < N
                if STORE_H:
                    h = load_row(H, row, stride_h, cols, mask, COMPUTE)
                else:
                    s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
                    h = _pre_norm_row(X, R, S, row, cols, mask, N, stride_x, stride_r, seed, keep_threshold,
                                      drop_scale, s, COMPUTE, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT)
                if IS_RMS:
                    y = h * rstd
                else:
                    y = (h - mean) * rstd
                if HAS_WEIGHT:
                    y = y * tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
                if HAS_BIAS:
                    y = y + tl.load(B + cols, mask=mask, other=0.0).to(COMPUTE)
                tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_row(DY, X, R, H, W, S, MEAN, RSTD, row, cols, mask, N, stride_dy, stride_x, stride_r, stride_h,
                  w, s, scale, seed, keep_threshold, drop_scale,
                  COMPUTE: tl.constexpr, IS_RMS: tl.constexpr, RECOMPUTE_H: tl.constexpr,
                  HAS_RESIDUAL: tl.constexpr, LOAD_R: tl.constexpr, SCALE_KIND: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, PARAMS_PER_ROW: tl.constexpr):
    """Everything of one row chunk that the backward derives from its inputs:
    (dy, xhat, g = dy * weight, residual (0 unless LOAD_R; in its storage dtype, see ``late_upcast``),
    dropout keep mask (when h is rebuilt), rstd). Each input element is loaded once here. The
    parameters are the arguments w and s, or loaded here from W and S when PARAMS_PER_ROW."""
    dy = load_row(DY, row, stride_dy, cols, mask, COMPUTE)
    r = tl.zeros_like(dy)
    if LOAD_R:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
    keep = mask
    if HAS_DROPOUT and RECOMPUTE_H:  # else the mask is drawn later, for dx only (fewer live registers)
        keep = philox_keep(seed, row * N + cols, keep_threshold)
    if RECOMPUTE_H:
        # The forward took its statistics of the float32 sum (h was not stored): rebuild exactly that.
        h = load_row(X, row, stride_x, cols, mask, COMPUTE)
        if HAS_DROPOUT:
            # A select suffices here: NaN/Inf at a dropped position made the row's saved statistics
            # NaN/Inf in the forward, so the whole row's gradient is already poisoned.
            h = tl.where(keep, h * drop_scale, 0.0)
        if HAS_RESIDUAL:
            if PARAMS_PER_ROW:
                s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
            h = add_scaled(h, r.to(COMPUTE), s, SCALE_KIND)
    else:
        h = load_row(H, row, stride_h, cols, mask, COMPUTE)
    rstd = tl.load(RSTD + row)
    if IS_RMS:
        xhat = h * rstd
    else:
        # Not zeroed where masked out: dy is 0 there, so g, g * xhat and dy * xhat are 0 too.
        xhat = (h - tl.load(MEAN + row)) * rstd
    g = dy
    if HAS_WEIGHT:
        if PARAMS_PER_ROW:
            w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
        g = dy * w
    return dy, xhat, g, r, keep, rstd


@triton.jit
def _backward_outputs(DX, DR, DH_IN, S, dh, keep, s, scale, row, cols, mask, N, stride_dx, stride_dr, stride_dh_in,
                      seed, keep_threshold, drop_scale, COMPUTE: tl.constexpr, HAS_DH_IN: tl.constexpr,
                      SCALE_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, RECOMPUTE_H: tl.constexpr,
                      STORE_DRESIDUAL: tl.constexpr, PARAMS_PER_ROW: tl.constexpr):
    """Adds dh_in to dh, writes dx (and dresidual); returns the full dh (for dscale).
    ``keep`` is the dropout mask when h was rebuilt with it, else it is drawn here. With
    PARAMS_PER_ROW the scale is loaded here, after the dx store: a load that the compiler cannot
    merge with the one before the row reductions (the store may alias), so s is not live across them."""
    if HAS_DH_IN:
        dh += load_row(DH_IN, row, stride_dh_in, cols, mask, COMPUTE)
    dx = dh
    if HAS_DROPOUT:
        if not RECOMPUTE_H:
            keep = philox_keep(seed, row * N + cols, keep_threshold)
        dx = tl.where(keep, dh * drop_scale, 0.0)
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if STORE_DRESIDUAL:
        dr = dh
        if PARAMS_PER_ROW:
            s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
        if SCALE_KIND != 0:
            dr = dh * s
        tl.store(DR + row * stride_dr + cols, dr.to(DR.dtype.element_ty), mask=mask)
    return dh


@triton.jit
def _backward_kernel(
    DY, DH_IN, X, R, H, W, S, MEAN, RSTD, SEED,  # inputs (see ops.py); H absent when RECOMPUTE_H
    DX, DR,  # outputs: dx (M, N) x's dtype; dresidual (M, N) residual's dtype (STORE_DRESIDUAL)
    DW_PARTIAL, DB_PARTIAL, DS_PARTIAL,  # (num_programs, N) COMPUTE: per-program column sums
    ROW_COEF,  # (M, 2) COMPUTE scratch for c1, c2 when NUM_CHUNKS > 1
    stride_dy, stride_dh_in, stride_x, stride_r, stride_h, stride_dx, stride_dr,
    M, N, rows_per_program,
    scale_hi, scale_lo, drop_scale_hi, drop_scale_lo, keep_threshold,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_CHUNKS: tl.constexpr, IS_RMS: tl.constexpr,
    RECOMPUTE_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SCALE_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DH_IN: tl.constexpr, STORE_DRESIDUAL: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    partial_row = pid.to(tl.int64) * N
    scale = scalar_arg(scale_hi, scale_lo, COMPUTE)
    drop_scale = scalar_arg(drop_scale_hi, drop_scale_lo, COMPUTE)
    LEARNED_SCALE: tl.constexpr = SCALE_KIND >= 2
    # The residual is read to rebuild h (then kept for dscale), or only for dscale (Pre-LN with a
    # learned scale, DESIGN section 5): then it is loaded after the row reductions, so that it is
    # not live in registers across them.
    LOAD_R: tl.constexpr = HAS_RESIDUAL and RECOMPUTE_H
    LATE_R: tl.constexpr = LEARNED_SCALE and not RECOMPUTE_H
    # One-pass rows of PARAMS_PER_ROW_BLOCK_N columns or more with a learned scale: 16 warps, at most
    # 128 registers per thread, 16 columns per thread. Three float32 column accumulators take 48 of
    # them; weight and scale held across rows would take 32 more and leave too few for the current
    # row, so they are re-read per row where used (from L1/L2: (N,) values, the same for every row;
    # the (M, N) inputs are still read once). See heuristics.py.
    PARAMS_PER_ROW: tl.constexpr = NUM_CHUNKS == 1 and LEARNED_SCALE and BLOCK_N >= _PARAMS_PER_ROW_BLOCK_N
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    if NUM_CHUNKS == 1:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        s = scale
        w = 1.0
        if not PARAMS_PER_ROW:  # else loaded in the row loop, where used
            s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
        dweight = tl.zeros((BLOCK_N,), COMPUTE)
        dbias = tl.zeros((BLOCK_N,), COMPUTE)
        dscale = tl.zeros((BLOCK_N,), COMPUTE)
        for row32 in range(row_start, row_end):
            row = tl.cast(row32, tl.int64)  # 64-bit offsets: row * stride may exceed 2^31
            dy, xhat, g, r, keep, rstd = _backward_row(
                DY, X, R, H, W, S, MEAN, RSTD, row, cols, mask, N, stride_dy, stride_x, stride_r, stride_h, w, s,
                scale, seed, keep_threshold, drop_scale, COMPUTE, IS_RMS, RECOMPUTE_H, HAS_RESIDUAL, LOAD_R,
                SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT, PARAMS_PER_ROW)
            # Column sums that need no row statistic first: dy is dead before the reductions,
            # which keeps the register set small enough for 8192-wide rows.
            if HAS_WEIGHT:
                dweight += dy * xhat
            if HAS_BIAS:
                dbias += dy
            if IS_RMS:
                c2 = divide(tl.sum(g * xhat, axis=0), N, COMPUTE)
                dh = rstd * (g - xhat * c2)
            else:
                # Both row sums in one reduction: g and xhat are live across one round of
                # shuffles and shared memory, not two.
                sum_g, sum_gx = row_sums(g, g * xhat)
                c1 = divide(sum_g, N, COMPUTE)
                c2 = divide(sum_gx, N, COMPUTE)
                dh = rstd * (g - c1 - xhat * c2)
            dh = _backward_outputs(DX, DR, DH_IN, S, dh, keep, s, scale, row, cols, mask, N, stride_dx, stride_dr,
                                   stride_dh_in, seed, keep_threshold, drop_scale, COMPUTE, HAS_DH_IN,
                                   SCALE_KIND, HAS_DROPOUT, RECOMPUTE_H, STORE_DRESIDUAL, PARAMS_PER_ROW)
            if LATE_R:
                r = load_row(R, row, stride_r, cols, mask, COMPUTE)
            if LEARNED_SCALE:
                # The residual stayed 16-bit across the reductions (half the registers); its float32
                # copy from the h rebuild is not reused (see late_upcast).
                dscale += dh * late_upcast(r, COMPUTE)
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + partial_row + cols, dweight, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + partial_row + cols, dbias, mask=mask)
        if LEARNED_SCALE:
            tl.store(DS_PARTIAL + partial_row + cols, dscale, mask=mask)
    else:
        # Sweep A: the per-row projections c1, c2 (they need the whole row).
        for row32 in range(row_start, row_end):
            row = tl.cast(row32, tl.int64)  # 64-bit offsets: row * stride may exceed 2^31
            sum_g = tl.zeros((), COMPUTE)
            sum_gx = tl.zeros((), COMPUTE)
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
                mask = cols < N
                s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
                w = 1.0
                if HAS_WEIGHT:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
                dy, xhat, g, r, keep, rstd = _backward_row(
                    DY, X, R, H, W, S, MEAN, RSTD, row, cols, mask, N, stride_dy, stride_x, stride_r, stride_h, w,
                    s, scale, seed, keep_threshold, drop_scale, COMPUTE, IS_RMS, RECOMPUTE_H, HAS_RESIDUAL, LOAD_R,
                    SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT, False)
                sum_g += tl.sum(g, axis=0)
                sum_gx += tl.sum(g * xhat, axis=0)
            tl.store(ROW_COEF + 2 * row, divide(sum_g, N, COMPUTE))
            tl.store(ROW_COEF + 2 * row + 1, divide(sum_gx, N, COMPUTE))
        tl.debug_barrier()  # sweep B reads the coefficients that other threads of this program wrote
        # Sweep B: column chunks outside, rows inside, so column sums stay in registers.
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = cols < N
            s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
            w = 1.0
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
            dweight = tl.zeros((BLOCK_N,), COMPUTE)
            dbias = tl.zeros((BLOCK_N,), COMPUTE)
            dscale = tl.zeros((BLOCK_N,), COMPUTE)
            for row32 in range(row_start, row_end):
                row = tl.cast(row32, tl.int64)  # 64-bit offsets: row * stride may exceed 2^31
                dy, xhat, g, r, keep, rstd = _backward_row(
                    DY, X, R, H, W, S, MEAN, RSTD, row, cols, mask, N, stride_dy, stride_x, stride_r, stride_h, w,
                    s, scale, seed, keep_threshold, drop_scale, COMPUTE, IS_RMS, RECOMPUTE_H, HAS_RESIDUAL, LOAD_R,
                    SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT, False)
                c1 = tl.load(ROW_COEF + 2 * row)
                c2 = tl.load(ROW_COEF + 2 * row + 1)
                if IS_RMS:
                    dh = rstd * (g - xhat * c2)
                else:
                    dh = rstd * (g - c1 - xhat * c2)
                dh = _backward_outputs(DX, DR, DH_IN, S, dh, keep, s, scale, row, cols, mask, N, stride_dx,
                                       stride_dr, stride_dh_in, seed, keep_threshold, drop_scale, COMPUTE, HAS_DH_IN,
                                       SCALE_KIND, HAS_DROPOUT, RECOMPUTE_H, STORE_DRESIDUAL, False)
                if HAS_WEIGHT:
                    dweight += dy * xhat
                if HAS_BIAS:
                    dbias += dy
                if LATE_R:
                    r = load_row(R, row, stride_r, cols, mask, COMPUTE)
                if LEARNED_SCALE:
                    dscale += dh * r.to(COMPUTE)
            if HAS_WEIGHT:
                tl.store(DW_PARTIAL + partial_row + cols, dweight, mask=mask)
            if HAS_BIAS:
                tl.store(DB_PARTIAL + partial_row + cols, dbias, mask=mask)
            if LEARNED_SCALE:
                tl.store(DS_PARTIAL + partial_row + cols, dscale, mask=mask)
