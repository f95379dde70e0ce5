"""@triton.jit pieces of the forward's optional row statistics (STORE_STATS; DESIGN section 7).

Per row the forward already holds the branch f = dropout(x), the residual and h in registers; with
STORE_STATS it also writes, to an (M, 8) float32 tensor, the columns of
``fusednorm.backends.contract.STATS_COLUMNS``: the mean and M2 = sum((v - mean)^2) of f, of the stream
residual * s and of h (two-pass over registers; chunk statistics merged with Chan's update for rows
walked in chunks), max|h| (NaN ignored) and the number of non-finite h values. No (M, N) tensor is
read or written twice for it. Without STORE_STATS none of this is traced: the kernel compiles as before.

TILE: the values are a 2-D tile of rows, (ROWS, BLOCK_N), reduced along axis 1 to (ROWS, 1) statistics
(the forward's one-pass path); else a 1-D row chunk reduced to scalars (the chunked path).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .helpers import add_scaled, divide, load_row, merge_moments, philox_keep

STATS_WIDTH: tl.constexpr = tl.constexpr(8)  # len(contract.STATS_COLUMNS)


@triton.jit
def pre_norm_moments(X, R, row, cols, mask, N, count, stride_x, stride_r, seed, keep_threshold, dropout_scale, s,
                     COMPUTE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SCALE_KIND: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, TILE: tl.constexpr):
    """h for one row chunk (in COMPUTE, 0 where masked out), and the (mean, M2) of f = dropout(x) and of
    residual * s over its ``count`` columns. h is computed exactly as forward._pre_norm_row computes it
    (same operations, same order), so y does not change with the flag. The moments of f are taken before
    the residual is loaded, so that f, the residual and residual * s are not all live at once."""
    branch = load_row(X, row, stride_x, cols, mask, COMPUTE)
    if HAS_DROPOUT:
        keep = philox_keep(seed, row * N + cols, keep_threshold)
        branch = branch * tl.where(keep, dropout_scale, 0.0)
    mean_f, m2_f = _moments(branch, mask, count, COMPUTE, TILE)
    if HAS_RESIDUAL:
        residual = load_row(R, row, stride_r, cols, mask, COMPUTE)
        if SCALE_KIND == 0:
            mean_r, m2_r = _moments(residual, mask, count, COMPUTE, TILE)
        else:
            mean_r, m2_r = _moments(residual * s, mask, count, COMPUTE, TILE)
        h = add_scaled(branch, residual, s, SCALE_KIND)
    else:
        mean_r = tl.zeros_like(mean_f)
        m2_r = tl.zeros_like(mean_f)
        h = branch
    return h, mean_f, m2_f, mean_r, m2_r


@triton.jit
def _row_sum(v, TILE: tl.constexpr):
    """The sum of each row: (ROWS, 1) of a TILE, else a scalar."""
    if TILE:
        total = tl.sum(v, axis=1, keep_dims=True)
    else:
        total = tl.sum(v, axis=0)
    return total


@triton.jit
def _row_max(v, TILE: tl.constexpr):
    if TILE:
        largest = tl.max(v, axis=1, keep_dims=True)
    else:
        largest = tl.max(v, axis=0)
    return largest


@triton.jit
def _moments(v, mask, count, COMPUTE: tl.constexpr, TILE: tl.constexpr):
    """(mean, M2) of the masked-in entries of v (masked-out entries are 0); count: how many, in COMPUTE."""
    mean = divide(_row_sum(v, TILE), count, COMPUTE)
    centered = tl.where(mask, v - mean, 0.0)
    return mean, _row_sum(centered * centered, TILE)


@triton.jit
def h_stats(h, mask, count, COMPUTE: tl.constexpr, TILE: tl.constexpr):
    """(mean, M2, max|h| with NaN ignored, number of non-finite entries) of h over ``count`` columns;
    masked-out entries are 0, so they count in neither extreme."""
    mean_h, m2_h = _moments(h, mask, count, COMPUTE, TILE)
    magnitude = tl.abs(h)
    largest = _row_max(tl.where(magnitude == magnitude, magnitude, 0.0), TILE)  # NaN != NaN
    nonfinite = _row_sum(tl.where(magnitude < float("inf"), 0.0, 1.0), TILE)  # NaN < inf is false too
    return mean_h, m2_h, largest, nonfinite


@triton.jit
def zero_stats(COMPUTE: tl.constexpr):
    """The running statistics of a row before its first chunk: (count, the eight columns)."""
    zero = tl.zeros((), COMPUTE)
    return zero, zero, zero, zero, zero, zero, zero, zero, zero


@triton.jit
def merge_stats(count, mean_f, m2_f, mean_r, m2_r, mean_h, m2_h, largest, nonfinite,
                chunk_count, c_mean_f, c_m2_f, c_mean_r, c_m2_r, c_mean_h, c_m2_h, c_largest, c_nonfinite):
    """The running statistics of a row's first chunks merged with those of its next chunk (Chan)."""
    _, mean_f, m2_f = merge_moments(count, mean_f, m2_f, chunk_count, c_mean_f, c_m2_f)
    _, mean_r, m2_r = merge_moments(count, mean_r, m2_r, chunk_count, c_mean_r, c_m2_r)
    count, mean_h, m2_h = merge_moments(count, mean_h, m2_h, chunk_count, c_mean_h, c_m2_h)
    return (count, mean_f, m2_f, mean_r, m2_r, mean_h, m2_h, tl.maximum(largest, c_largest),
            nonfinite + c_nonfinite)


@triton.jit
def store_stats(STATS, row, mean_f, m2_f, mean_r, m2_r, mean_h, m2_h, largest, nonfinite, row_mask):
    """Row ``row`` of the (M, 8) float32 STATS tensor, in contract.STATS_COLUMNS order (``row``: an int64
    scalar and row_mask None, or a tile's (ROWS, 1) rows and which of them exist)."""
    base = STATS + row * STATS_WIDTH
    tl.store(base + 0, mean_f.to(tl.float32), mask=row_mask)
    tl.store(base + 1, m2_f.to(tl.float32), mask=row_mask)
    tl.store(base + 2, mean_r.to(tl.float32), mask=row_mask)
    tl.store(base + 3, m2_r.to(tl.float32), mask=row_mask)
    tl.store(base + 4, mean_h.to(tl.float32), mask=row_mask)
    tl.store(base + 5, m2_h.to(tl.float32), mask=row_mask)
    tl.store(base + 6, largest.to(tl.float32), mask=row_mask)
    tl.store(base + 7, nonfinite.to(tl.float32), mask=row_mask)
