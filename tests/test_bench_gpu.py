"""The benchmark runner's GPU path (do_bench timing, copy bandwidth, peak memory), on a small problem.

Marked gpu: skipped without CUDA. benchmarks/gpu_run.sh runs it before the full benchmark, so that a
broken GPU path shows up in the test step, not as a benchmark full of errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ is not installed
from benchmarks import floor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.gpu
def test_gpu_runner_small(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.run", "--out", str(tmp_path), "--dtypes", "bf16",
           "--ops", "rms_norm,add_layer_norm/postln_scale", "--ns", "1024,8192", "--elements", str(1 << 22),
           "--impls", "torch,torch.compile,fusednorm-triton,fusednorm-cuda,liger", "--rep-ms", "10", "--no-plots"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["meta"]["smoke"] is False and report["copy"]["gbps"] > 100
    rows = report["rows"]
    # 2^22 elements fit in L2 on current GPUs: the inputs must be rotated.
    assert all(r["input_sets"] > 1 for r in rows if r["status"] == "ok")
    for name in ("torch", "torch.compile", "fusednorm-triton"):
        mine = [r for r in rows if r["impl"] == name]
        assert mine and all(r["status"] == "ok" and r["check"].startswith("ok") for r in mine), mine[:2]
        assert all(0 < r["frac_copy"] < 2 for r in mine)
        assert all(r["peak_mem_bytes"] > 0 for r in mine if r["direction"] == "fwdbwd")
    assert all(r["mem_vs_torch"] == 1.0 for r in rows if r["impl"] == "torch" and r["direction"] == "fwdbwd")
    # Each figure's floor is its case's Variant's byte count (bf16 here).
    for r in rows:
        if r["status"] == "ok":
            variant = floor.case_by_label(floor.label(r["op"], r["case"])).variant
            assert r["floor_bytes"] == variant.bytes_per_element(r["direction"], torch.bfloat16) * r["M"] * r["N"]
