"""The CPU path ("auto" on the CPU: backend "torch", taken by ``fusednorm.cpu_path``) against ATen's composed ops
(issue 15, item 3): time and peak memory, forward and forward+backward; a model with and without
``fusednorm.replace_norms``; and, for bfloat16 LayerNorm training at 4x64, what ATen's ops cost when they keep the
statistics in float32 as fusednorm does (``float32_statistics_floor``).

Time: us per call on one thread, median of repeats, fusednorm and ATen taking turns (``overhead.paired_us``).
Forward under ``torch.no_grad()``; forward+backward with every input requiring grad, the outputs summed.

Peak memory: the growth of the process's resident set (VmHWM - VmRSS of /proc/self/status) over one call,
with the high-water mark reset first (``echo 5 > /proc/self/clear_refs``), after ``gc.collect`` and
``malloc_trim``, and with glibc's mmap threshold pinned at 64 KiB (``mallopt``) so that every tensor larger
than that is mmapped on allocation and unmapped on release: the resident set then follows the live tensor bytes
(page-rounded), the inputs excluded, the results included (y, h, the gradients); each case is measured after
a warm-up call, minimum of three. Reported at 512x1024 and up (at 4x64 pages and allocator caches dominate).

    python benchmarks/cpu_path.py [--out benchmarks/results/cpu_path] [--quick]

Goals (issue 15): time <= 1.3x and peak memory <= 1.5x ATen's for every op.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusednorm  # noqa: E402
from benchmarks.overhead import paired_us, write_results  # noqa: E402

TIME_GOAL, MEMORY_GOAL = 1.3, 1.5
SHAPES = ((4, 64), (512, 1024), (4096, 1024))
DTYPES = (torch.float32, torch.bfloat16)
P, ALPHA = 0.1, 0.7071067811865476


def _cases(rows, n, dtype):
    """(name, fusednorm call, ATen composed call); inputs are leaves that require grad."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True)

    x, r, w, b, s = leaves = rand(rows, n), rand(rows, n), rand(n), rand(n), rand(n)
    shape = (n,)
    return leaves, [
        ("layer_norm", lambda: fusednorm.layer_norm(x, w, b), lambda: F.layer_norm(x, shape, w, b)),
        ("rms_norm", lambda: fusednorm.rms_norm(x, w), lambda: F.rms_norm(x, shape, w, 1e-6)),
        ("add_layer_norm", lambda: fusednorm.add_layer_norm(x, r, w, b), lambda: F.layer_norm(x + r, shape, w, b)),
        ("add_layer_norm(learned s)", lambda: fusednorm.add_layer_norm(x, r, w, b, residual_scale=s),
         lambda: F.layer_norm(r * s + x, shape, w, b)),
        ("add_layer_norm(constant s)", lambda: fusednorm.add_layer_norm(x, r, w, b, residual_scale=ALPHA),
         lambda: F.layer_norm(r * ALPHA + x, shape, w, b)),
        ("add_rms_norm(prenorm)", lambda: fusednorm.add_rms_norm(x, r, w, prenorm=True),
         lambda: (lambda h: (F.rms_norm(h, shape, w, 1e-6), h))(x + r)),
        (f"add_layer_norm(dropout {P})", lambda: fusednorm.add_layer_norm(x, r, w, b, dropout_p=P),
         lambda: F.layer_norm(F.dropout(x, P) + r, shape, w, b)),
    ]


def _train(fn, leaves):
    """One training step: gradients set to None first (zero_grad(set_to_none=True)), then made afresh."""
    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o.sum() for o in outs])
    return step


def _forward(fn, leaves):
    def step():
        with torch.no_grad():
            return fn()
    return step


_LIBC = ctypes.CDLL("libc.so.6")
_M_MMAP_THRESHOLD = -3


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth_mib(fn, tries: int = 3) -> float:
    """Peak resident-set growth over one call of ``fn`` (its results kept until the peak is read), MiB."""
    fn()
    best = float("inf")
    for _ in range(tries):
        gc.collect()
        _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS")
        result = fn()
        best = min(best, (_rss_kib("VmHWM") - before) / 1024)
        del result
    return best


