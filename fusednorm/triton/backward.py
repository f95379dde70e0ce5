"""The Triton backward kernel: one kernel for every variant, the variants as constexpr flags.

Flags: those of ``fusednorm.variant.Variant.triton_backward_flags`` (the forward's, see forward.py,
plus HAS_DH_IN: a gradient flows into the returned h, and STORE_DRESIDUAL: dresidual differs from dx). With
STORE_H it reads the stored h; else it rebuilds h from x and the residual exactly as the forward did.

Per row, with g = dy * (weight + weight_offset) (DESIGN section 2):
    mean_g = sum(g) / N (LayerNorm only),  mean_gxhat = sum(g * xhat) / N
    dh = rstd * (g - mean_g - xhat * mean_gxhat) + dh_in;  dx = dh * keep / (1 - p);  dresidual = dh * s
and per column, summed over the program's rows in float32 registers:
    dweight += dy * xhat,  dbias += dy,  dscale += dh * residual
Each program writes its column sums to row ``pid`` of a (num_programs, N) partial buffer ((num_programs,)
for a 0-d scale: the program's sum over its columns too); ``_reduce_partials_kernel`` then sums them in
a fixed order and writes every parameter gradient in its dtype, in one launch. No atomics: bit-identical
gradients run to run, and -- the partition being a pure function of (M, N, dtype, variant), see
heuristics.py -- on every GPU.

Shapes of work (heuristics.py says why):
- BAND_CHUNKS == 1: tiles of ROWS rows x BLOCK_N, whole rows in registers, one pass, the next tiles prefetched
  (tl.range num_stages). Column sums add each tile's rows (a fixed tree over ROWS), then the tiles in order.
- BAND_CHUNKS > 1: one row at a time in chunks of BLOCK_N. Sweep A reads the row (last chunk first) for
  its row sums; sweep B reads the band's chunks again (first chunk first), right after, from L2, and
  writes dx. The column accumulators of a band of BAND_CHUNKS chunks are a (BAND_CHUNKS, BLOCK_N)
  register tile. Rows wider than one band (MULTI_BAND) go in groups of GROUP rows, band by band: the band's
  accumulators resume from the program's own partial row (same threads, same layout: every column adds its
  rows in order, bit for bit as one band over all rows), sweep A runs in band 0 (row sums kept in the (M, 2)
  ROW_COEF); an element's second read comes at most a group of rows after its first (L2).
"""

from __future__ import annotations

import triton
import triton.language as tl

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


@triton.jit
def _tile_inputs(DY, DH_IN, X, R, H, W, S, MEAN, RSTD, rows, row_mask, cols, mask, N, stride_dy, stride_dh_in, stride_x,
                 stride_r, stride_h, w, weight_offset, s, scale, seed, keep_threshold, dropout_scale,
                 COMPUTE: tl.constexpr, IS_RMS: tl.constexpr, STORE_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 SCALE_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 LOAD_DH_IN: tl.constexpr, PARAMS_PER_ROW: tl.constexpr):
    """Everything a tile (rows: (ROWS, 1) int64, cols: (1, BLOCK_N)) derives from its inputs, each (M, N)
    element loaded once: (dy, xhat, g = dy * weight, residual (its storage dtype, see ``late_upcast``; 0
    unless it rebuilds h), dh_in (storage dtype, 0 unless LOAD_DH_IN: loaded with the other inputs, not
    after the row sums, so that its latency overlaps theirs), dropout keep mask (when h is rebuilt),
    rstd (ROWS, 1)). The parameters are w and s, or loaded here when PARAMS_PER_ROW."""
    dy = load_row(DY, rows, stride_dy, cols, mask, COMPUTE)
    dh_in = tl.zeros_like(dy)
    if LOAD_DH_IN:
        dh_in = tl.load(DH_IN + rows * stride_dh_in + cols, mask=mask, other=0.0)
    r = tl.zeros_like(dy)
    keep = mask
    if not STORE_H:
        if HAS_RESIDUAL:
            r = tl.load(R + rows * stride_r + cols, mask=mask, other=0.0)
        if HAS_DROPOUT:  # else the mask is drawn later, for dx only (fewer live registers)
            keep = philox_keep(seed, rows * N + cols, keep_threshold)
        # The forward took its statistics of the float32 sum (h was not stored): rebuild exactly that.
        h = load_row(X, rows, stride_x, cols, mask, COMPUTE)
        if HAS_DROPOUT:
            # A select suffices here: NaN/Inf at a dropped position made the row's saved statistics
            # NaN/Inf in the forward, so the whole row's gradient is already poisoned.
            h = tl.where(keep, h * dropout_scale, 0.0)
        if HAS_RESIDUAL:
            if PARAMS_PER_ROW:
                s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
            h = add_scaled(h, r.to(COMPUTE), s, SCALE_KIND)
    else:
        h = load_row(H, rows, stride_h, cols, mask, COMPUTE)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    if IS_RMS:
        xhat = h * rstd
    else:
        # Not zeroed where masked out: dy is 0 there, so g, g * xhat and dy * xhat are 0 too.
        xhat = (h - tl.load(MEAN + rows, mask=row_mask, other=0.0)) * rstd
    g = dy
    if HAS_WEIGHT:
        if PARAMS_PER_ROW:
            w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE) + weight_offset
        g = dy * w
    return dy, xhat, g, r, dh_in, keep, rstd


