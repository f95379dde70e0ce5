"""The byte floor table of the benchmarks against DESIGN.md section 5, and the runner's arithmetic."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ is not installed
from benchmarks import floor, report
from benchmarks.impls import SPECS, Spec, spec_by_name

# DESIGN section 5, 16-bit tensors, bytes per element (forward, backward).
DESIGN = {"plain": (4, 6), "postln": (8, 6), "postln_scale": (6, 10), "preln": (8, 8)}


@pytest.mark.parametrize("case", floor.CASES)
def test_table_matches_design(case):
    fwd, bwd = DESIGN[case]
    assert floor.bytes_per_element(case, "fwd", 2) == fwd
    assert floor.bytes_per_element(case, "bwd", 2) == bwd
    assert floor.bytes_per_element(case, "fwdbwd", 2) == fwd + bwd
    assert floor.bytes_per_element(case, "fwd", 4) == 2 * fwd  # fp32: every counted tensor is twice as wide


def test_postln_forward_and_backward_total_is_the_same_with_or_without_saving_h():
    # 6 B forward + 8 B backward (no h saved) == 8 + 6 (h saved): the table counts the saved-h layout.
    assert floor.bytes_per_element("postln", "fwdbwd", 2) == 6 + 8


def test_floor_bytes_and_errors():
    assert floor.floor_bytes("preln", "bwd", 3, 5, 2) == 8 * 15
    assert "dh_in" in floor.describe("preln", "bwd")
    assert " + " in floor.describe("plain", "fwdbwd")
    with pytest.raises(ValueError, match="case"):
        floor.bytes_per_element("nope", "fwd", 2)
    with pytest.raises(ValueError, match="direction"):
        floor.bytes_per_element("plain", "sideways", 2)


def test_specs_cover_design_rows_for_both_norms():
    assert {(s.op, s.case) for s in SPECS} == {
        ("layer_norm", "plain"), ("rms_norm", "plain"),
        *((op, case) for op in ("add_layer_norm", "add_rms_norm") for case in ("postln", "postln_scale", "preln"))}
    assert spec_by_name("add_rms_norm/preln").prenorm
    assert spec_by_name("add_layer_norm/postln_scale").learned_scale
    with pytest.raises(ValueError):
        spec_by_name("add_rms_norm/sideways")
    with pytest.raises(ValueError):
        Spec("layer_norm", "preln")


def _row(impl, direction, frac, status="ok", n=512):
    return {"op": "rms_norm", "case": "plain", "dtype": "bf16", "N": n, "M": 4, "impl": impl, "direction": direction,
            "status": status, "gbps": 100.0 * frac if frac else None, "frac_copy": frac, "note": "",
            "peak_mem_bytes": None, "mem_vs_torch": None, "time_ms": 1.0}


def test_summary_marks_partial_and_missing():
    rep = {"meta": {"smoke": False, "device": "dev", "versions": {"torch": "x"}, "commit": "c", "time_utc": "t",
                    "command": "cmd", "timing": "do_bench"},
           "copy": {"gbps": 100.0, "bytes": 2e9, "time_ms": 1.0},
           "implementations": {"torch": {"available": True, "reason": None},
                               "liger": {"available": False, "reason": "missing: liger_kernel is not installed"}},
           "rows": [_row("torch", "fwd", 0.5), _row("torch", "fwd", 0.5, n=1024),
                    _row("liger", "fwd", None, status="missing: liger_kernel is not installed"),
                    _row("torch", "bwd", 0.25), _row("torch", "bwd", None, status="error: boom", n=1024),
                    _row("liger", "bwd", None, status="skipped: time budget exhausted"),
                    {**_row("torch", "fwdbwd", 0.3), "check": "mismatch: max err 3 (scale 4)"}]}
    text = report.summary_table(rep)
    assert "liger: not run here: missing" in text
    line_fwd = next(line for line in text.splitlines() if line.startswith("rms_norm") and " fwd " in line)
    assert "0.50" in line_fwd and line_fwd.rstrip().endswith("-")
    line_bwd = next(line for line in text.splitlines() if line.startswith("rms_norm") and " bwd " in line)
    assert "0.25*" in line_bwd
    assert "OUTPUT MISMATCH" in text and "mismatch: max err 3" in text
    assert "errors (1" in text and "1 figures skipped" in text
    md = report.full_table(rep)
    assert "50 (0.50)" in md and "missing" in md and "error: boom" in md


def test_an_absent_backend_or_peer_is_reported_with_its_reason(monkeypatch):
    import torch

    from benchmarks import impls
    from fusednorm import backends

    real = backends.implementation

    def no_triton(name):
        if name == "triton":
            raise ModuleNotFoundError("No module named 'fusednorm.triton'")
        return real(name)

    monkeypatch.setattr(backends, "implementation", no_triton)
    reason = impls.FusedNorm("triton").why_unavailable(torch.device("cpu"))
    assert reason is not None and "fusednorm.triton" in reason

    class Ghost(impls._Peer):
        name, package = "ghost", "no_such_package_fusednorm_bench"

    assert Ghost().why_unavailable(torch.device("cpu")).startswith("missing: no_such_package")