def run(shapes, dtypes, budget_elements: float):
    torch.set_num_threads(1)
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    results = []
    for rows, n in shapes:
        calls = int(min(300, max(3, budget_elements / (rows * n))))
        # More repeats where a call takes microseconds: there the median of 5 moved by up to 40% run to run.
        repeats = 21 if rows * n < 1 << 16 else 5 if rows * n < 1 << 22 else 3
        for dtype in dtypes:
            leaves, cases = _cases(rows, n, dtype)
            for name, fused, ref in cases:
                row = dict(case=name, rows=rows, n=n, dtype=str(dtype).removeprefix("torch."))
                for mode, wrap in (("forward", _forward), ("train", _train)):
                    t_fused, t_ref = paired_us([wrap(fused, leaves), wrap(ref, leaves)], calls, repeats)
                    row |= {f"{mode}_us": t_fused, f"aten_{mode}_us": t_ref, f"{mode}_ratio": t_fused / t_ref}
                    if rows * n >= 1 << 19:
                        m_fused, m_ref = peak_growth_mib(wrap(fused, leaves)), peak_growth_mib(wrap(ref, leaves))
                        row |= {f"{mode}_mib": m_fused, f"aten_{mode}_mib": m_ref,
                                f"{mode}_memory_ratio": m_fused / max(m_ref, 1e-9)}
                print(row, flush=True)
                results.append(row)
    return results


class _Block(nn.Module):
    """Pre-LN residual MLP block on torch.nn modules (what replace_norms swaps: LayerNorm / RMSNorm)."""

    def __init__(self, d: int, norm: type):
        super().__init__()
        self.norm, self.up, self.down = norm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h):
        return h + self.down(F.gelu(self.up(self.norm(h))))


def model_check(calls: int, repeats: int) -> list[dict]:
    """Forward+backward of small CPU models with and without ``replace_norms`` (must not be slower)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d, batch, seq = 256, 8, 64
    models = {f"mlp-{norm.__name__}": nn.Sequential(*[_Block(d, norm) for _ in range(4)], norm(d))
              for norm in (nn.LayerNorm, nn.RMSNorm)}
    x = torch.randn(batch, seq, d)
    rows = []
    for name, model in models.items():
        fused = fusednorm.replace_norms(copy.deepcopy(model))

        def step(m):
            def run_once():
                m.zero_grad(set_to_none=True)
                m(x).square().mean().backward()
            return run_once

        t_fused, t_plain = paired_us([step(fused), step(model)], calls, repeats)
        rows.append(dict(model=name, shape=f"{batch}x{seq}x{d}", replaced_us=t_fused, torch_us=t_plain,
                         ratio=t_fused / t_plain))
        print(rows[-1], flush=True)
    return rows


def float32_statistics_floor(rows: int = 4, n: int = 64, repeats: int = 21) -> list[dict]:
    """bfloat16 LayerNorm training at a small shape, three ways: fusednorm (the CPU path), ATen's composed ops with
    the bfloat16 parameters, and ATen's composed ops with float32 copies of the parameters, the cheapest way to make
    ATen keep LayerNorm's statistics in float32 (what fusednorm does: ATen's 16-bit kernel rounds mean and rstd to
    16 bits, see fusednorm/cpu_path.py). The third is the floor for anything built from ATen's ops."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).requires_grad_(True)

    x, r, w, b = leaves = rand(rows, n), rand(rows, n), rand(n), rand(n)
    shape = (n,)
    cases = [
        ("layer_norm", lambda: fusednorm.layer_norm(x, w, b), lambda: F.layer_norm(x, shape, w, b),
         lambda: F.layer_norm(x, shape, w.float(), b.float())),
        ("add_layer_norm", lambda: fusednorm.add_layer_norm(x, r, w, b), lambda: F.layer_norm(x + r, shape, w, b),
         lambda: F.layer_norm(x + r, shape, w.float(), b.float())),
    ]
    out = []
    for name, fused, ref, ref_f32 in cases:
        t_fused, t_ref, t_f32 = paired_us([_train(f, leaves) for f in (fused, ref, ref_f32)], 300, repeats)
        out.append(dict(case=name, rows=rows, n=n, dtype="bfloat16", train_us=t_fused, aten_train_us=t_ref,
                        aten_f32_params_train_us=t_f32))
        print(out[-1], flush=True)
    return out