@triton.jit
def _tile_outputs(DX, DR, S, dh, dh_in, keep, s, scale, rows, cols, mask, N, stride_dx, stride_dr, seed,
                  keep_threshold, dropout_scale, COMPUTE: tl.constexpr, HAS_DH_IN: tl.constexpr,
                  SCALE_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr,
                  STORE_DRESIDUAL: tl.constexpr, PARAMS_PER_ROW: tl.constexpr):
    """Adds dh_in to dh, writes dx (and dresidual); returns the full dh (for dscale). ``keep`` is the
    dropout mask when h was rebuilt with it, else it is drawn here. With PARAMS_PER_ROW the scale is
    loaded here, after the dx store: a load that the compiler cannot merge with the one before the row
    sums (the store may alias), so s is not live across them."""
    if HAS_DH_IN:
        dh += late_upcast(dh_in, COMPUTE)
    dx = dh
    if HAS_DROPOUT:
        if STORE_H:
            keep = philox_keep(seed, rows * N + cols, keep_threshold)
        dx = tl.where(keep, dh * dropout_scale, 0.0)
    tl.store(DX + rows * stride_dx + cols, rounded_to(dx, DX), mask=mask)
    if STORE_DRESIDUAL:
        dr = dh
        if PARAMS_PER_ROW:
            s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
        if SCALE_KIND != 0:
            dr = dh * s
        tl.store(DR + rows * stride_dr + cols, rounded_to(dr, DR), mask=mask)
    return dh


@triton.jit
def _row_dh(g, xhat, rstd, mean_g, mean_gxhat, IS_RMS: tl.constexpr):
    if IS_RMS:
        return rstd * (g - xhat * mean_gxhat)
    else:
        return rstd * (g - mean_g - xhat * mean_gxhat)


