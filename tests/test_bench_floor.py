"""The benchmarks' cases and byte floor against fusednorm's Variant, and the runner's report arithmetic.

The byte table is written once, in ``fusednorm.variant.Variant.row_tensors``; the kernels' byte test
(tests/test_triton_bytes.py) holds the kernels to it. Here: every benchmarked case is the very Variant
that the benchmarked call runs, so the floor counted for a figure is the floor of what was timed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ is not installed
import fusednorm
from benchmarks import floor, impls, report

# The op layer and the Function path of backend "torch" (on the CPU, eager calls otherwise take
# fusednorm.cpu_path, ATen's ops: tests/test_cpu_path.py).
pytestmark = pytest.mark.usefixtures("torch_function_path")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("case", floor.CASES, ids=lambda c: c.label)
def test_each_case_is_the_variant_of_the_benchmarked_call(case, monkeypatch):
    seen = []
    real_forward, real_backward = fusednorm.ops.forward, fusednorm.ops.backward

    def forward(variant, args, backend, impl=None):
        seen.append(("fwd", variant))
        return real_forward(variant, args, backend, impl)

    def backward(variant, args, backend):
        seen.append(("bwd", variant))
        return real_backward(variant, args, backend)

    monkeypatch.setattr(fusednorm.ops, "forward", forward)
    monkeypatch.setattr(fusednorm.ops, "backward", backward)
    rows, cols, dtype = 3, 8, torch.bfloat16
    built = impls.FusedNorm("torch").build(case, cols, dtype, torch.device("cpu"))
    x = torch.randn(rows, cols, dtype=dtype, requires_grad=True)
    residual = torch.randn(rows, cols, dtype=dtype, requires_grad=True) if case.variant.has_residual else None
    scale = torch.rand(cols, dtype=dtype, requires_grad=True) if case.variant.learned_scale else None
    out = built.fn(x, residual, scale)
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == (2 if case.variant.prenorm else 1)
    torch.autograd.backward(outs, [torch.randn_like(t) for t in outs])
    assert seen == [("fwd", case.variant), ("bwd", case.variant)]
    assert x.grad is not None and all(p.grad is not None for p in built.params)


def test_cases_cover_design_rows_for_both_norms():
    assert {(c.op, c.name) for c in floor.CASES} == {
        ("layer_norm", "norm"), ("rms_norm", "norm"),
        *((op, case) for op in ("add_layer_norm", "add_rms_norm") for case in ("postln", "postln_scale", "preln"))}
    assert len({c.variant for c in floor.CASES}) == len(floor.CASES)
    assert floor.case_by_label("add_rms_norm/preln").variant.prenorm
    assert floor.case_by_label("add_layer_norm/postln_scale").variant.learned_scale
    assert floor.case_by_label("layer_norm").variant.has_bias and not floor.case_by_label("rms_norm").variant.has_bias
    with pytest.raises(ValueError, match="unknown op"):
        floor.case_by_label("add_rms_norm/sideways")
    with pytest.raises(ValueError, match="case must be one of"):
        floor.Case.make("plain", is_rms=False)


@pytest.mark.parametrize("case", floor.CASES, ids=lambda c: c.label)
def test_floor_counts_the_variants_row_tensors(case):
    v = case.variant
    for direction in ("fwd", "bwd"):
        reads, writes = v.row_tensors(direction)
        # The words say exactly what is counted, and the count is those tensors, 2 bytes each in bf16.
        assert case.describe(direction).startswith(f"read {', '.join(reads)}; write {', '.join(writes)}")
        assert case.bytes_per_element(direction, torch.bfloat16) == 2 * len(reads + writes)
        # float32 inputs: every counted tensor is float32 too (the README says "doubled for fp32").
        assert case.bytes_per_element(direction, torch.float32) == 2 * case.bytes_per_element(direction, torch.bfloat16)
    both = case.bytes_per_element("fwd", torch.bfloat16) + case.bytes_per_element("bwd", torch.bfloat16)
    assert case.bytes_per_element("fwdbwd", torch.bfloat16) == both
    assert case.floor_bytes("fwdbwd", 3, 5, torch.bfloat16) == 15 * both
    assert case.describe("fwdbwd") == f"{case.describe('fwd')} + {case.describe('bwd')}"
    with pytest.raises(ValueError, match="direction"):
        case.bytes_per_element("sideways", torch.bfloat16)


def test_readme_byte_table_is_the_one_floor_prints():
    with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
        assert floor.markdown_table() in f.read()


def test_json_bytes_table_lists_every_case_and_direction():
    records = report.bytes_table(floor.CASES)
    assert len(records) == 2 * len(floor.CASES)
    preln_bwd = next(r for r in records if r["op"] == "add_rms_norm/preln" and r["direction"] == "bwd")
    variant = floor.case_by_label("add_rms_norm/preln").variant
    assert preln_bwd["variant_flags"] == variant.flags
    assert preln_bwd["bytes_per_element_16bit"] == variant.bytes_per_element("bwd", torch.bfloat16)
    assert "dh_in" in preln_bwd["what"]


def _row(impl, direction, frac, status="ok", n=512):
    return {"op": "rms_norm", "case": "norm", "dtype": "bf16", "N": n, "M": 4, "impl": impl, "direction": direction,
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
    assert "(floor: read x; write y)" in md


def test_an_absent_backend_or_peer_is_reported_with_its_reason(monkeypatch):
    from fusednorm import backends

    real = backends.implementation

    def no_triton(name):
        if name == "triton":
            raise ModuleNotFoundError("No module named 'fusednorm.triton'")
        return real(name)

    monkeypatch.setattr(backends, "implementation", no_triton)
    monkeypatch.setattr(fusednorm._plan, "_PLANS", {})  # plans hold their backend module (Plan.impl)
    reason = impls.FusedNorm("triton").why_unavailable(torch.device("cpu"))
    assert reason is not None and "fusednorm.triton" in reason

    class Ghost(impls._Peer):
        name, package = "ghost", "no_such_package_fusednorm_bench"

    assert Ghost().why_unavailable(torch.device("cpu")).startswith("missing: no_such_package")
