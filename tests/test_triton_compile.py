"""The sm_90 ahead-of-time compile check (benchmarks/triton_compile_report.py), fast version.

Compiles the forward and backward kernels for one common width in a subprocess (the test session
runs triton in interpreter mode, which cannot compile), runs triton's bundled ptxas -v, and
asserts no register spills and 128-bit global loads and stores. Needs no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
import triton_compile_report as report
out = []
fwd, bwd = (report._forward_kernel, report.FORWARD_VARIANTS), (report._backward_kernel, report.BACKWARD_VARIANTS)
for (kernel, variants), name in ((fwd, "add_rms_norm pre-LN"), (bwd, "add_rms_norm pre-LN (dy, dh_in, h)"),
                                 (bwd, "layer_norm")):
    flags, present = variants[name]
    ptx, _ = report.compile_one(kernel, flags, present, "*bf16", 4096)
    out.append(dict(name=name, **report.ptxas_stats(ptx), **report.access_widths(ptx)))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_without_spills_and_vectorized():
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in json.loads(done.stdout.strip().splitlines()[-1]):
        assert row["spill_store_bytes"] == row["spill_load_bytes"] == 0, row
        assert row["registers"] <= 255, row
        assert "128" in row["ld"] and "128" in row["st"], row  # ld/st.global.v4.b32