def markdown(results, models, floor=()):
    lines = [f"CPU path (\"auto\" on the CPU) vs ATen composed: us per call, one thread, median; peak memory: "
             f"resident-set growth over one call, MiB (see benchmarks/cpu_path.py). Goals: time <= {TIME_GOAL}x, "
             f"memory <= {MEMORY_GOAL}x.", "",
             "| case | shape | dtype | fwd us | ATen | ratio | fwd MiB | ATen | ratio | fwd+bwd us | ATen | ratio "
             "| fwd+bwd MiB | ATen | ratio |", "|---" * 15 + "|"]

    def mem(r, mode):
        if f"{mode}_mib" not in r:
            return "- | - | -"
        return f"{r[f'{mode}_mib']:.1f} | {r[f'aten_{mode}_mib']:.1f} | {r[f'{mode}_memory_ratio']:.2f}"

    for r in results:
        lines.append(f"| {r['case']} | {r['rows']}x{r['n']} | {r['dtype']} | {r['forward_us']:.0f} | "
                     f"{r['aten_forward_us']:.0f} | {r['forward_ratio']:.2f} | {mem(r, 'forward')} | "
                     f"{r['train_us']:.0f} | {r['aten_train_us']:.0f} | {r['train_ratio']:.2f} | {mem(r, 'train')} |")
    worst = {k: max(r[k] for r in results if k in r) for k in
             ("forward_ratio", "train_ratio", "forward_memory_ratio", "train_memory_ratio") if
             any(k in r for r in results)}
    lines += ["", "Worst ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()), ""]
    if models:
        lines += ["Models, forward+backward, with and without `fusednorm.replace_norms` (one thread, us per step):",
                  "", "| model | input | replaced | torch.nn | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {m['model']} | {m['shape']} | {m['replaced_us']:.0f} | {m['torch_us']:.0f} | {m['ratio']:.2f} |"
                  for m in models]
    if floor:
        lines += ["", "bfloat16 LayerNorm training, float32 statistics: ATen with float32 copies of the parameters "
                  "(the floor for ATen's ops; see float32_statistics_floor), us per step:", "",
                  "| case | shape | fusednorm | ATen | ATen, float32 params | fusednorm / ATen | "
                  "ATen float32 params / ATen | fusednorm / ATen float32 params |", "|---" * 8 + "|"]
        lines += [f"| {f['case']} | {f['rows']}x{f['n']} | {f['train_us']:.1f} | {f['aten_train_us']:.1f} | "
                  f"{f['aten_f32_params_train_us']:.1f} | {f['train_us'] / f['aten_train_us']:.2f} | "
                  f"{f['aten_f32_params_train_us'] / f['aten_train_us']:.2f} | "
                  f"{f['train_us'] / f['aten_f32_params_train_us']:.2f} |" for f in floor]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="512x1024 only, no models")
    args = parser.parse_args()
    shapes = ((512, 1024),) if args.quick else SHAPES
    results = run(shapes, DTYPES, budget_elements=4e6)
    models = [] if args.quick else model_check(calls=5, repeats=5)
    floor = [] if args.quick else float32_statistics_floor()
    write_results(dict(ops=results, models=models, float32_statistics_floor=floor),
                  markdown(results, models, floor), args.out)


if __name__ == "__main__":
    main()
