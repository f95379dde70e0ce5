"""Global load/store widths per kernel in the SASS of the built CUDA extension (fusednorm/_C*.so).

Runs ``cuobjdump -sass`` (the toolkit's, else the one Triton ships) on the extension and counts, per
kernel and architecture, the global loads and stores by width: LDG.E.128 / STG.E.128 are 16-byte
vector accesses, .64 8-byte, plain 32-bit, .U16 / .U8 one 16-bit / 8-bit element. Local-memory
accesses (LDL/STL: spills or stack arrays) are counted too. .ci/build_cuda.sh runs this after every
build, so CI regenerates the report; no GPU is needed.

    python benchmarks/cuda_sass_report.py [--so fusednorm/_C.abi3.so] [--out benchmarks/results/cuda_sass]

writes ``<out>.md`` and ``<out>.json``; exits 1 if a kernel that stores 16-bit outputs has no 128-bit
store (the vectorized path lost).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_ARCH = re.compile(r"code for (sm_\d+a?)")
_MEMORY = re.compile(r"\b(LDG|STG|LDL|STL)((?:\.[A-Z0-9_]+)*)\b")
_WIDTH = {"128": "128", "64": "64", "U16": "16", "S16": "16", "U8": "8", "S8": "8"}


def cuobjdump() -> str:
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    found = [str(c) for c in candidates if c.is_file()] + [shutil.which("cuobjdump") or ""]
    found = [f for f in found if f]
    if not found:
        raise SystemExit("cuda_sass_report: no cuobjdump (CUDA_HOME/bin or triton's bundled copy)")
    return found[0]


def parse(sass: str) -> list[dict]:
    """One row per (architecture, kernel): counts of LDG/STG by width in bits, and LDL/STL."""
    rows, arch, current = [], None, None
    for line in sass.splitlines():
        m = _ARCH.search(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNCTION.match(line)
        if m:
            current = dict(arch=arch, mangled=m.group(1), ld=Counter(), st=Counter(), local=Counter())
            rows.append(current)
            continue
        if current is None or "/*" not in line:
            continue
        for op, modifiers in _MEMORY.findall(line):
            if op in ("LDL", "STL"):
                current["local"][op] += 1
                continue
            width = next((_WIDTH[m] for m in modifiers.split(".") if m in _WIDTH), "32")
            current["ld" if op == "LDG" else "st"][width] += 1
    return rows


def demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return [n.replace("fusednorm::", "") for n in out] if len(out) == len(names) else names


def _fmt(counter: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=lambda kv: -int(kv[0]))) or "-"


def to_markdown(report: dict) -> str:
    rows = report["kernels"]
    lines = ["# CUDA extension: global access widths in SASS", "",
             f"`cuobjdump -sass` of `{report['so']}` ({report['cuobjdump']}), generated {report['generated']} by "
             "`python benchmarks/cuda_sass_report.py` (run by .ci/build_cuda.sh).", "",
             "Counts of global load (LDG) and store (STG) instructions per kernel by width in bits: 128 = 16-byte",
             "vector, 16 = one bf16/fp16 element. LDL/STL: local memory (spills, stack arrays).", "", "## Summary", ""]
    for arch in sorted({r["arch"] for r in rows}):
        mine = [r for r in rows if r["arch"] == arch]
        total_ld, total_st = Counter(), Counter()
        for r in mine:
            total_ld.update(r["ld"])
            total_st.update(r["st"])
        lines.append(f"- {arch}: {len(mine)} kernels; loads {_fmt(total_ld)}; stores {_fmt(total_st)}; kernels with "
                     f"local memory: {sum(1 for r in mine if r['local'])}.")
    lines += ["", "| arch | kernel | loads (bits: count) | stores (bits: count) | LDL/STL |",
              "| --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
        local = f"{r['local'].get('LDL', 0)}/{r['local'].get('STL', 0)}" if r["local"] else "-"
        lines.append(f"| {r['arch']} | `{r['kernel']}` | {_fmt(r['ld'])} | {_fmt(r['st'])} | {local} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", default=None, help="the built extension (default: fusednorm/_C*.so)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cuda_sass"))
    args = parser.parse_args(argv)
    so = Path(args.so) if args.so else next(iter(sorted((ROOT / "fusednorm").glob("_C*.so"))), None)
    if so is None or not so.is_file():
        raise SystemExit("cuda_sass_report: fusednorm/_C*.so not found (build it: .ci/build_cuda.sh)")
    tool = cuobjdump()
    sass = subprocess.run([tool, "-sass", str(so)], capture_output=True, text=True, check=True).stdout
    rows = parse(sass)
    for row, name in zip(rows, demangle([r["mangled"] for r in rows]), strict=True):
        row["kernel"] = name
    report = dict(so=so.name, cuobjdump=subprocess.run([tool, "--version"], capture_output=True,
                                                        text=True).stdout.strip().splitlines()[-1],
                  generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), kernels=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=1, default=dict) + "\n")
    markdown = to_markdown(report)
    Path(f"{out}.md").write_text(markdown)
    print(markdown.split("| arch |")[0])
    # Every kernel that writes 16-bit elements must do so through 128-bit stores too.
    narrow = [r["kernel"] for r in rows if r["st"].get("16") and not r["st"].get("128")
              and "column_sum" not in r["kernel"]]
    if narrow:
        print("cuda_sass_report: 16-bit stores without any 128-bit store in:", *narrow, sep="\n  ", file=sys.stderr)
    return 1 if narrow else 0


if __name__ == "__main__":
    sys.exit(main())
