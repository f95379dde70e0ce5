"""The sm_90a ahead-of-time compile check (benchmarks/triton_compile_report.py), fast version; no GPU.

Compiles, in a subprocess (the test session runs triton in interpreter mode, which cannot compile),
what the host code launches for three shapes of work of the benchmarked ops -- the backward's tiles of
several rows (N = 1024), its chunked rows with the column sums in registers (N = 16384), and the
prefetched forward (N = 8192) -- and checks what the full report checks for every variant: no register
spills, 128-bit global accesses, cp.async prefetch where the launch asks for it. It also checks the
committed report of the installed Triton version, if there is one: no spills at N <= 16384.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
import triton_compile_report as report
variants = report.benchmarked_variants()
out = []
for op, kernel, n in (("add_layer_norm Post-LN (N,) scale", "_backward_kernel", 1024),
                      ("layer_norm", "_backward_kernel", 16384), ("add_rms_norm Pre-LN", "_forward_kernel", 8192)):
    for name, args, kwargs in report.recorded_launches(variants[op], report.DTYPES["bf16"], n):
        if name == kernel:
            stats = report.compile_specialization(report.specialization(name, args, kwargs))
            out.append(dict(op=op, kernel=name, N=n, stages=kwargs["NUM_STAGES"], **stats))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_without_spills_vectorized_and_prefetched():
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 3
    for row in rows:
        assert row["spill_store_bytes"] == row["spill_load_bytes"] == 0, row
        assert row["resident_ctas"] >= 1, row
        assert "128" in row["st"], row  # st.global.v4.b32
        if row["stages"] > 1:
            assert row["cp_async"] > 0, row  # the prefetch (tl.range num_stages) became cp.async
        else:
            assert "128" in row["ld"], row


def test_committed_report_has_no_spills_up_to_16384():
    major_minor = ".".join(triton.__version__.split(".")[:2])
    path = ROOT / "benchmarks" / "results" / f"triton_compile_report_{major_minor}.json"
    if not path.exists():
        pytest.skip(f"no committed compile report for triton {major_minor}")
    report = json.loads(path.read_text())
    spilling = [(r["kernel"], r["launches"][0]) for r in report["rows"]
                if (r["spill_store_bytes"] or r["spill_load_bytes"]) and min(x["N"] for x in r["launches"]) <= 16384]
    assert not spilling
    assert {r["kernel"] for r in report["rows"]} == {"forward_kernel", "backward_kernel", "reduce_partials_kernel"}
