"""Benchmark runner: every op of DESIGN section 5 against the byte floor, side by side with torch eager,
torch.compile, fusednorm's backends and the installed peers.

    python -m benchmarks.run                      # GPU: the full matrix (see benchmarks/README.md)
    python -m benchmarks.run --smoke              # CPU: tiny sizes, end to end, no performance figures
    python -m benchmarks.run --dtypes bf16 --ops rms_norm,add_rms_norm/preln --ns 4096,8192

Writes results.csv, results.json, table.md and gbps_<dtype>.png (matplotlib optional) under --out,
and prints the summary table last. Heavy imports happen after the arguments are read, because the
smoke mode must set TRITON_INTERPRET=1 before triton is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_NS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
SMOKE_NS = (64, 256)
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU end-to-end check: tiny sizes, torch backend + triton interpreter, no figures")
    parser.add_argument("--out", default=None, help="output folder (default: out/bench, or out/bench-smoke)")
    parser.add_argument("--dtypes", type=_csv_list, default=None,
                        help="comma list of bf16,fp16,fp32 (fp32 runs layer_norm and rms_norm only)")
    parser.add_argument("--ns", type=lambda s: [int(v) for v in _csv_list(s)], default=None,
                        help=f"row widths N (default {','.join(map(str, DEFAULT_NS))})")
    parser.add_argument("--elements", type=int, default=None,
                        help="M*N per problem (default 2^26; M = elements // N, at least 1 row)")
    parser.add_argument("--ops", type=_csv_list, default=None,
                        help="cases (benchmarks/floor.py), e.g. layer_norm,add_rms_norm/preln (default: all)")
    parser.add_argument("--impls", type=_csv_list, default=None,
                        help="implementations, e.g. torch,torch.compile,fusednorm-triton,liger (default: all; "
                             "on GPU all but fusednorm-torch, the reference path, to save device time)")
    parser.add_argument("--directions", type=_csv_list, default=None, help="fwd,bwd,fwdbwd (default all)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; aot_eager in smoke mode)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; configurations not started by then are reported as skipped")
    parser.add_argument("--copy-bytes", type=int, default=None, help="size of the copy-bandwidth buffer")
    parser.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up time (default 10 ms)")
    parser.add_argument("--rep-ms", type=float, default=50.0,
                        help="do_bench measuring time per figure (default 50 ms: 50+ calls at M*N = 2^26)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dtypes = args.dtypes or ["bf16", "fp32"]
        args.ns = args.ns or list(SMOKE_NS)
        args.elements = args.elements or 256
        args.compile_backend = args.compile_backend or "aot_eager"
        args.copy_bytes = args.copy_bytes or (1 << 20)
        args.out = args.out or os.path.join("out", "bench-smoke")
    args.dtypes = args.dtypes or list(DTYPE_NAMES)
    args.ns = args.ns or list(DEFAULT_NS)
    args.elements = args.elements or (1 << 26)
    args.compile_backend = args.compile_backend or "inductor"
    args.copy_bytes = args.copy_bytes or (1 << 30)
    args.out = args.out or os.path.join("out", "bench")
    args.directions = args.directions or ["fwd", "bwd", "fwdbwd"]
    bad = [d for d in args.dtypes if d not in DTYPE_NAMES]
    if bad:
        parser.error(f"--dtypes: unknown {bad}; choose from {DTYPE_NAMES}")
    bad = [d for d in args.directions if d not in ("fwd", "bwd", "fwdbwd")]
    if bad:
        parser.error(f"--directions: unknown {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        # Must precede the first import of triton (fusednorm's triton backend runs on CPU tensors then).
        os.environ["TRITON_INTERPRET"] = "1"
    from . import report, suite

    command = " ".join([os.path.basename(sys.executable), "-m", "benchmarks.run"] +
                       (sys.argv[1:] if argv is None else list(argv)))
    start = time.monotonic()
    rep = suite.run(args, command)
    suite.write_outputs(rep, args)
    print(report.summary_table(rep), flush=True)
    print(f"[{time.monotonic() - start:.1f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
