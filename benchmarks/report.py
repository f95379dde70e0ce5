"""The benchmark's outputs: CSV, JSON, the full markdown table, the summary table printed last, and
the GB/s-vs-N plots (matplotlib optional)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

import torch

from . import floor

SMOKE_BANNER = "smoke: CPU, not a performance figure"
DIRECTION_NAMES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "fwd+bwd"}
SHORT = {"torch": "torch", "torch.compile": "compile", "fusednorm-triton": "fn-triton", "fusednorm-cuda": "fn-cuda",
         "fusednorm-torch": "fn-torch", "liger": "liger", "flash-attn": "flash", "apex": "apex"}
CSV_COLUMNS = ("device", "op", "case", "dtype", "N", "M", "impl", "direction", "status", "time_ms", "floor_bytes",
               "gbps", "copy_gbps", "frac_copy", "floor_ms", "peak_mem_bytes", "mem_vs_torch", "check", "note",
               "input_sets")


def bytes_table(cases) -> list[dict]:
    """The floor of each benchmarked case (a floor.Case) and direction, for the JSON: 16-bit and float32
    bytes per element, what is read and written, and the variant's name and flag word."""
    return [{"op": case.label, "variant": case.variant.name, "variant_flags": case.variant.flags,
             "direction": direction, "bytes_per_element_16bit": case.bytes_per_element(direction, torch.bfloat16),
             "bytes_per_element_fp32": case.bytes_per_element(direction, torch.float32),
             "what": case.describe(direction)}
            for case in cases for direction in ("fwd", "bwd")]


def _op_name(row: dict) -> str:
    return floor.label(row["op"], row["case"])


def progress_line(rows, seconds: float) -> str:
    """One line per (impl, op, dtype, N) as it finishes."""
    r0 = rows[0]
    parts = []
    for r in rows:
        if r.status == "ok":
            parts.append(f"{r.direction} {r.time_ms:.4f} ms {_gbps(r.gbps)} GB/s ({r.frac_copy:.2f})")
        else:
            parts.append(f"{r.direction} {r.status[:60]}")
    check = f" check {r0.check}" if r0.check else ""
    return (f"-- {r0.impl:16s} {r0.op}/{r0.case} {r0.dtype} N={r0.N} M={r0.M}: " + "; ".join(parts)
            + f";{check} [{seconds:.1f} s]")


