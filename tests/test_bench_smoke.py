"""The benchmark runner end to end on the CPU (smoke mode), so that it never rots.

Runs ``python -m benchmarks.run --smoke`` in a fresh interpreter (the smoke mode sets
TRITON_INTERPRET=1 before triton is imported) and checks every output it promises: the banner
that no figure is claimed, the summary table printed last, CSV, JSON and plots, one row per
(op, dtype, N, implementation, direction), each figure's floor bytes those of its case's Variant, and
missing peers reported rather than skipped.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ is not installed
from benchmarks import floor
from benchmarks.suite import DTYPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the runner sets it itself
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_smoke_says_no_figures_and_prints_the_table_last(smoke):
    _, stdout = smoke
    assert "smoke: CPU, not a performance figure" in stdout
    tail = stdout[stdout.rindex("=" * 100):]
    assert "SMOKE: CPU, NOT A PERFORMANCE FIGURE" in tail
    for case in floor.CASES:
        assert case.label in tail
    assert "fraction of copy bandwidth" in tail


def test_smoke_writes_csv_json_and_plots(smoke):
    out, _ = smoke
    report = json.loads((out / "results.json").read_text())
    meta = report["meta"]
    assert meta["smoke"] is True and meta["figures"] == "smoke: CPU, not a performance figure"
    for key in ("device", "commit", "command", "versions", "timing"):
        assert meta[key]
    assert meta["versions"]["torch"] and "cuda" in meta["versions"] and "triton" in meta["versions"]
    assert report["copy"]["gbps"] > 0
    assert len(report["bytes_table"]) == 2 * len(floor.CASES)
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(report["rows"]) > 0
    assert all("not a performance figure" in r["device"] for r in csv_rows)
    assert (out / "table.md").read_text().count("## ") >= len(floor.CASES)
    if importlib.util.find_spec("matplotlib") is not None:
        for dtype in ("bf16", "fp32"):
            assert (out / f"gbps_{dtype}.png").stat().st_size > 1000


def test_smoke_covers_every_op_impl_and_direction(smoke):
    out, _ = smoke
    report = json.loads((out / "results.json").read_text())
    impls = report["implementations"]
    for name in ("torch", "torch.compile", "fusednorm-triton", "fusednorm-cuda", "fusednorm-torch", "liger",
                 "flash-attn", "apex"):
        assert name in impls
    rows = report["rows"]
    keys = {(r["op"], r["case"], r["dtype"], r["N"], r["impl"], r["direction"]) for r in rows}
    assert len(keys) == len(rows)  # one row per figure
    for case in floor.CASES:
        dtypes = ("bf16",) if case.variant.has_residual else ("bf16", "fp32")
        for dtype in dtypes:
            for impl in impls:
                for direction in ("fwd", "bwd", "fwdbwd"):
                    assert (case.op, case.name, dtype, 64, impl, direction) in keys
    by_impl = {}
    for r in rows:
        by_impl.setdefault(r["impl"], []).append(r)
    # The baselines and the reference backend must produce a figure everywhere, and agree with torch.
    for name in ("torch", "torch.compile", "fusednorm-torch"):
        assert all(r["status"] == "ok" and r["check"].startswith("ok") for r in by_impl[name]), name
        assert all(r["gbps"] > 0 and r["floor_bytes"] > 0 for r in by_impl[name])
    # The Triton backend runs in the interpreter whenever its package is present.
    if impls["fusednorm-triton"]["available"]:
        bad = [r for r in by_impl["fusednorm-triton"] if r["status"] != "ok" or not r["check"].startswith("ok")]
        assert not bad, bad[:3]
    else:
        assert all(r["status"].startswith("unavailable") for r in by_impl["fusednorm-triton"])
    # Peers and the unbuilt CUDA backend are reported, not silently dropped.
    for name, info in impls.items():
        if not info["available"]:
            assert info["reason"]
            assert all(r["status"].startswith(("missing", "unavailable")) for r in by_impl[name])
    # No CPU run claims a peak-memory figure.
    assert all(r["peak_mem_bytes"] is None for r in rows)


def test_smoke_counts_each_figure_with_its_variants_bytes(smoke):
    out, _ = smoke
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["status"] == "ok"]
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"}
    for r in rows:
        variant = floor.case_by_label(floor.label(r["op"], r["case"])).variant
        per_element = variant.bytes_per_element(r["direction"], DTYPES[r["dtype"]])
        assert r["floor_bytes"] == per_element * r["M"] * r["N"], r
        assert r["gbps"] == pytest.approx(r["floor_bytes"] / (r["time_ms"] * 1e-3) / 1e9)
        if r["dtype"] == "fp32":  # every counted tensor is float32: twice the 16-bit count
            assert per_element == 2 * variant.bytes_per_element(r["direction"], torch.bfloat16)