@triton.jit(do_not_specialize=HOST_WORDS[2:])
def _backward_kernel(
    DY, DH_IN, X, R, H, W, S, MEAN, RSTD, SEED,  # inputs (see backends/contract.py); H when STORE_H, else X
    DX, DR,  # outputs: dx (M, N) x's dtype; dresidual (M, N) residual's dtype (STORE_DRESIDUAL)
    DW_PARTIAL, DB_PARTIAL, DS_PARTIAL,  # (num_programs, N) COMPUTE column sums; DS (num_programs,) if 0-d
    ROW_COEF,  # (M, 2) COMPUTE scratch for mean_g, mean_gxhat when MULTI_BAND
    stride_dy, stride_dh_in, stride_x, stride_r, stride_h, stride_dx, stride_dr,
    M, N, rows_per_program, num_bands,
    scale_hi, scale_lo, dropout_scale_hi, dropout_scale_lo, weight_offset_hi, weight_offset_lo,  # host_scalar
    keep_threshold,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BAND_CHUNKS: tl.constexpr,
    MULTI_BAND: tl.constexpr, GROUP: tl.constexpr, NUM_STAGES: tl.constexpr, PARAMS_PER_ROW: tl.constexpr,
    IS_RMS: tl.constexpr,
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
    # With a stored h the residual is read only for dscale (Pre-LN with a learned scale, DESIGN
    # section 5): after the row sums, so that it is not live in registers across them.
    LATE_R: tl.constexpr = LEARNED_SCALE and STORE_H
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    cols = tl.arange(0, BLOCK_N)[None, :]
    if BAND_CHUNKS == 1:
        col_mask = cols < N
        s = scale
        w = 1.0
        if not PARAMS_PER_ROW:  # else loaded in the row loop, where used
            s = load_scale(S, cols, col_mask, scale, COMPUTE, SCALE_KIND)
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(COMPUTE) + weight_offset
        dweight = tl.zeros((BLOCK_N,), COMPUTE)
        dbias = tl.zeros((BLOCK_N,), COMPUTE)
        dscale = tl.zeros((BLOCK_N,), COMPUTE)
        for first_row in tl.range(row_start, row_end, ROWS, num_stages=NUM_STAGES):
            # 64-bit offsets: row * stride may exceed 2^31.
            rows = tl.cast(first_row, tl.int64) + tl.arange(0, ROWS)[:, None]
            row_mask = rows < row_end
            mask = row_mask & col_mask
            dy, xhat, g, r, dh_in, keep, rstd = _tile_inputs(
                DY, DH_IN, X, R, H, W, S, MEAN, RSTD, rows, row_mask, cols, mask, N, stride_dy, stride_dh_in,
                stride_x, stride_r, stride_h, w, weight_offset, s, scale, seed, keep_threshold, dropout_scale,
                COMPUTE, IS_RMS, STORE_H, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT, HAS_DH_IN,
                PARAMS_PER_ROW)
            # Column sums that need no row statistic first: dy is dead before the row sums.
            if HAS_WEIGHT:
                dweight += tl.sum(dy * xhat, axis=0)
            if HAS_BIAS:
                dbias += tl.sum(dy, axis=0)
            # Both row sums in one reduction: g and xhat are live across one round of shuffles, not two.
            sum_g, sum_gx = row_sums(g, g * xhat, 1)
            dh = _row_dh(g, xhat, rstd, divide(sum_g, N, COMPUTE), divide(sum_gx, N, COMPUTE), IS_RMS)
            dh = _tile_outputs(DX, DR, S, dh, dh_in, keep, s, scale, rows, cols, mask, N, stride_dx, stride_dr,
                               seed, keep_threshold, dropout_scale, COMPUTE, HAS_DH_IN, SCALE_KIND, HAS_DROPOUT,
                               STORE_H, STORE_DRESIDUAL, PARAMS_PER_ROW)
            if LATE_R:
                r = tl.load(R + rows * stride_r + cols, mask=mask, other=0.0)
            if LEARNED_SCALE:
                # The residual stayed 16-bit across the row sums (half the registers); its float32 copy
                # from the h rebuild is not reused (see late_upcast).
                dscale += tl.sum(dh * late_upcast(r, COMPUTE), axis=0)
        columns = tl.arange(0, BLOCK_N)
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + partial_row + columns, dweight, mask=columns < N)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + partial_row + columns, dbias, mask=columns < N)
        if SCALE_KIND == 3:
            tl.store(DS_PARTIAL + partial_row + columns, dscale, mask=columns < N)
        elif SCALE_KIND == 2:
            tl.store(DS_PARTIAL + pid, tl.sum(dscale, axis=0))
    else:
        band_chunk = tl.arange(0, BAND_CHUNKS)[:, None]  # (BAND_CHUNKS, 1): a chunk of the band
        dscale_total = tl.zeros((), COMPUTE)  # 0-d scale: the program's sum, chunk by chunk
        if MULTI_BAND:
            # Groups of GROUP rows, band by band, the sums resumed from the partial row: a later band is
            # re-read at most GROUP rows after sweep A read it, from L2 (heuristics.CHUNKED_GROUP_ROWS).
            for group_start in range(row_start, row_end, GROUP):
                group_end = tl.minimum(group_start + GROUP, row_end)
                for band in range(0, num_bands):
                    band_cols = (band * BAND_CHUNKS + band_chunk) * BLOCK_N + cols
                    resumed = (band_cols < N) & (group_start > row_start)  # the program's first group: zeros
                    dweight = tl.zeros((BAND_CHUNKS, BLOCK_N), COMPUTE)
                    dbias = tl.zeros((BAND_CHUNKS, BLOCK_N), COMPUTE)
                    dscale = tl.zeros((BAND_CHUNKS, BLOCK_N), COMPUTE)
                    if HAS_WEIGHT:
                        dweight = tl.load(DW_PARTIAL + partial_row + band_cols, mask=resumed, other=0.0)
                    if HAS_BIAS:
                        dbias = tl.load(DB_PARTIAL + partial_row + band_cols, mask=resumed, other=0.0)
                    if SCALE_KIND == 3:
                        dscale = tl.load(DS_PARTIAL + partial_row + band_cols, mask=resumed, other=0.0)
                    dweight, dbias, dscale, dscale_total = _band_rows(
                        DY, DH_IN, X, R, H, W, S, MEAN, RSTD, DX, DR, ROW_COEF, group_start, group_end, band, M, N,
                        cols, band_chunk, dweight, dbias, dscale, dscale_total, stride_dy, stride_dh_in, stride_x,
                        stride_r, stride_h, stride_dx, stride_dr, weight_offset, scale, seed, keep_threshold,
                        dropout_scale, COMPUTE, BLOCK_N, BAND_CHUNKS, True, NUM_STAGES, IS_RMS, STORE_H,
                        HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT, HAS_BIAS, HAS_DH_IN, STORE_DRESIDUAL,
                        LATE_R)
                    _store_band(DW_PARTIAL, DB_PARTIAL, DS_PARTIAL, partial_row, band_cols, N, dweight, dbias,
                                dscale, HAS_WEIGHT, HAS_BIAS, SCALE_KIND)
                    tl.debug_barrier()  # the next band reads the row coefficients, the next group the partials
        else:
            for band in range(0, num_bands):  # one band; as a loop, as before the groups (4 B spills without)
                dweight = tl.zeros((BAND_CHUNKS, BLOCK_N), COMPUTE)
                dbias = tl.zeros((BAND_CHUNKS, BLOCK_N), COMPUTE)
                dscale = tl.zeros((BAND_CHUNKS, BLOCK_N), COMPUTE)
                dweight, dbias, dscale, dscale_total = _band_rows(
                    DY, DH_IN, X, R, H, W, S, MEAN, RSTD, DX, DR, ROW_COEF, row_start, row_end, band, M, N, cols,
                    band_chunk, dweight, dbias, dscale, dscale_total, stride_dy, stride_dh_in, stride_x, stride_r,
                    stride_h, stride_dx, stride_dr, weight_offset, scale, seed, keep_threshold, dropout_scale,
                    COMPUTE, BLOCK_N, BAND_CHUNKS, False, NUM_STAGES, IS_RMS, STORE_H, HAS_RESIDUAL, SCALE_KIND,
                    HAS_DROPOUT, HAS_WEIGHT, HAS_BIAS, HAS_DH_IN, STORE_DRESIDUAL, LATE_R)
                band_cols = (band * BAND_CHUNKS + band_chunk) * BLOCK_N + cols
                _store_band(DW_PARTIAL, DB_PARTIAL, DS_PARTIAL, partial_row, band_cols, N, dweight, dbias, dscale,
                            HAS_WEIGHT, HAS_BIAS, SCALE_KIND)
        if SCALE_KIND == 2:
            tl.store(DS_PARTIAL + pid, dscale_total)