def write_csv(rep: dict, path: str) -> None:
    device = rep["meta"]["device"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rep["rows"]:
            writer.writerow({**{k: row.get(k) for k in CSV_COLUMNS}, "device": device,
                             "copy_gbps": rep["copy"]["gbps"]})


def write_json(rep: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(rep, f, indent=1, default=str)
        f.write("\n")


def _header(rep: dict) -> list[str]:
    meta, copy = rep["meta"], rep["copy"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    lines = []
    if meta["smoke"]:
        lines.append(f"**{SMOKE_BANNER}**")
    lines += [f"device: {meta['device']}; {versions}",
              f"commit {meta['commit']}; {meta['time_utc']}; command: {meta['command']}",
              f"copy bandwidth: {copy['gbps']:.1f} GB/s (read + write of {copy['bytes'] / 1e6:.0f} MB); "
              f"timing: {meta['timing']}"]
    for name, info in rep["implementations"].items():
        if not info["available"]:
            lines.append(f"{name}: not run here: {info['reason']}")
    return lines


def _gbps(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.3g}"


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] == "ok":
        return f"{_gbps(row['gbps'])} ({row['frac_copy']:.2f})"
    return row["status"].split(":")[0]  # missing / unavailable / error / skipped


def full_table(rep: dict) -> str:
    """Markdown: per op, dtype and direction, GB/s (fraction of copy) for every N and implementation;
    then peak memory of forward+backward against torch eager."""
    impls = list(rep["implementations"])
    by_key = defaultdict(dict)
    for row in rep["rows"]:
        by_key[(_op_name(row), row["dtype"], row["direction"])][(row["N"], row["impl"])] = row
    out = ["# fusednorm benchmark: GB/s by the floor bytes of DESIGN section 5 (fraction of copy bandwidth)", ""]
    out += [line + "  " for line in _header(rep)] + [""]
    for (op, dtype, direction), cells in by_key.items():
        out.append(f"## {op} {dtype} {DIRECTION_NAMES[direction]} "
                   f"(floor: {floor.case_by_label(op).describe(direction)})")
        out.append("")
        out.append("| N | M | " + " | ".join(impls) + " |")
        out.append("|---" * (len(impls) + 2) + "|")
        for n in sorted({n for n, _ in cells}):
            m = next(r["M"] for (nn, _), r in cells.items() if nn == n)
            out.append(f"| {n} | {m} | " + " | ".join(_cell(cells.get((n, i))) for i in impls) + " |")
        if direction == "fwdbwd":
            out.append("")
            out.append("peak memory of forward+backward, MiB (x torch eager):")
            out.append("")
            out.append("| N | " + " | ".join(impls) + " |")
            out.append("|---" * (len(impls) + 1) + "|")
            for n in sorted({n for n, _ in cells}):
                parts = []
                for i in impls:
                    r = cells.get((n, i))
                    if r is None or r.get("peak_mem_bytes") is None:
                        parts.append("")
                    else:
                        ratio = f" (x{r['mem_vs_torch']:.2f})" if r.get("mem_vs_torch") else ""
                        parts.append(f"{r['peak_mem_bytes'] / 2**20:.0f}{ratio}")
                out.append(f"| {n} | " + " | ".join(parts) + " |")
        notes = sorted({f"{r['impl']}: {r['note']}" for r in cells.values() if r.get("note")} |
                       {f"{r['impl']}: {r['status']}" for r in cells.values() if r["status"].startswith("error")})
        if notes:
            out.append("")
            out += [f"- {n}" for n in notes]
        out.append("")
    return "\n".join(out) + "\n"


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summary_table(rep: dict) -> str:
    """The table printed last: per op, dtype and direction, the geometric mean over N of the fraction
    of copy bandwidth each implementation reaches ('*': not every N has a figure; '-': no figure), and
    the geometric mean of peak fwd+bwd memory relative to torch eager."""
    impls = list(rep["implementations"])
    groups = defaultdict(lambda: defaultdict(list))
    ns = defaultdict(set)
    for row in rep["rows"]:
        key = (_op_name(row), row["dtype"])
        ns[key].add(row["N"])
        groups[key][(row["direction"], row["impl"])].append(row)
    width = 10
    lines = ["", "=" * 100]
    if rep["meta"]["smoke"]:
        lines.append(f"{SMOKE_BANNER.upper()}: the numbers below only prove that the pipeline runs")
    lines += _header(rep)
    lines.append("fraction of copy bandwidth, geometric mean over N (* = some N without a figure); "
                 "mem = peak fwd+bwd memory / torch eager's")
    lines.append(f"{'op':30s} {'dtype':5s} {'dir':7s}" + "".join(f"{SHORT.get(i, i)[:width]:>{width}s}" for i in impls))
    for (op, dtype), cells in groups.items():
        for direction in ("fwd", "bwd", "fwdbwd", "mem"):
            parts = []
            for impl in impls:
                rows = cells.get(("fwdbwd" if direction == "mem" else direction, impl), [])
                field = "mem_vs_torch" if direction == "mem" else "frac_copy"
                values = [r[field] for r in rows if r["status"] == "ok" and r.get(field)]
                g = _geomean(values)
                if g is None:
                    parts.append("-")
                else:
                    star = "*" if len(values) < len(ns[(op, dtype)]) else ""
                    parts.append(f"{g:.2f}{star}")
            if direction == "mem" and all(p == "-" for p in parts):
                continue
            lines.append(f"{op:30s} {dtype:5s} {direction:7s}" + "".join(f"{p:>{width}s}" for p in parts))
    # Figures whose output disagreed with torch eager, and failures: listed, never folded into a mean.
    mismatched = sorted({f"{r['impl']} {_op_name(r)} {r['dtype']} N={r['N']}: {r['check']}" for r in rep["rows"]
                         if r.get("check", "").startswith("mismatch")})
    failed = sorted({f"{r['impl']} {_op_name(r)} {r['dtype']} N={r['N']} {r['direction']}: {r['status'][:120]}"
                     for r in rep["rows"] if r["status"].startswith("error")})
    skipped = sum(r["status"].startswith("skipped") for r in rep["rows"])
    if mismatched:
        lines.append(f"OUTPUT MISMATCH against torch eager ({len(mismatched)}):")
        lines += [f"  {m}" for m in mismatched[:20]]
    if failed:
        lines.append(f"errors ({len(failed)}; all in results.csv):")
        lines += [f"  {f}" for f in failed[:20]]
    if skipped:
        lines.append(f"{skipped} figures skipped: time budget exhausted (rerun with --dtypes/--ops/--ns subsets)")
    return "\n".join(lines)


def write_plots(rep: dict, out_dir: str) -> str:
    """gbps_<dtype>.png: one panel per op and direction, GB/s against N, one line per implementation,
    the copy bandwidth as a dashed ceiling. Returns a line saying what was written (or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "== plots: skipped: matplotlib is not installed (pip install matplotlib)"
    copy_gbps = rep["copy"]["gbps"]
    impls = list(rep["implementations"])
    written = []
    for dtype in sorted({r["dtype"] for r in rep["rows"]}):
        rows = [r for r in rep["rows"] if r["dtype"] == dtype]
        ops = list(dict.fromkeys(_op_name(r) for r in rows))
        directions = [d for d in ("fwd", "bwd", "fwdbwd") if any(r["direction"] == d for r in rows)]
        fig, axes = plt.subplots(len(ops), len(directions), figsize=(5 * len(directions), 3.2 * len(ops)),
                                 squeeze=False)
        for i, op in enumerate(ops):
            for j, direction in enumerate(directions):
                ax = axes[i][j]
                for k, impl in enumerate(impls):
                    pts = sorted((r["N"], r["gbps"]) for r in rows if _op_name(r) == op and r["impl"] == impl
                                 and r["direction"] == direction and r["status"] == "ok")
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=impl,
                                color=f"C{k}")
                ax.axhline(copy_gbps, color="black", ls="--", lw=1, label="copy (ceiling)")
                ax.set_xscale("log", base=2)
                ax.set_title(f"{op} {dtype} {DIRECTION_NAMES[direction]}", fontsize=9)
                ax.set_xlabel("N")
                ax.set_ylabel("GB/s (floor bytes)")
                ax.set_ylim(bottom=0)
                ax.grid(alpha=0.3)
        handles, labels = {}, []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(lab, h)
        labels = list(handles)
        title = f"{rep['meta']['device']} - commit {rep['meta']['commit'][:12]}"
        if rep["meta"]["smoke"]:
            title = f"{SMOKE_BANNER.upper()} - {title}"
        fig.suptitle(title, fontsize=10)
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(len(labels), 5),
                   fontsize=8)
        fig.tight_layout(rect=(0, 0.04, 1, 0.97))
        path = os.path.join(out_dir, f"gbps_{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return "== plots: " + (", ".join(written) if written else "none (no rows)")
