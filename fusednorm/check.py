"""``python -m fusednorm.check``: every op and variant on every available backend of this machine
against the float64 reference (DESIGN section 6), one table, non-zero exit on any failure.

On a machine without a GPU the triton backend runs its kernels in the Triton interpreter
(TRITON_INTERPRET=1 is set here before triton is imported), on a smaller matrix because the
interpreter is slow; the cuda backend runs where it is built and a GPU is present.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import backends  # noqa: E402
from .testing import Case, check_case, standard_cases  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cases_for(backend: str, device: torch.device, full: bool) -> list[Case]:
    interpreted = backend == "triton" and device.type == "cpu"
    if interpreted and not full:
        # The interpreter takes ~0.1-1 s a call: every variant, but fewer widths and dtypes.
        return list(standard_cases(dtypes=(torch.float32, torch.bfloat16), widths=(7, 1000)))
    return list(standard_cases())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=backends.BACKENDS,
                        help="check only these backends (default: every available one)")
    parser.add_argument("--full", action="store_true", help="the whole matrix on interpreted triton too")
    parser.add_argument("--failures-only", action="store_true", help="print only failing rows")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fusednorm.check on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}")
    names = args.backend or backends.BACKENDS
    header = f"{'op / variant':<62} {'backend':<7} {'output':<16} {'max err':>9} {'torch err':>9} {'ratio':>6}  result"
    print(header)
    print("-" * len(header))
    failures = total = 0
    for name in names:
        try:
            backends.resolve(name, device)
        except backends.BackendUnavailableError as err:
            print(f"{'(all)':<62} {name:<7} not checked: {err}")
            continue
        start = time.time()
        for case in cases_for(name, device, args.full):
            rows = check_case(case, name, device=device, extra_atol=_interpreter_allowance(name, case, device))
            total += 1
            # One line per case: its worst output relative to the bound.
            worst = max(rows, key=lambda r: (not r.ok, r.error / r.bound if r.bound else r.error))
            failures += not all(r.ok for r in rows)
            if args.failures_only and all(r.ok for r in rows):
                continue
            print(f"{case.name():<62} {name:<7} {worst.output:<16} {worst.error:9.2e} {worst.torch_error:9.2e} "
                  f"{worst.ratio:6.2f}  {'pass' if all(r.ok for r in rows) else 'FAIL'}")
        print(f"# {name}: {time.time() - start:.1f} s")
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


def _interpreter_allowance(backend: str, case: Case, device: torch.device) -> float:
    """The Triton interpreter truncates float32 -> bfloat16 instead of rounding: one more bf16 ulp."""
    if backend == "triton" and device.type == "cpu" and case.dtype == torch.bfloat16:
        return 2.0**-7
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
