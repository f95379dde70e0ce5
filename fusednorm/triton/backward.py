"""The Triton backward kernel: one kernel for every variant, the variants as constexpr flags.

Flags: those of ``fusednorm.variant.Variant.triton_backward_flags`` (the forward's, see forward.py,
plus HAS_DH_IN: a gradient flows into the returned h, and STORE_DRESIDUAL: dresidual differs from
dx). With STORE_H the backward reads the h the forward stored; else it rebuilds h from x and the
residual in the compute dtype, exactly as the forward computed it.

Per row, with g = dy * (weight + weight_offset) (DESIGN section 2):
    mean_g = sum(g) / N (LayerNorm only),  mean_gxhat = sum(g * xhat) / N
    dh = rstd * (g - mean_g - xhat * mean_gxhat) + dh_in;  dx = dh * keep / (1 - p);  dresidual = dh * s
and per column, summed over the program's rows in float32 registers:
    dweight += dy * xhat,  dbias += dy,  dscale += dh * residual
The (N,) weight and scale are loaded once per program, except in one-pass blocks of
heuristics.PARAMS_PER_ROW_BLOCK_N columns or more with a learned scale: there they are re-read per
row where used, so that they do not hold registers across the row loop (see heuristics.py).
Each program writes its column sums to row ``pid`` of a (num_programs, N) buffer; the host reduces
it with one fixed-order torch.sum(0), so gradients are bit-identical run to run (no atomics).

Rows up to 8192 columns take the one-pass path (see heuristics.py for why the cap is lower than the
forward's). Wider rows (NUM_CHUNKS > 1): sweep A computes each row's mean_g, mean_gxhat into a small
(M, 2) scratch; sweep B walks column chunks outside and the program's rows inside, so the column
accumulators still live in registers (a (num_programs, N) partial buffer, not (M, N)). dy and h
(or x, residual) are read twice, the second time after the program's other rows: from DRAM unless
they fit in L2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import heuristics
from .forward import HOST_WORDS
from .helpers import (
    add_scaled,
    divide,
    host_scalar,
    late_upcast,
    load_row,
    load_scale,
    philox_keep,
    rounded_to,
    row_sums,
)

_PARAMS_PER_ROW_BLOCK_N: tl.constexpr = tl.constexpr(heuristics.PARAMS_PER_ROW_BLOCK_N)


@triton.jit
def _backward_row(DY, X, R, H, W, S, MEAN, RSTD, row, cols, mask, N, stride_dy, stride_x, stride_r, stride_h,
                  w, weight_offset, s, scale, seed, keep_threshold, dropout_scale,
                  COMPUTE: tl.constexpr, IS_RMS: tl.constexpr, STORE_H: tl.constexpr,
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
    if HAS_DROPOUT and not STORE_H:  # else the mask is drawn later, for dx only (fewer live registers)
        keep = philox_keep(seed, row * N + cols, keep_threshold)
    if not STORE_H:
        # The forward took its statistics of the float32 sum (h was not stored): rebuild exactly that.
        h = load_row(X, row, stride_x, cols, mask, COMPUTE)
        if HAS_DROPOUT:
            # A select suffices here: NaN/Inf at a dropped position made the row's saved statistics
            # NaN/Inf in the forward, so the whole row's gradient is already poisoned.
            h = tl.where(keep, h * dropout_scale, 0.0)
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
            w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE) + weight_offset
        g = dy * w
    return dy, xhat, g, r, keep, rstd


@triton.jit
def _backward_outputs(DX, DR, DH_IN, S, dh, keep, s, scale, row, cols, mask, N, stride_dx, stride_dr, stride_dh_in,
                      seed, keep_threshold, dropout_scale, COMPUTE: tl.constexpr, HAS_DH_IN: tl.constexpr,
                      SCALE_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr,
                      STORE_DRESIDUAL: tl.constexpr, PARAMS_PER_ROW: tl.constexpr):
    """Adds dh_in to dh, writes dx (and dresidual); returns the full dh (for dscale).
    ``keep`` is the dropout mask when h was rebuilt with it, else it is drawn here. With
    PARAMS_PER_ROW the scale is loaded here, after the dx store: a load that the compiler cannot
    merge with the one before the row reductions (the store may alias), so s is not live across them."""
    if HAS_DH_IN:
        dh += load_row(DH_IN, row, stride_dh_in, cols, mask, COMPUTE)
    dx = dh
    if HAS_DROPOUT:
        if STORE_H:
            keep = philox_keep(seed, row * N + cols, keep_threshold)
        dx = tl.where(keep, dh * dropout_scale, 0.0)
    tl.store(DX + row * stride_dx + cols, rounded_to(dx, DX), mask=mask)
    if STORE_DRESIDUAL:
        dr = dh
        if PARAMS_PER_ROW:
            s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
        if SCALE_KIND != 0:
            dr = dh * s
        tl.store(DR + row * stride_dr + cols, rounded_to(dr, DR), mask=mask)
    return dh


@triton.jit(do_not_specialize=HOST_WORDS[2:])
def _backward_kernel(
    DY, DH_IN, X, R, H, W, S, MEAN, RSTD, SEED,  # inputs (see backends/contract.py); H when STORE_H, else X
    DX, DR,  # outputs: dx (M, N) x's dtype; dresidual (M, N) residual's dtype (STORE_DRESIDUAL)
    DW_PARTIAL, DB_PARTIAL, DS_PARTIAL,  # (num_programs, N) COMPUTE: per-program column sums
    ROW_COEF,  # (M, 2) COMPUTE scratch for mean_g, mean_gxhat when NUM_CHUNKS > 1
    stride_dy, stride_dh_in, stride_x, stride_r, stride_h, stride_dx, stride_dr,
    M, N, rows_per_program,
    scale_hi, scale_lo, dropout_scale_hi, dropout_scale_lo, weight_offset_hi, weight_offset_lo,  # host_scalar
    keep_threshold,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_CHUNKS: tl.constexpr, IS_RMS: tl.constexpr,
    STORE_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SCALE_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DH_IN: tl.constexpr, STORE_DRESIDUAL: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    partial_row = pid.to(tl.int64) * N
    scale = host_scalar(scale_hi, scale_lo, COMPUTE)
    dropout_scale = host_scalar(dropout_scale_hi, dropout_scale_lo, COMPUTE)
    weight_offset = host_scalar(weight_offset_hi, weight_offset_lo, COMPUTE)
    LEARNED_SCALE: tl.constexpr = SCALE_KIND >= 2
    # The residual is read to rebuild h (then kept for dscale), or only for dscale (Pre-LN with a
    # learned scale, DESIGN section 5): then it is loaded after the row reductions, so that it is
    # not live in registers across them.
    LOAD_R: tl.constexpr = HAS_RESIDUAL and not STORE_H
    LATE_R: tl.constexpr = LEARNED_SCALE and STORE_H
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
                w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE) + weight_offset
        dweight = tl.zeros((BLOCK_N,), COMPUTE)
        dbias = tl.zeros((BLOCK_N,), COMPUTE)
        dscale = tl.zeros((BLOCK_N,), COMPUTE)
        for row32 in range(row_start, row_end):
            row = tl.cast(row32, tl.int64)  # 64-bit offsets: row * stride may exceed 2^31
            dy, xhat, g, r, keep, rstd = _backward_row(
                DY, X, R, H, W, S, MEAN, RSTD, row, cols, mask, N, stride_dy, stride_x, stride_r, stride_h, w,
                weight_offset, s, scale, seed, keep_threshold, dropout_scale, COMPUTE, IS_RMS, STORE_H,
                HAS_RESIDUAL, LOAD_R, SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT, PARAMS_PER_ROW)
            # Column sums that need no row statistic first: dy is dead before the reductions,
            # which keeps the register set small enough for 8192-wide rows.
            if HAS_WEIGHT:
                dweight += dy * xhat
            if HAS_BIAS:
                dbias += dy
            if IS_RMS:
                mean_gxhat = divide(tl.sum(g * xhat, axis=0), N, COMPUTE)
                dh = rstd * (g - xhat * mean_gxhat)
            else:
                # Both row sums in one reduction: g and xhat are live across one round of
                # shuffles and shared memory, not two.
                sum_g, sum_gx = row_sums(g, g * xhat)
                mean_g = divide(sum_g, N, COMPUTE)
                mean_gxhat = divide(sum_gx, N, COMPUTE)
                dh = rstd * (g - mean_g - xhat * mean_gxhat)
            dh = _backward_outputs(DX, DR, DH_IN, S, dh, keep, s, scale, row, cols, mask, N, stride_dx, stride_dr,
                                   stride_dh_in, seed, keep_threshold, dropout_scale, COMPUTE, HAS_DH_IN,
                                   SCALE_KIND, HAS_DROPOUT, STORE_H, STORE_DRESIDUAL, PARAMS_PER_ROW)
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
        # Sweep A: the per-row means mean_g, mean_gxhat (they need the whole row).
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
                    w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE) + weight_offset
                dy, xhat, g, r, keep, rstd = _backward_row(
                    DY, X, R, H, W, S, MEAN, RSTD, row, cols, mask, N, stride_dy, stride_x, stride_r, stride_h, w,
                    weight_offset, s, scale, seed, keep_threshold, dropout_scale, COMPUTE, IS_RMS, STORE_H,
                    HAS_RESIDUAL, LOAD_R, SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT, False)
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
                w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE) + weight_offset
            dweight = tl.zeros((BLOCK_N,), COMPUTE)
            dbias = tl.zeros((BLOCK_N,), COMPUTE)
            dscale = tl.zeros((BLOCK_N,), COMPUTE)
            for row32 in range(row_start, row_end):
                row = tl.cast(row32, tl.int64)  # 64-bit offsets: row * stride may exceed 2^31
                dy, xhat, g, r, keep, rstd = _backward_row(
                    DY, X, R, H, W, S, MEAN, RSTD, row, cols, mask, N, stride_dy, stride_x, stride_r, stride_h, w,
                    weight_offset, s, scale, seed, keep_threshold, dropout_scale, COMPUTE, IS_RMS, STORE_H,
                    HAS_RESIDUAL, LOAD_R, SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT, False)
                mean_g = tl.load(ROW_COEF + 2 * row)
                mean_gxhat = tl.load(ROW_COEF + 2 * row + 1)
                if IS_RMS:
                    dh = rstd * (g - xhat * mean_gxhat)
                else:
                    dh = rstd * (g - mean_g - xhat * mean_gxhat)
                dh = _backward_outputs(DX, DR, DH_IN, S, dh, keep, s, scale, row, cols, mask, N, stride_dx,
                                       stride_dr, stride_dh_in, seed, keep_threshold, dropout_scale, COMPUTE, HAS_DH_IN,
                                       SCALE_KIND, HAS_DROPOUT, STORE_H, STORE_DRESIDUAL, False)
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
