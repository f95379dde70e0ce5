"""Launch heuristics for the Triton kernels: tiles, warps, prefetch depth, and the row partition.

No autotuning: the kernels are memory bound, so what matters is (a) whether a row fits in registers
(one pass over global memory), (b) enough bytes in flight per SM to cover DRAM latency, and (c) for
the backward, few column partials. All three follow from (N, dtype, variant); an autotuner would add a
benchmark sweep (and a host sync) at the first call of every new N and cannot run in the interpreter.

**Determinism across GPUs (DESIGN section 2).** Every choice here is a pure function of (M, N, dtype,
variant): nothing reads the SM count, so the backward's row partition -- and with it the bits of
dweight, dbias and dscale -- is the same on an H100, an A100, an H200 or a MIG slice, and under the
interpreter. The partition is sized for a reference chip of ``REFERENCE_SMS`` = 132 SMs (H100/H200 SXM)
running ``BACKWARD_WAVES`` = 2 waves; a chip with other SM counts runs the same programs in its own
waves (108 SMs: 2.44 waves of work in 3; a 16-SM MIG slice: 16.5 in 17).

**Forward** (rows of up to ``MAX_BLOCK_N`` = 16384 columns in registers): ``BLOCK_N =
next_power_of_2(N)``, 16 elements per thread (two 128-bit accesses per 16-bit tensor): ``num_warps =
elements / 512``, 1 to 32; rows of up to 1024 columns go ``TILE_ELEMENTS // BLOCK_N`` to a tile (e.g.
[4, 1024], 8 warps), wider ones one per tile. Wider rows than 16384 take column chunks of 16384 (read
twice, the second time right after the first, from L2). At 16384 columns (32 warps: at most 64
registers per thread) a heavy variant or one with two or more (N,) parameters re-reads the parameters per
row (``params_per_row``) instead of holding them (they spilled 4-120 B per thread), and so does 32-bit x
with dropout and two or more (N,) parameters at 8192 columns; 32-bit x with dropout or row statistics, and
row statistics with a residual, take chunks of 8192 with 32 warps from 16384 columns on (32-bit x with
statistics and neither residual nor dropout: 2048, 4 warps).
Programs:
``FORWARD_OVERSUBSCRIPTION`` x the reference chip's warp slots (the forward has no partials: more,
smaller programs even out the waves on any chip).

**Backward**, three shapes of work of the one kernel (backward.py):

- N <= 1024: tiles of ``TILE_ELEMENTS // BLOCK_N`` rows (e.g. [4, 1024]) with 8 warps (16 for heavy
  variants: 8 elements per thread; at 8 warps triton 3.6 spilled 8-16 B in three at 128 registers; capped at
  128 registers with triton >= 3.7, see ``BACKWARD_MAX_REGISTERS``), so that a program keeps 16-24 KB of
  loads per tile in flight (one 1024-wide row of 1-2 warps had 4-8 KB).
- N <= ``MAX_BLOCK_N_BACKWARD`` = 8192 (4096 for ``heavy`` variants or three column sums): one row per
  tile, the whole row in registers (16 elements per thread, 2-16 warps). The backward keeps ~10 float32
  values per column live (dy, xhat, g, the residual, the parameters, the column accumulators): at 8192
  columns (16 warps, 128 registers per thread) that fits only the lighter variants, and 16384 columns
  in one tile spill for all. With a learned scale, 8192-wide rows re-read weight and scale per row.
- Wider rows: column chunks (``CHUNKED_BACKWARD``: 1024-4096 columns, 16 warps), one row at a time:
  sweep A reads the row (last chunk first, prefetched) for its two row sums, sweep B reads it again
  (first chunk first, so the most recently read chunk comes first) while it is still in L2 -- a row of
  16384 16-bit columns is 32 KB per tensor, 132 programs keep ~13 MB of L2 busy -- and writes dx. The
  column accumulators of a band of chunks (band * column sums / 512 registers per thread) stay in
  registers. Rows wider than one band go in groups of ``CHUNKED_GROUP_ROWS`` = 2 rows, band by band: each
  band of a group resumes its column sums from the program's partial row (exact: every column still adds
  its rows in order), sweep A runs in band 0 and keeps the row sums in an (M, 2) scratch, and a later
  band's columns are re-read a group of rows after sweep A (L2, not DRAM).
  The band is 16384 columns with at most one column sum (rms_norm, add_rms_norm in either layout;
  heavy variants: none), 8192 with two (layer_norm: 2048 x 4) or one for heavy variants, 4096 with three
  (a learned (N,) scale with weight and bias: 2048 x 2) or two for heavy variants (``CHUNKED_BACKWARD``; a
  0-d scale's sum counts; 32-bit x with dropout halves it, except with two (N,) sums or a 0-d scale: 1024 x 2
  spilled at 64 registers where 1024 x 4 did not; Pre-LN with dropout and 16-bit x halves it when the row takes
  several bands): the widest bands that compiled without spills on triton 3.6 and 3.8 (ptxas is not
  monotonic in the band). Chunks of 2048 keep 16-24 KB of sweep A in flight per SM (1024: 8-12 KB).
  With triton >= 3.7 the chunked backward also caps ptxas at 128 registers
  (``BACKWARD_MAX_REGISTERS``, the one Triton-version-dependent choice).

**Row partition (backward).** Each program takes a contiguous range of rows, whole tiles, and writes
one float32 partial row per column sum; one fixed-order reduction kernel then sums the partials. The
number of programs is ``BACKWARD_WAVES * REFERENCE_SMS * resident CTAs per SM`` (resident CTAs from the
compile report: ``BACKWARD_RESIDENT_WARPS`` / num_warps, a lower bound over the variants), or fewer
when M is small: the partials are then ~1-4% of the bytes at M * N = 2^27 (benchmarks/README.md).

**Prefetch.** One-pass row loops and the chunked backward's sweep A are ``tl.range(..., num_stages=3)``:
Triton then copies the next two tiles (chunks) to shared memory with 16-byte cp.async while the
current one is computed (num_stages=2 does not: its refill comes at the end of the loop body). Three
tiles of the (M, N) inputs must fit ``PREFETCH_SMEM_BYTES``; with per-row parameters (which would be
buffered too, in their own dtype, maybe float32) there is no prefetch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..variant import ScaleKind, Variant

# The widest rows kept entirely in registers. Tests lower MAX_BLOCK_N (monkeypatch), which caps
# both kernels and the backward's chunk, to exercise the chunked paths at small N in the interpreter.
MAX_BLOCK_N = 16384
MAX_BLOCK_N_BACKWARD = 8192
# Chunked backward rows, 16 warps (column accumulators in registers: see the module docstring): (chunk
# columns, chunks per band) by the number of column sums (``column_sums``: dweight, dbias, dscale -- a 0-d
# scale counts too: its sum is taken chunk by chunk into one value, yet its reductions cost triton 3.6 as many
# registers) and whether the variant is heavy (``heavy``). Sized by the sm_90 compile reports of triton 3.6
# and 3.8: the accumulators take band * sums / 512 registers per thread, the rest of the row's work 50-100 of
# the 128; one sum takes chunks of 2048 (4096 spilled 4-12 B on triton 3.6), heavy ones chunks of 1024
# (2048 spilled 4-28 B on triton 3.6); two or three light sums take chunks of 2048 in a narrower band (2048 x 4,
# 2048 x 2: 124-128 registers, no spill on either Triton), which rows of several bands allow now (grouped rows).
CHUNKED_BACKWARD = {(0, False): (4096, 4), (1, False): (2048, 8), (2, False): (2048, 4), (3, False): (2048, 2),
                    (0, True): (2048, 8), (1, True): (1024, 8), (2, True): (1024, 4), (3, True): (1024, 4)}
# The one-pass backward (16 elements per thread, 16 warps at 8192 columns) of a heavy variant or one with
# three column sums needs more than 128 registers at 8192 columns: from 8192 on, it takes the chunked path
# (whose band then still covers the row: one pass over DRAM).
MAX_BLOCK_N_BACKWARD_HEAVY = 4096
CHUNKED_BACKWARD_WARPS = 16
# Rows wider than one band go band by band over groups of this many rows (the band's column sums resumed from
# the program's partial row): a later band's columns are re-read at most a group of rows after sweep A read
# them, which must still be in L2 (H200: 50 MB). Between the two reads a program touches its group's rows (the
# bytes read twice: dy and x or h, and a residual that rebuilds h) and its partial rows (4 B per column per
# vector sum), 132 programs at once: 132 * N * (2 * twice + 4 * sums) = 33 MiB for layer_norm at N = 16384
# (bf16), 25-37 MiB for the add_rms_norm family, 49 MiB for Admin's add_layer_norm with a learned (N,) scale
# (at the L2's size: benchmarks/predictions.py counts its later bands as DRAM re-reads from 16384 on).
# Groups of 1 row would save a third (not enough for Admin) at twice the partials' read-modify-write (L2:
# 2 x 4 B per sum per group and column), and compiled with spills on triton 3.8 (16-32 B, add_rms_norm[vector]).
CHUNKED_GROUP_ROWS = 2
# The one Triton-version-dependent choice (ptxas differs: triton 3.6 bundles CUDA 12.8's, 3.8 CUDA 12.9's).
# ptxas's register cap (maxnreg) for the 16-warp backward launches of several chunks or rows (chunked rows;
# heavy variants' tiles): what one 16-warp CTA per SM may use, the residency the row partition assumes
# (BACKWARD_RESIDENT_WARPS). Without it triton 3.8's ptxas squeezed 12 of them into 64 registers for a second
# CTA, spilling 4-28 B per thread; with it they take 100-128 and spill none. Triton 3.6's ptxas takes up to
# 128 by itself, and the explicit cap made one spill there (32 B): no cap below 3.7.
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
BACKWARD_MAX_REGISTERS = 65536 // (32 * CHUNKED_BACKWARD_WARPS) if TRITON_VERSION >= (3, 7) else None
# One-pass blocks this wide re-read the (N,) parameters per row (LaunchConfig.params_per_row, a launch
# constexpr; read per call, so tests can lower them): the backward's when the scale is learned, the
# forward's for heavy variants or two or more (N,) parameters.
PARAMS_PER_ROW_BLOCK_N = 8192
FORWARD_PARAMS_PER_ROW_BLOCK_N = 16384
# The forward of 32-bit x with dropout spilled 116-180 B at 16384 columns (triton 3.6), with row statistics
# 8 B (triton 3.8): chunks of 8192 for 32-bit x with dropout or statistics.
FORWARD_MAX_BLOCK_N_WIDE_DROPOUT = 8192
# 32-bit x with row statistics (no residual, no dropout) from 16384 columns on: chunks of 2048 (4 warps);
# chunks of 8192 spilled 4-16 B (rms_norm triton 3.8, layer_norm triton 3.6).
FORWARD_STATS_CHUNK = 2048
# Chunks of FORWARD_MAX_BLOCK_N_WIDE_DROPOUT (32-bit x with dropout; row statistics with a residual, any dtype)
# take 32 warps, 8 elements per thread: at 16 warps triton 3.6 spilled 4 B (ptxas packed 64 registers for a
# second CTA), and 16-bit rows with statistics and a residual spilled 24-28 B in one pass of 16384 (32 warps).
FORWARD_HEAVY_CHUNK_WARPS = 32
TILE_ELEMENTS = 4096
MAX_TILE_ROWS = 16

REFERENCE_SMS = 132
BACKWARD_WAVES = 2
# Warps per SM that the backward's registers allow (<= 128 registers per thread: 16 warps of 64K).
BACKWARD_RESIDENT_WARPS = 16
FORWARD_OVERSUBSCRIPTION = 4
WARP_SLOTS_PER_SM = 64
PREFETCH_STAGES = 3
PREFETCH_SMEM_BYTES = 160 * 1024


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel call: ``num_programs`` programs of ``rows_per_program`` rows (a multiple of
    ``tile_rows``), tiles of ``tile_rows`` x ``block_n``; a row is ``num_chunks`` column blocks, taken
    ``band_chunks`` at a time (backward; 1 = one pass); ``num_warps`` warps, ``num_stages`` prefetch;
    ``params_per_row``: the (N,) parameters are re-read per row instead of held in registers;
    ``max_registers``: ptxas's register cap per thread (Triton's ``maxnreg``), None: ptxas chooses;
    ``group_rows``: rows of several bands go band by band over groups of this many rows (backward)."""

    block_n: int
    num_chunks: int
    num_warps: int
    tile_rows: int
    rows_per_program: int
    num_programs: int
    num_stages: int = 1
    band_chunks: int = 1
    params_per_row: bool = False
    max_registers: int | None = None
    group_rows: int = 1

    @property
    def num_bands(self) -> int:
        return triton.cdiv(self.num_chunks, self.band_chunks)


