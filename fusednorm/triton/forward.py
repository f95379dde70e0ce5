"""The Triton forward kernel: one kernel for every variant, the variants as constexpr flags.

Flags: those of ``fusednorm.variant.Variant.triton_forward_flags`` (IS_RMS, HAS_RESIDUAL, SCALE_KIND
(0: none, 1: host constant, 2: 0-d tensor, 3: (N,) tensor), HAS_DROPOUT, STORE_H, HAS_WEIGHT,
HAS_BIAS, STORE_STATS), plus the launch's COMPUTE (tl.float32, or tl.float64 for float64 inputs), BLOCK_N
(columns per block), ROWS (rows per tile: several for short rows), NUM_CHUNKS (column blocks per row: 1 =
the whole row in registers), NUM_STAGES (prefetch depth of the one-pass row loop) and PARAMS_PER_ROW (the
(N,) parameters re-read per row rather than held); see heuristics.py. Host floats
arrive as float64 bit words (``helpers.host_scalar``).

Per row (DESIGN section 1):
    h = residual * s + dropout(x);  [stored h rounded to h's dtype and used rounded from then on]
    LayerNorm: mean = sum(h) / N;  var = sum((h - mean)^2) / N   (two passes over registers)
    RMSNorm:   var = sum(h^2) / N
    rstd = 1 / sqrt(var + eps);  xhat = (h - mean) * rstd;  y = xhat * (weight + weight_offset) + bias

Rows up to 16384 columns take the one-pass path (the byte floor of DESIGN section 5). Wider rows
(NUM_CHUNKS > 1) are walked in column chunks: chunk statistics (two-pass inside the chunk) merged
with Chan's (count, mean, M2) update, then a second sweep that writes y, re-reading h from the h just
written (STORE_H) or re-reading x and residual. Inputs are read twice, but the second sweep follows
the first on the same row, so it mostly hits L2 (x and residual of a 65536-wide fp16 row are 256 KB).

STORE_STATS (telemetry, DESIGN section 7) also writes a row of eight float32 statistics per row
(``telemetry.py``), from the registers of the first sweep; off, none of its code is traced.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .helpers import (
    add_scaled,
    divide,
    host_scalar,
    load_row,
    load_scale,
    merge_moments,
    philox_keep,
    rounded_to,
    row_rstd,
)
from .telemetry import h_stats, merge_stats, pre_norm_moments, store_stats, zero_stats

# Host floats are bit words: their values must not specialize (recompile) the kernels.
HOST_WORDS = ["eps_hi", "eps_lo", "scale_hi", "scale_lo", "dropout_scale_hi", "dropout_scale_lo", "weight_offset_hi",
              "weight_offset_lo"]


@triton.jit
def _pre_norm_row(X, R, S, row, cols, mask, N, stride_x, stride_r, seed, keep_threshold, dropout_scale, s,
                  COMPUTE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SCALE_KIND: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr):
    """h = residual * s + dropout(x) for one row chunk, in COMPUTE (0 where masked out)."""
    h = load_row(X, row, stride_x, cols, mask, COMPUTE)
    if HAS_DROPOUT:
        keep = philox_keep(seed, row * N + cols, keep_threshold)
        # A product, not a select: NaN/Inf at a dropped position still poisons its row (as F.dropout).
        h = h * tl.where(keep, dropout_scale, 0.0)
    if HAS_RESIDUAL:
        h = add_scaled(h, load_row(R, row, stride_r, cols, mask, COMPUTE), s, SCALE_KIND)
    return h


@triton.jit
def _store_rounded_h(H, h, row, stride_h, cols, mask, COMPUTE: tl.constexpr):
    """Store h in H's dtype and return the rounded value: the backward will read exactly that."""
    h_stored = rounded_to(h, H)
    tl.store(H + row * stride_h + cols, h_stored, mask=mask)
    return h_stored.to(COMPUTE)