@triton.jit
def _store_band(DW_PARTIAL, DB_PARTIAL, DS_PARTIAL, partial_row, band_cols, N, dweight, dbias, dscale,
                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_KIND: tl.constexpr):
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + partial_row + band_cols, dweight, mask=band_cols < N)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + partial_row + band_cols, dbias, mask=band_cols < N)
    if SCALE_KIND == 3:
        tl.store(DS_PARTIAL + partial_row + band_cols, dscale, mask=band_cols < N)


@triton.jit
def _band_rows(DY, DH_IN, X, R, H, W, S, MEAN, RSTD, DX, DR, ROW_COEF, first_row, end_row, band, M, N, cols,
               band_chunk, dweight, dbias, dscale, dscale_total, stride_dy, stride_dh_in, stride_x, stride_r,
               stride_h, stride_dx, stride_dr, weight_offset, scale, seed, keep_threshold, dropout_scale,
               COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, BAND_CHUNKS: tl.constexpr, MULTI_BAND: tl.constexpr,
               NUM_STAGES: tl.constexpr, IS_RMS: tl.constexpr, STORE_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
               SCALE_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_DH_IN: tl.constexpr, STORE_DRESIDUAL: tl.constexpr,
               LATE_R: tl.constexpr):
    """Rows [first_row, end_row) of a chunked backward on one band (sweep A in band 0, sweep B of the band):
    the band's column accumulators (BAND_CHUNKS, BLOCK_N) and a 0-d scale's sum, these rows added in order."""
    for row32 in range(first_row, end_row):
        rows = tl.cast(row32, tl.int64) + tl.zeros((1, 1), tl.int64)
        row_mask = rows < M
        if MULTI_BAND:
            if band == 0:
                mean_g, mean_gxhat = _row_coefficients(
                    DY, X, R, H, W, S, MEAN, RSTD, rows, row_mask, cols, N, stride_dy, stride_x, stride_r,
                    stride_h, weight_offset, scale, seed, keep_threshold, dropout_scale, COMPUTE, BLOCK_N,
                    NUM_STAGES, IS_RMS, STORE_H, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT)
                tl.store(ROW_COEF + 2 * rows, mean_g)
                tl.store(ROW_COEF + 2 * rows + 1, mean_gxhat)
            else:
                mean_g = tl.load(ROW_COEF + 2 * rows)
                mean_gxhat = tl.load(ROW_COEF + 2 * rows + 1)
        else:
            mean_g, mean_gxhat = _row_coefficients(
                DY, X, R, H, W, S, MEAN, RSTD, rows, row_mask, cols, N, stride_dy, stride_x, stride_r,
                stride_h, weight_offset, scale, seed, keep_threshold, dropout_scale, COMPUTE, BLOCK_N,
                NUM_STAGES, IS_RMS, STORE_H, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT)
        # Sweep B: the band's chunks again, first chunk first (the last one sweep A read).
        for c in tl.static_range(BAND_CHUNKS):
            chunk_cols = (band * BAND_CHUNKS + c) * BLOCK_N + cols
            mask = row_mask & (chunk_cols < N)
            s = load_scale(S, chunk_cols, mask, scale, COMPUTE, SCALE_KIND)
            w = 1.0
            if HAS_WEIGHT:
                w = tl.load(W + chunk_cols, mask=mask, other=0.0).to(COMPUTE) + weight_offset
            dy, xhat, g, r, dh_in, keep, rstd = _tile_inputs(
                DY, DH_IN, X, R, H, W, S, MEAN, RSTD, rows, row_mask, chunk_cols, mask, N, stride_dy,
                stride_dh_in, stride_x, stride_r, stride_h, w, weight_offset, s, scale, seed, keep_threshold,
                dropout_scale, COMPUTE, IS_RMS, STORE_H, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT,
                HAS_DH_IN, False)
            dh = _row_dh(g, xhat, rstd, mean_g, mean_gxhat, IS_RMS)
            dh = _tile_outputs(DX, DR, S, dh, dh_in, keep, s, scale, rows, chunk_cols, mask, N, stride_dx,
                               stride_dr, seed, keep_threshold, dropout_scale, COMPUTE, HAS_DH_IN,
                               SCALE_KIND, HAS_DROPOUT, STORE_H, STORE_DRESIDUAL, False)
            # Chunk c's row of the accumulator tiles (c is a constant: the select folds away).
            here = band_chunk == c
            if HAS_WEIGHT:
                dweight = tl.where(here, dweight + dy * xhat, dweight)
            if HAS_BIAS:
                dbias = tl.where(here, dbias + dy, dbias)
            if LATE_R:
                r = tl.load(R + rows * stride_r + chunk_cols, mask=mask, other=0.0)
            if SCALE_KIND == 3:
                dscale = tl.where(here, dscale + dh * late_upcast(r, COMPUTE), dscale)
            elif SCALE_KIND == 2:  # a 0-d scale needs no column accumulator: one value, in order
                dscale_total += tl.sum(tl.sum(dh * late_upcast(r, COMPUTE), axis=1), axis=0)
    return dweight, dbias, dscale, dscale_total


