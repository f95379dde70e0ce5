"""Launch heuristics for the Triton kernels: block size, warps, rows per program. No autotuning.

Why a fixed rule and not ``triton.autotune``: the kernels are memory bound, so the only choices
that matter are (a) whether one row fits in registers (one pass over global memory) and (b)
enough warps and programs in flight to cover memory latency. Both follow from N alone; an
autotuner would add a benchmark sweep at the first call of every new N (seconds, and a host sync,
which breaks CUDA-graph capture) and cannot run under TRITON_INTERPRET=1.

The rule:

- ``BLOCK_N = next_power_of_2(N)``, capped at ``MAX_BLOCK_N`` (16384 columns) in the forward and
  ``min(MAX_BLOCK_N, MAX_BLOCK_N_BACKWARD)`` (8192) in the backward. Up to the cap the whole row
  lives in registers: the forward reads x and residual once and the backward reads dy and h (or x and the
  residual) once -- the byte floor of DESIGN section 5. Wider rows are processed in
  ``NUM_CHUNKS = cdiv(N, BLOCK_N)`` column chunks (16384 columns in the forward, 4096 in the
  backward) by the same kernels; they read their inputs twice (statistics, then outputs), see
  ``kernels.py``. The caps come from the sm_90 compile report
  (benchmarks/results/triton_compile_report.md): a CTA has 64K registers, and the backward keeps
  about ten float32 values per column live (dy, xhat, g, residual, the parameters and the three
  column accumulators), so a 16384-wide backward block spills hundreds of bytes per thread, while
  the forward keeps ~4 per column and fits 16384.
- ``num_warps = clamp(BLOCK_N // 512, 1, 32)``: 16 elements per thread for any block of at least
  512 columns, i.e. two 128-bit accesses per 16-bit tensor (four per float32 tensor) per thread.
  Fewer elements per thread would not lower the register need of a block, only move it to more
  threads (a CTA's 64K registers are the limit); more would cap registers per thread at 255.
  ptxas on sm_90 (benchmarks/results/triton_compile_report.md): no spills up to N = 8192.
- ``PARAMS_PER_ROW_BLOCK_N`` (8192): the one rule that depends on the variant. A one-pass backward
  block of 8192 columns runs 16 warps, so at most 128 registers per thread for its 16 columns per
  thread. With a learned residual scale it keeps three float32 column accumulators (dweight, dbias,
  dscale: 48 registers) across the row loop; holding weight and scale too (32 more) left too few
  for the current row (dy, xhat, g, the residual) and ptxas spilled 24-56 bytes per thread in the
  Pre-LN layout and 80-192 in the Post-LN one (which rebuilds h from x and the residual). So from
  this width on, with a learned scale, the kernel re-reads weight and scale per row where they are
  used (L1/L2 hits: (N,) values shared by all rows; every (M, N) input is still read once). With
  two changes made at every width -- the residual stays 16-bit across the row reductions, and both
  LayerNorm row sums are one reduction (kernels.py) -- this leaves 0 spills at 127-128 registers.
  32 warps instead (64 registers per thread, 8 columns) still spill, even with these changes
  (92-112 bytes per thread): the per-thread addressing and reduction overhead does not shrink with
  the columns per thread.
- Rows per program: both kernels loop over a contiguous range of rows, so the (N,) parameters are
  loaded once per program (but see ``PARAMS_PER_ROW_BLOCK_N``) and the backward's float32 column
  partial sums stay in registers until the program ends. On CUDA the grid is
  ``SMs * programs_per_SM`` (``programs_per_SM`` fills the SM's 64 warp slots: up to 32 programs
  per SM in the forward, the hardware limit, for latency hiding, times
  ``FORWARD_OVERSUBSCRIPTION`` = 4 so that the hardware scheduler evens out the waves (residency
  depends on registers, unknown before compiling); at most 8 per SM in the backward, so that its
  partial-sum buffer stays ``(8 * SMs, N)`` float32 -- a few MB -- reduced once by
  ``torch.sum(0)`` in a fixed order. For the backward at 16 elements per thread the compile
  report's registers give 1 resident program per SM at 8-16 warps and 4 at 2 warps, so 8 per SM
  makes whole waves).
  Under the interpreter (CPU) a small fixed grid is used (``INTERPRETER_PROGRAMS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton

# The widest blocks kept entirely in registers. Tests lower MAX_BLOCK_N (monkeypatch), which caps
# both kernels, to exercise the chunked path at small N under the interpreter.
MAX_BLOCK_N = 16384
MAX_BLOCK_N_BACKWARD = 8192
# One-pass backward blocks this wide (16 warps: at most 128 registers per thread) re-read the (N,)
# weight and scale per row instead of holding them in registers, when the scale is learned (three
# float32 column accumulators). Read by kernels.py at import (a constexpr).
PARAMS_PER_ROW_BLOCK_N = 8192
CHUNK_N_BACKWARD = 4096
# Grid size used when there is no GPU to size it (TRITON_INTERPRET=1 on CPU tensors).
INTERPRETER_PROGRAMS = 3
FORWARD_PROGRAMS_PER_SM = 32
# The forward's grid is this many times what the SMs could hold by warp slots: how many programs
# are resident depends on their registers, which the host does not know before compiling, and
# equal-sized programs in a grid of 2.1 waves would leave the last wave mostly idle.
FORWARD_OVERSUBSCRIPTION = 4
BACKWARD_PROGRAMS_PER_SM = 8
WARP_SLOTS_PER_SM = 64


@dataclass(frozen=True)
class LaunchConfig:
    """How one kernel call is split: ``num_programs`` programs of ``rows_per_program`` rows each,
    each row in ``num_chunks`` column blocks of ``block_n`` columns, ``num_warps`` warps."""

    block_n: int
    num_chunks: int
    num_warps: int
    rows_per_program: int
    num_programs: int


@lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def block_config(cols: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_N, NUM_CHUNKS, num_warps) of the forward or backward kernel for rows of ``cols`` columns."""
    cap = min(MAX_BLOCK_N, MAX_BLOCK_N_BACKWARD) if backward else MAX_BLOCK_N
    block_n = triton.next_power_of_2(cols)
    if block_n > cap:
        # Chunked rows are read twice whatever the chunk width; the backward's two sweeps plus its
        # column accumulators fit in registers at 4096 columns, not at 8192.
        block_n = min(MAX_BLOCK_N, CHUNK_N_BACKWARD) if backward else cap
    return block_n, triton.cdiv(cols, block_n), max(1, min(block_n // 512, 32))


def launch_config(rows: int, cols: int, device: torch.device, backward: bool) -> LaunchConfig:
    """The launch of the forward (``backward=False``) or backward kernel for an (rows, cols) problem
    on ``device``; rows >= 1, cols >= 1. Host-side arithmetic only: no sync, CUDA-graph safe."""
    block_n, num_chunks, num_warps = block_config(cols, backward)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = BACKWARD_PROGRAMS_PER_SM if backward else FORWARD_PROGRAMS_PER_SM
        per_sm = max(1, min(cap, WARP_SLOTS_PER_SM // num_warps))
        target = _sm_count(index) * per_sm * (1 if backward else FORWARD_OVERSUBSCRIPTION)
    else:
        target = INTERPRETER_PROGRAMS
    rows_per_program = triton.cdiv(rows, min(rows, target))
    num_programs = triton.cdiv(rows, rows_per_program)
    return LaunchConfig(block_n, num_chunks, num_warps, rows_per_program, num_programs)