@triton.jit(do_not_specialize=HOST_WORDS)
def _forward_kernel(
    X, R, W, B, S, SEED,  # x, residual: (M, N); weight, bias: (N,); residual_scale: () or (N,); seed: (1,) int64
    Y, H, MEAN, RSTD,  # y: (M, N) x's dtype; h: (M, N) h_dtype (STORE_H); mean, rstd: (M,) COMPUTE
    STATS,  # (M, 8) float32 row statistics (STORE_STATS), else None
    stride_x, stride_r, stride_y, stride_h,  # row strides, in elements (columns are contiguous)
    M, N, rows_per_program,
    eps_hi, eps_lo, scale_hi, scale_lo, dropout_scale_hi, dropout_scale_lo,  # host floats (host_scalar)
    weight_offset_hi, weight_offset_lo,
    keep_threshold,  # dropout: keep where (philox >> 8) >= keep_threshold
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    NUM_STAGES: tl.constexpr, PARAMS_PER_ROW: tl.constexpr, IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SCALE_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_STATS: tl.constexpr,
):
    row_start = tl.program_id(0) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    eps = host_scalar(eps_hi, eps_lo, COMPUTE)
    scale = host_scalar(scale_hi, scale_lo, COMPUTE)
    dropout_scale = host_scalar(dropout_scale_hi, dropout_scale_lo, COMPUTE)
    weight_offset = host_scalar(weight_offset_hi, weight_offset_lo, COMPUTE)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    if NUM_CHUNKS == 1:
        cols = tl.arange(0, BLOCK_N)[None, :]
        col_mask = cols < N
        # Parameters are loaded once per program, not once per row -- except with PARAMS_PER_ROW (16384
        # columns, 32 warps: at most 64 registers per thread, 16 columns each, where h and three held (N,)
        # parameters, or a Philox stream, leave too few): there they are re-read per row where used (L1
        # hits; a store in the loop keeps the compiler from hoisting them). See heuristics.py.
        s = scale
        if not PARAMS_PER_ROW:
            s = load_scale(S, cols, col_mask, scale, COMPUTE, SCALE_KIND)
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(COMPUTE) + weight_offset
            if HAS_BIAS:
                b = tl.load(B + cols, mask=col_mask, other=0.0).to(COMPUTE)
        # Tiles of ROWS rows; prefetch: with NUM_STAGES = 3 the next tiles' x and residual are copied to
        # shared memory (cp.async) while this one is computed (heuristics.py).
        for first_row in tl.range(row_start, row_end, ROWS, num_stages=NUM_STAGES):
            # 64-bit offsets: row * stride may exceed 2^31.
            rows = tl.cast(first_row, tl.int64) + tl.arange(0, ROWS)[:, None]
            row_mask = rows < row_end
            mask = row_mask & col_mask
            s_row = s
            if PARAMS_PER_ROW:
                s_row = load_scale(S, cols, col_mask, scale, COMPUTE, SCALE_KIND)
            if STORE_STATS:  # the row statistics of a tile: reduced along its rows (TILE)
                h, mean_f, m2_f, mean_r, m2_r = pre_norm_moments(
                    X, R, rows, cols, mask, N, N, stride_x, stride_r, seed, keep_threshold, dropout_scale, s_row,
                    COMPUTE, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT, True)
            else:
                h = _pre_norm_row(X, R, S, rows, cols, mask, N, stride_x, stride_r, seed, keep_threshold,
                                  dropout_scale, s_row, COMPUTE, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT)
            if STORE_H:
                h = _store_rounded_h(H, h, rows, stride_h, cols, mask, COMPUTE)
            if STORE_STATS:
                mean_h, m2_h, largest, nonfinite = h_stats(h, mask, N, COMPUTE, True)
                store_stats(STATS, rows, mean_f, m2_f, mean_r, m2_r, mean_h, m2_h, largest, nonfinite, row_mask)
            if IS_RMS:
                xhat = h  # times rstd below
                var = divide(tl.sum(h * h, axis=1, keep_dims=True), N, COMPUTE)
            else:
                mean = divide(tl.sum(h, axis=1, keep_dims=True), N, COMPUTE)
                xhat = tl.where(mask, h - mean, 0.0)
                var = divide(tl.sum(xhat * xhat, axis=1, keep_dims=True), N, COMPUTE)
                tl.store(MEAN + rows, mean, mask=row_mask)
            rstd = row_rstd(var, eps, COMPUTE)
            tl.store(RSTD + rows, rstd, mask=row_mask)
            y = xhat * rstd
            if PARAMS_PER_ROW:
                if HAS_WEIGHT:
                    w = tl.load(W + cols, mask=col_mask, other=0.0).to(COMPUTE) + weight_offset
                if HAS_BIAS:
                    b = tl.load(B + cols, mask=col_mask, other=0.0).to(COMPUTE)
            if HAS_WEIGHT:
                y = y * w
            if HAS_BIAS:
                y = y + b
            tl.store(Y + rows * stride_y + cols, rounded_to(y, Y), mask=mask)
    else:
        for row32 in range(row_start, row_end):
            row = tl.cast(row32, tl.int64)  # 64-bit offsets: row * stride may exceed 2^31
            # Sweep 1: statistics, chunk by chunk (and h written out).
            count = tl.zeros((), COMPUTE)
            mean = tl.zeros((), COMPUTE)
            m2 = tl.zeros((), COMPUTE)
            if STORE_STATS:
                seen, mean_f, m2_f, mean_r, m2_r, mean_h, m2_h, largest, nonfinite = zero_stats(COMPUTE)
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
                mask = cols < N
                s = load_scale(S, cols, mask, scale, COMPUTE, SCALE_KIND)
                if STORE_STATS:
                    chunk_count = tl.minimum(N - chunk * BLOCK_N, BLOCK_N).to(COMPUTE)
                    h, c_mean_f, c_m2_f, c_mean_r, c_m2_r = pre_norm_moments(
                        X, R, row, cols, mask, N, chunk_count, stride_x, stride_r, seed, keep_threshold, dropout_scale,
                        s, COMPUTE, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT, False)
                else:
                    h = _pre_norm_row(X, R, S, row, cols, mask, N, stride_x, stride_r, seed, keep_threshold,
                                      dropout_scale, s, COMPUTE, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT)
                if STORE_H:
                    h = _store_rounded_h(H, h, row, stride_h, cols, mask, COMPUTE)
                if STORE_STATS:
                    c_mean_h, c_m2_h, c_largest, c_nonfinite = h_stats(h, mask, chunk_count, COMPUTE, False)
                    seen, mean_f, m2_f, mean_r, m2_r, mean_h, m2_h, largest, nonfinite = merge_stats(
                        seen, mean_f, m2_f, mean_r, m2_r, mean_h, m2_h, largest, nonfinite,
                        chunk_count, c_mean_f, c_m2_f, c_mean_r, c_m2_r, c_mean_h, c_m2_h, c_largest, c_nonfinite)
                if IS_RMS:
                    m2 += tl.sum(h * h, axis=0)
                else:
                    chunk_count = tl.minimum(N - chunk * BLOCK_N, BLOCK_N).to(COMPUTE)
                    chunk_mean = tl.sum(h, axis=0) / chunk_count
                    centered = tl.where(mask, h - chunk_mean, 0.0)
                    count, mean, m2 = merge_moments(count, mean, m2, chunk_count, chunk_mean,
                                                    tl.sum(centered * centered, axis=0))
            rstd = row_rstd(divide(m2, N, COMPUTE), eps, COMPUTE)
            if STORE_STATS:
                store_stats(STATS, row, mean_f, m2_f, mean_r, m2_r, mean_h, m2_h, largest, nonfinite, None)
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
                                      dropout_scale, s, COMPUTE, HAS_RESIDUAL, SCALE_KIND, HAS_DROPOUT)
                if IS_RMS:
                    y = h * rstd
                else:
                    y = (h - mean) * rstd
                if HAS_WEIGHT:
                    y = y * (tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE) + weight_offset)
                if HAS_BIAS:
                    y = y + tl.load(B + cols, mask=mask, other=0.0).to(COMPUTE)
                tl.store(Y + row * stride_y + cols, rounded_to(y, Y), mask=mask)
