"""The CPU path ("auto" on the CPU runs the torch backend) against ATen's composed ops (issue 15, item 3).

Times fusednorm (backend "torch", kernels real) and the same math composed from ATen ops (``x + r``,
``F.layer_norm`` / ``F.rms_norm``, their backward) on one thread, forward and forward+backward, median
of repeats, taking turns. Goal: <= 1.3x. Peak memory is not measured here (not done yet).

    python benchmarks/cpu_path.py [--out benchmarks/results/cpu_path]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusednorm  # noqa: E402
from benchmarks.overhead import paired_us, write_results  # noqa: E402

GOAL = 1.3


def _cases(rows, n, dtype):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True)

    x, r, w, b = rand(rows, n), rand(rows, n), rand(n), rand(n)
    return [
        ("layer_norm", lambda: fusednorm.layer_norm(x, w, b, backend="torch"), lambda: F.layer_norm(x, (n,), w, b)),
        ("rms_norm", lambda: fusednorm.rms_norm(x, w, backend="torch"), lambda: F.rms_norm(x, (n,), w, 1e-6)),
        ("add_layer_norm", lambda: fusednorm.add_layer_norm(x, r, w, b, backend="torch"),
         lambda: F.layer_norm(x + r, (n,), w, b)),
        ("add_rms_norm(prenorm)", lambda: fusednorm.add_rms_norm(x, r, w, prenorm=True, backend="torch"),
         lambda: (lambda h: (F.rms_norm(h, (n,), w, 1e-6), h))(x + r)),
    ]


def _train(fn):
    def step():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o.float().sum() for o in outs])
    return step


def run(shapes, dtypes, calls, repeats):
    torch.set_num_threads(1)
    results = []
    for rows, n in shapes:
        for dtype in dtypes:
            for name, fused, ref in _cases(rows, n, dtype):
                with torch.no_grad():
                    fwd, fwd_ref = paired_us([fused, ref], calls, repeats)
                train, train_ref = paired_us([_train(fused), _train(ref)], calls, repeats)
                results.append(dict(case=name, rows=rows, n=n, dtype=str(dtype).removeprefix("torch."),
                                    forward_us=fwd, aten_forward_us=fwd_ref, forward_ratio=fwd / fwd_ref,
                                    train_us=train, aten_train_us=train_ref, train_ratio=train / train_ref))
    return results


def markdown(results):
    lines = [f"CPU path (backend torch) vs ATen composed, us per call, one thread, median. Goal <= {GOAL}x.", "",
             "| case | shape | dtype | fwd | ATen | ratio | fwd+bwd | ATen | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['rows']}x{r['n']} | {r['dtype']} | {r['forward_us']:.0f} | "
                     f"{r['aten_forward_us']:.0f} | {r['forward_ratio']:.2f} | {r['train_us']:.0f} | "
                     f"{r['aten_train_us']:.0f} | {r['train_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = run([(512, 1024)], (torch.float32, torch.bfloat16), args.calls, args.repeats)
    write_results(results, markdown(results), args.out)


if __name__ == "__main__":
    main()