def _warps(elements: int) -> int:
    return max(1, min(elements // 512, 32))


def column_sums(variant: Variant) -> int:
    """How many (N,) float32 column accumulators the backward keeps: dweight, dbias, dscale."""
    return int(variant.has_weight) + int(variant.has_bias) + int(variant.learned_scale)


def _vector_params(variant: Variant) -> int:
    return int(variant.has_weight) + int(variant.has_bias) + int(variant.scale_kind == ScaleKind.VECTOR)


def _forward_params_per_row(block_n: int, variant: Variant, dtype: torch.dtype) -> bool:
    """Whether a one-pass forward row re-reads its (N,) parameters per row instead of holding them."""
    if block_n >= FORWARD_PARAMS_PER_ROW_BLOCK_N:  # 32 warps: at most 64 registers per thread
        return heavy(variant, dtype) or _vector_params(variant) >= 2
    # 32-bit x with dropout and two or three (N,) parameters spilled 64-68 B holding them at 8192 columns
    # (16 warps: 128 registers per thread; triton 3.8).
    wide_dropout = dtype.itemsize > 2 and variant.has_dropout and _vector_params(variant) >= 2
    return wide_dropout and 2 * block_n >= FORWARD_PARAMS_PER_ROW_BLOCK_N


def heavy(variant: Variant, dtype: torch.dtype) -> bool:
    """Whether a chunked backward row needs the narrower band of CHUNKED_BACKWARD: more registers per
    element (a Philox stream for dropout; float32/64 tensors) or four tensors re-read in sweep B (Pre-LN
    with a learned scale: dy, dh_in, h and the residual)."""
    return (variant.has_dropout or variant.residual_f32 or variant.h_f32 or dtype.itemsize > 2
            or (variant.prenorm and variant.learned_scale))


def _forward_block(cols: int, block_n: int, variant: Variant, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """block_config's forward (see the module docstring)."""
    wide = dtype.itemsize > 2
    # 16 float32 values and a Philox stream (or row statistics) per thread, or row statistics with a residual
    heavy_row = (wide and (variant.has_dropout or variant.store_stats)
                 or (variant.store_stats and variant.has_residual))
    cap = min(MAX_BLOCK_N, FORWARD_MAX_BLOCK_N_WIDE_DROPOUT) if heavy_row else MAX_BLOCK_N
    if block_n <= cap:
        rows = max(1, min(MAX_TILE_ROWS, TILE_ELEMENTS // block_n)) if block_n <= 1024 else 1
        return block_n, 1, _warps(rows * block_n), rows, 1
    if wide and variant.store_stats and not (variant.has_dropout or variant.has_residual):
        cap = min(cap, FORWARD_STATS_CHUNK)
        return cap, triton.cdiv(cols, cap), _warps(cap), 1, 1
    return cap, triton.cdiv(cols, cap), FORWARD_HEAVY_CHUNK_WARPS if heavy_row else _warps(cap), 1, 1


def block_config(cols: int, backward: bool, variant: Variant | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, NUM_CHUNKS, num_warps, tile rows, chunks per band) for rows of ``cols`` columns of
    ``variant`` with x of ``dtype`` (see the module docstring)."""
    block_n = triton.next_power_of_2(cols)
    variant = variant or Variant()
    if not backward:
        return _forward_block(cols, block_n, variant, dtype)
    light = column_sums(variant) < 3 and not heavy(variant, dtype)
    cap = min(MAX_BLOCK_N, MAX_BLOCK_N_BACKWARD if light else MAX_BLOCK_N_BACKWARD_HEAVY)
    if block_n > cap:
        sums = column_sums(variant)
        chunk, band_chunks = CHUNKED_BACKWARD[sums, heavy(variant, dtype)]
        vector_sums = sums - (variant.scale_kind == ScaleKind.SCALAR)
        if dtype.itemsize > 2 and variant.has_dropout and vector_sums != 2 and vector_sums == sums:
            # 32-bit values and a Philox stream: half the band (with two sums 1024 x 2 spilled 4-12 B at 64
            # registers on triton 3.6 and 3.8, where 1024 x 4 compiles at 96-100 without spills; with a 0-d
            # scale too, since the grouped rows: 12-20 B on triton 3.6)
            band_chunks = max(2, band_chunks // 2)
        block_n = min(MAX_BLOCK_N, chunk)
        if variant.prenorm and variant.has_dropout and dtype.itemsize <= 2 and triton.cdiv(cols, block_n) > band_chunks:
            # Rows of several bands (grouped: the band's sums resumed from the partial row), Pre-LN with dropout
            # and 16-bit x: half the band (the full one spilled 4-24 B on triton 3.8; halving the other heavy
            # variants' made triton 3.6's ptxas pack them into 64 registers for 2 CTAs, spilling 4-20 B).
            band_chunks = max(2, band_chunks // 2)
        return block_n, triton.cdiv(cols, block_n), CHUNKED_BACKWARD_WARPS, 1, band_chunks
    if block_n <= 1024:
        # Tiles of several rows; heavy variants with twice the warps (8 elements per thread)
        rows = max(1, min(MAX_TILE_ROWS, TILE_ELEMENTS // block_n))
        return block_n, 1, _warps(rows * block_n * (2 if heavy(variant, dtype) else 1)), rows, 1
    return block_n, 1, _warps(block_n), 1, 1


def _tile_input_bytes(variant: Variant, dtype: torch.dtype, backward: bool) -> int:
    """Bytes per tile element of the (M, N) inputs a one-pass row loop reads (what prefetch buffers)."""
    reads, _ = variant.row_tensors("bwd" if backward else "fwd")
    return sum(variant.itemsize(name, dtype) for name in reads)


def launch_config(rows: int, cols: int, device: torch.device | None = None, backward: bool = False,
                  variant: Variant | None = None, dtype: torch.dtype = torch.bfloat16) -> LaunchConfig:
    """The launch of the forward (``backward=False``) or backward kernel for a (rows, cols) problem of
    ``variant`` with x of ``dtype``; rows >= 1, cols >= 1. A pure function of its arguments: ``device``
    is accepted for the callers' convenience and not read (the launch is the same on every GPU and
    under the interpreter). Host arithmetic only: no sync, CUDA-graph safe."""
    variant = variant or Variant()
    block_n, num_chunks, num_warps, tile_rows, band_chunks = block_config(cols, backward, variant, dtype)
    if backward:
        resident = max(1, BACKWARD_RESIDENT_WARPS // num_warps)
        target = BACKWARD_WAVES * REFERENCE_SMS * resident
    else:
        resident = max(1, WARP_SLOTS_PER_SM // num_warps)
        target = FORWARD_OVERSUBSCRIPTION * REFERENCE_SMS * resident
    tiles = triton.cdiv(rows, tile_rows)
    tiles_per_program = triton.cdiv(tiles, min(tiles, target))
    rows_per_program = tiles_per_program * tile_rows
    params_per_row = num_chunks == 1 and (
        block_n >= PARAMS_PER_ROW_BLOCK_N and variant.learned_scale if backward
        else _forward_params_per_row(block_n, variant, dtype))
    stages = PREFETCH_STAGES if backward else 1  # the chunked backward's sweep A prefetches its chunks
    if num_chunks == 1:
        # Per-row parameter loads would be prefetched too (in their own dtype, maybe float32): none then.
        stage_bytes = tile_rows * block_n * _tile_input_bytes(variant, dtype, backward)
        fits = PREFETCH_STAGES * stage_bytes <= PREFETCH_SMEM_BYTES
        stages = PREFETCH_STAGES if fits and not params_per_row else 1
    several = band_chunks > 1 or tile_rows > 1
    max_registers = BACKWARD_MAX_REGISTERS if backward and num_warps == CHUNKED_BACKWARD_WARPS and several else None
    group_rows = CHUNKED_GROUP_ROWS if triton.cdiv(num_chunks, band_chunks) > 1 else 1
    return LaunchConfig(block_n, num_chunks, num_warps, tile_rows, rows_per_program,
                        triton.cdiv(rows, rows_per_program), stages, band_chunks, params_per_row, max_registers,
                        group_rows)