@triton.jit
def _row_coefficients(DY, X, R, H, W, S, MEAN, RSTD, rows, row_mask, cols, N, stride_dy, stride_x, stride_r, stride_h,
                      weight_offset, scale, seed, keep_threshold, dropout_scale, COMPUTE: tl.constexpr,
                      BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr, IS_RMS: tl.constexpr, STORE_H: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr,
                      SCALE_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Sweep A of a chunked row: (mean_g, mean_gxhat), reading the row's chunks last to first, so that
    sweep B finds the first chunks -- which it takes first -- most recently read (L2). The chunk loop
    prefetches (NUM_STAGES): one chunk of a program of 8-16 warps is 8-24 KB, short of what an SM needs
    in flight to cover DRAM latency."""
    acc_g = tl.zeros((1, BLOCK_N), COMPUTE)
    acc_gx = tl.zeros((1, BLOCK_N), COMPUTE)
    num_chunks = tl.cdiv(N, BLOCK_N)
    for k in tl.range(0, num_chunks, num_stages=NUM_STAGES):
        chunk_cols = (num_chunks - 1 - k) * BLOCK_N + cols
        mask = row_mask & (chunk_cols < N)
        s = load_scale(S, chunk_cols, mask, scale, COMPUTE, SCALE_KIND)
        w = 1.0
        if HAS_WEIGHT:
            w = tl.load(W + chunk_cols, mask=mask, other=0.0).to(COMPUTE) + weight_offset
        dy, xhat, g, r, dh_in, keep, rstd = _tile_inputs(
            DY, DY, X, R, H, W, S, MEAN, RSTD, rows, row_mask, chunk_cols, mask, N, stride_dy, 0, stride_x, stride_r,
            stride_h, w, weight_offset, s, scale, seed, keep_threshold, dropout_scale, COMPUTE, IS_RMS, STORE_H,
            HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT, HAS_WEIGHT, False, False)
        acc_g += g
        acc_gx += g * xhat
    sum_g, sum_gx = row_sums(acc_g, acc_gx, 1)
    return divide(sum_g, N, COMPUTE), divide(sum_gx, N, COMPUTE)


@triton.jit
def _reduce_partials_kernel(
    DW_PARTIAL, DB_PARTIAL, DS_PARTIAL,  # the backward's partials: (P, N) COMPUTE; DS (P,) for a 0-d scale
    DW, DB, DS,  # dweight (N,), dbias (N,), dscale (N,) or (): each in its parameter's dtype
    num_partials, N,
    BLOCK_C: tl.constexpr, STRANDS: tl.constexpr, COMPUTE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE_KIND: tl.constexpr,
):
    """Every parameter gradient from the partials, in one launch and a fixed order: for each column,
    STRANDS interleaved running sums over the partial rows (each in increasing row order), then a fixed
    tree over the strands. Program 0 also sums a 0-d scale's (P,) partials the same way."""
    pid = tl.program_id(0)
    columns = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    strand = tl.arange(0, STRANDS)[:, None]
    if HAS_WEIGHT:
        _reduce_columns(DW_PARTIAL, DW, columns, strand, num_partials, N, BLOCK_C, STRANDS, COMPUTE)
    if HAS_BIAS:
        _reduce_columns(DB_PARTIAL, DB, columns, strand, num_partials, N, BLOCK_C, STRANDS, COMPUTE)
    if SCALE_KIND == 3:
        _reduce_columns(DS_PARTIAL, DS, columns, strand, num_partials, N, BLOCK_C, STRANDS, COMPUTE)
    elif SCALE_KIND == 2:
        if pid == 0:
            offsets = tl.arange(0, STRANDS * BLOCK_C)
            acc = tl.zeros((STRANDS * BLOCK_C,), COMPUTE)
            for first in range(0, num_partials, STRANDS * BLOCK_C):
                acc += tl.load(DS_PARTIAL + first + offsets, mask=first + offsets < num_partials, other=0.0)
            tl.store(DS, rounded_to(tl.sum(acc, axis=0), DS))


@triton.jit
def _reduce_columns(PARTIAL, OUT, columns, strand, num_partials, N, BLOCK_C: tl.constexpr, STRANDS: tl.constexpr,
                    COMPUTE: tl.constexpr):
    cols = columns[None, :]
    acc = tl.zeros((STRANDS, BLOCK_C), COMPUTE)
    for first in range(0, num_partials, STRANDS):
        rows = first + strand
        acc += tl.load(PARTIAL + rows.to(tl.int64) * N + cols, mask=(rows < num_partials) & (cols < N), other=0.0)
    tl.store(OUT + columns, rounded_to(tl.sum(acc, axis=0), OUT), mask=columns < N)
