"""Predicted fraction of the H200's copy bandwidth per op, direction and width, from code generation alone.

Written before any GPU measured these kernels (benchmarks/README.md, "Predictions"); the GPU run of
issue 18 measures them. The model, per (op, direction, N) at M * N = 2^27 bf16 elements:

- bytes: the floor F = ``Variant.bytes_per_element`` (DESIGN section 5), plus what the launch moves
  beyond it: per-row statistics (4-8 B per row), the backward's float32 partials (one row of N per
  program and column sum, written once and read once by the reduction kernel), and for rows wider than
  one band the (M, 2) row coefficients (8 B per row, written once). The chunked backward re-reads every
  element within its row group (heuristics.CHUNKED_GROUP_ROWS): L2 hits while 132 programs' groups (the
  bytes read twice) and partial rows fit 40 of the L2's 50 MB, as is the partial rows' read-modify-write per
  group (2 x 4 B per column sum per group: L2 traffic, not DRAM); where they do not (N >= 32768; Admin's
  learned scale at 16384), the columns after the first band are counted as read again from DRAM;
- latency (Little's law): to stream at the copy bandwidth B, an SM must keep B * rho * L / SMs bytes of
  loads in flight (rho: the loads' share of the bytes; L: DRAM latency, 600-800 ns under load). A CTA
  keeps the tile it waits for in flight, and with prefetch (num_stages = 3) the next two tiles instead;
  the resident CTAs per SM come from the compile report (registers, shared memory, warp slots). The
  efficiency is min(1, in flight / needed);
- the chunked backward runs two sweeps per row at one CTA per SM: the first (DRAM, prefetched) and the
  second (L2) alternate, so its DRAM pipe is busy ~90% of the time (assumed, not derived);
- launches: 3 us per launch beyond the first (the backward's reduction kernel).

    python benchmarks/predictions.py [--report benchmarks/results/triton_compile_report_3.8.json]

prints the Markdown table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.triton_compile_report import ALL_WIDTHS, benchmarked_variants  # noqa: E402
from fusednorm.triton import heuristics  # noqa: E402
from fusednorm.variant import ScaleKind  # noqa: E402

COPY_BYTES_PER_S = 4.3e12  # H200, device-to-device copy, read + write (KINDS.md, measured here)
SMS = 132
LATENCIES_S = (600e-9, 800e-9)
ELEMENTS = 2**27
LAUNCH_S = 3e-6
TWO_SWEEP_DUTY = 0.9
DTYPE = torch.bfloat16
L2_BYTES = 40 * 2**20  # of the H200's 50 MB: what the groups may fill (dx writes and parameters pass through too)


def _report_rows(report: dict) -> dict[tuple, dict]:
    """(kernel, variant name, N) -> compile-report row, for the bf16 widths sweep."""
    rows = {}
    for row in report["rows"]:
        for launch in row["launches"]:
            if launch["sweep"] == "widths" and launch["dtype"] == "bf16":
                rows[row["kernel"], launch["variant"], launch["N"]] = row
    return rows


def predict(op: str, direction: str, n: int, rows: dict[tuple, dict]) -> dict:
    variant = benchmarked_variants()[op]
    backward = direction == "bwd"
    m = ELEMENTS // n
    floor = variant.bytes_per_element(direction, DTYPE)
    cfg = heuristics.launch_config(m, n, backward=backward, variant=variant, dtype=DTYPE)
    row = rows[("backward_kernel" if backward else "forward_kernel"), variant.name, n]
    reads, _ = variant.row_tensors(direction)
    read_bytes = sum(variant.itemsize(t, DTYPE) for t in reads)
    extra = (4 if variant.is_rms else 8) / n  # mean / rstd, written or read once per row
    launches = 1
    if backward:
        sums = int(variant.has_weight) + int(variant.has_bias) + int(variant.learned_scale)
        extra += 2 * 4 * sums * cfg.num_programs / m
        launches += sums > 0
        if cfg.num_chunks > 1:
            twice = sum(variant.itemsize(t, DTYPE) for t in reads
                        if t in ("dy", "h", "x") or (t == "residual" and not variant.store_h))
            if cfg.num_bands > 1:
                extra += 8 / n  # the row coefficients (ROW_COEF)
                vector_sums = sums - (variant.scale_kind == ScaleKind.SCALAR)
                if SMS * n * (cfg.group_rows * twice + 4 * vector_sums) > L2_BYTES:  # the group is not in L2
                    extra += twice * (n - cfg.block_n * cfg.band_chunks) / n
            tile_bytes = cfg.block_n * twice  # sweep A's chunk
        else:
            tile_bytes = cfg.tile_rows * cfg.block_n * read_bytes
    else:
        tile_bytes = cfg.tile_rows * min(n, cfg.block_n) * read_bytes
    ahead = cfg.num_stages - 1 if cfg.num_stages > 1 else 1
    in_flight = row["resident_ctas"] * tile_bytes * ahead
    rho = read_bytes / floor
    duty = TWO_SWEEP_DUTY if cfg.num_chunks > 1 else 1.0
    fractions = []
    for latency in LATENCIES_S:
        needed = COPY_BYTES_PER_S * rho * latency / SMS
        efficiency = min(1.0, in_flight / needed) * duty
        seconds = (floor + extra) * ELEMENTS / COPY_BYTES_PER_S / efficiency + LAUNCH_S * (launches - 1)
        fractions.append(floor * ELEMENTS / COPY_BYTES_PER_S / seconds)
    return dict(op=op, direction=direction, N=n, floor=floor, extra=extra, programs=cfg.num_programs,
                tile=f"{cfg.tile_rows}x{cfg.block_n}" + (f" x{cfg.num_chunks} chunks" if cfg.num_chunks > 1 else ""),
                warps=cfg.num_warps, stages=cfg.num_stages, registers=row["registers"], ctas=row["resident_ctas"],
                in_flight_kb=in_flight / 1024, low=min(fractions), high=max(fractions))


def table(report: dict) -> str:
    rows = _report_rows(report)
    lines = ["| op | dir | N | floor B/el | extra B/el | programs | tile | warps | stages | regs | CTAs/SM "
             "| loads in flight/SM | predicted fraction of copy |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for op in benchmarked_variants():
        for direction in ("fwd", "bwd"):
            for n in ALL_WIDTHS:
                p = predict(op, direction, n, rows)
                lines.append(f"| {op} | {direction} | {n} | {p['floor']} | {p['extra']:.3f} | {p['programs']} | "
                             f"{p['tile']} | {p['warps']} | {p['stages']} | {p['registers']} | {p['ctas']} | "
                             f"{p['in_flight_kb']:.0f} KB | {p['low']:.2f}-{p['high']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", default=str(Path(__file__).parent / "results" / "triton_compile_report_3.8.json"))
    args = parser.parse_args(argv)
    print(table(json.loads(Path(args.report).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
