"""``python -m fusednorm.check``: every op and variant on every available backend of this machine
against the float64 reference (DESIGN section 6), one table, non-zero exit on any failure.

On a machine without a GPU the triton backend runs its kernels in the Triton interpreter
(TRITON_INTERPRET=1 is set here before triton is imported), on a pruned matrix because the
interpreter is slow; the cuda backend runs where it is built and a GPU is present. The matrices
(generated from the variant matrix) are those of ``fusednorm.case_matrix``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import backends, case_matrix  # noqa: E402
from .testing import Case, check_case, interpreter_allowance  # noqa: E402


def cases_for(backend: str, device: torch.device, full: bool) -> list[Case]:
    """Every variant at three dtypes (``case_matrix.check``); under the Triton interpreter (~0.1 s a call)
    its pruned variants once each; with ``full`` the whole variant matrix at every dtype, on every backend."""
    if full:
        return case_matrix.full()
    if backend == "triton" and device.type == "cpu":
        return case_matrix.check_interpreted()
    return case_matrix.check()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=backends.BACKENDS,
                        help="check only these backends (default: every available one)")
    parser.add_argument("--full", action="store_true",
                        help="the whole variant matrix at every dtype, on every backend")
    parser.add_argument("--failures-only", action="store_true", help="print only failing rows")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fusednorm.check on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}")
    names = args.backend or backends.BACKENDS
    width = max(len(case.name()) for name in names for case in cases_for(name, device, args.full))
    header = f"{'variant / shape / dtype':<{width}} {'backend':<7} {'output':<16} {'max err':>9} {'torch err':>9} " \
             f"{'ratio':>6}  result"
    print(header)
    print("-" * len(header))
    failures = total = 0
    for name in names:
        try:
            backends.resolve(name, device)
        except backends.BackendUnavailableError as err:
            print(f"{'(all)':<{width}} {name:<7} not checked: {err}")
            continue
        start = time.time()
        for case in cases_for(name, device, args.full):
            rows = check_case(case, name, device=device, extra_atol=interpreter_allowance(name, case, device))
            total += 1
            # One line per case: its worst output relative to the bound.
            worst = max(rows, key=lambda r: (not r.ok, r.error / r.bound if r.bound else r.error))
            failures += not all(r.ok for r in rows)
            if args.failures_only and all(r.ok for r in rows):
                continue
            print(f"{case.name():<{width}} {name:<7} {worst.output:<16} {worst.error:9.2e} {worst.torch_error:9.2e} "
                  f"{worst.ratio:6.2f}  {'pass' if all(r.ok for r in rows) else 'FAIL'}")
        print(f"# {name}: {time.time() - start:.1f} s")
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
