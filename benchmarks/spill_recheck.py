"""Recompile only the specializations that a committed compile report lists as spilling at N <= 16384,
with the launch shapes of the current heuristics (fast check between full runs of triton_compile_report.py).

    python benchmarks/spill_recheck.py [--report benchmarks/results/triton_compile_report_3.6.json] [--jobs 2]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_compile_report as report  # noqa: E402

from fusednorm.triton import heuristics  # noqa: E402
from fusednorm.variant import all_variants  # noqa: E402


def _variants_by_name() -> dict:
    found = {}
    for variant in all_variants():
        for v in (variant, dataclasses.replace(variant, store_stats=True)):
            found[v.name] = v
    return found


def main(argv: list[str] | None = None) -> int:
    major_minor = ".".join(report.triton.__version__.split(".")[:2])
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", default=str(Path(__file__).parent / "results"
                                                / f"triton_compile_report_{major_minor}.json"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="regex on 'variant dtype N=n' of the cases to recompile")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=EXPR",
                        help="trial: set a constant of fusednorm.triton.heuristics (a Python literal) first")
    args = parser.parse_args(argv)
    for assignment in args.set:
        name, expr = assignment.split("=", 1)
        setattr(heuristics, name, ast.literal_eval(expr))
    rows = json.loads(Path(args.report).read_text())["rows"]
    by_name = _variants_by_name()
    cases = {(x["variant"], x["dtype"], x["N"], r["kernel"]) for r in rows
             if report._spills(r) for x in r["launches"] if x["N"] <= 16384
             and re.search(args.only, f"{x['variant']} {x['dtype']} N={x['N']}")}
    specs: dict[tuple, list] = {}
    for name, dtype, n, kernel in sorted(cases):
        for kname, a, kw in report.recorded_launches(by_name[name], report.DTYPES[dtype], n):
            if kname.strip("_") == kernel:
                shape = {k: kw[k] for k in ("BLOCK_N", "ROWS", "BAND_CHUNKS", "NUM_CHUNKS", "NUM_STAGES") if k in kw}
                specs.setdefault(report.specialization(kname, a, kw), []).append(f"{name} {dtype} N={n} {shape}")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(report.compile_specialization, list(specs)))
    bad = 0
    for (spec, who), stats in zip(specs.items(), results, strict=True):
        spill = stats["spill_store_bytes"] or stats["spill_load_bytes"]
        bad += bool(spill)
        print(f"{'SPILL' if spill else 'ok   '} {spec[0]} {stats['registers']} regs {stats['spill_store_bytes']}/"
              f"{stats['spill_load_bytes']} B warps {stats['num_warps']}: {'; '.join(who)}", flush=True)
    print(f"{bad} of {len(specs)} specializations spill")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
