"""Admin paper Figure 4 at small scale on the CPU: output change vs depth for Post-LN, Pre-LN, Admin.

For an L-layer encoder (fusednorm.models.Encoder, width 64, 4 heads, FFN 256, attention + FFN sublayers)
and a fixed input batch x, we measure the mean squared change of the output F(x, W)

    (a) perturb:  W* = W + delta, delta ~ N(0, (eps * std(W))^2) on every projection weight (eps = 1e-2);
    (b) adam:     W* = W after one Adam step (lr = 1e-4; "adam_small": lr = 1e-5, the linear regime) on the
                  MSE to a random target (every parameter steps, Admin's omega included),

    change = mean over elements of (F(x, W*) - F(x, W))^2,

for L in {2, 4, 8, 16, 32}, several seeds (a seed fixes the weights, x, delta and the target), and
report the median and the min/max over seeds. Admin's omega is set by ``fusednorm.admin_init`` with a
profiling pass on a separate batch from the same distribution; DeepNorm is shown as an extra reference.
The paper's claim (Liu et al. 2020, Figure 4 and Theorem 2): Post-LN's change grows ~O(L), Pre-LN's and
Admin's ~O(log L).

    python benchmarks/admin/figure4.py            # full run: table + CSV + PNG in benchmarks/results/admin/
    python benchmarks/admin/figure4.py --quick    # 2 seeds, L <= 8 (smoke)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fusednorm  # noqa: E402
from fusednorm.models import Encoder  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "results" / "admin"
DEPTHS = (2, 4, 8, 16, 32)
VARIANTS = ("post", "pre", "admin", "deepnorm")
KINDS = ("perturb", "adam", "adam_small")
ADAM_LR = {"adam": 1e-4, "adam_small": 1e-5}


def build(variant: str, depth: int, seed: int, *, width: int = 64, batch: int = 8, seq: int = 16,
          dtype: torch.dtype = torch.float32, omega_override: float | None = None):
    """The model (admin_init applied for "admin") and its input batch x (batch, seq, width); all from ``seed``.

    omega_override: for tests of broken inits, fill every learned omega with this value instead of admin_init.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Encoder(depth, width, 4, 4 * width, variant).to(dtype)
    x = torch.randn(batch, seq, width, generator=gen, dtype=dtype)
    if variant == "admin":
        if omega_override is not None:
            with torch.no_grad():
                for _, m in fusednorm.admin.learned_scale_modules(model):
                    m.residual_scale.fill_(omega_override)
        else:
            # A separate generator, so that x, delta and the target are the same draws for every variant.
            pgen = torch.Generator().manual_seed(10_000 + seed)
            profile_batch = torch.randn(batch, seq, width, generator=pgen, dtype=dtype)
            fusednorm.admin_init(model, lambda: model(profile_batch))
    return model, x, gen


def output_change(model: nn.Module, x: torch.Tensor, gen: torch.Generator, kind: str, *, eps: float = 1e-2,
                  lr: float | None = None) -> float:
    """Mean squared change of model(x) under a relative random weight perturbation or one Adam step.

    kind: "perturb" (relative std eps), "adam" (lr 1e-4) or "adam_small" (lr 1e-5, the linear regime:
    the change scales as lr^2 there); lr overrides the kind's learning rate.
    """
    model.eval()  # no dropout in these models anyway; eval keeps the measurement deterministic
    with torch.no_grad():
        before = model(x)
    if kind == "perturb":
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, nn.Linear):
                    w = mod.weight
                    w.add_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * (eps * w.std()))
    elif kind in ADAM_LR:
        lr = ADAM_LR[kind] if lr is None else lr
        target = torch.randn(before.shape, generator=gen, dtype=before.dtype)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with torch.no_grad():
        after = model(x)
    return float(((after.double() - before.double()) ** 2).mean())


def measure(variant: str, depth: int, seed: int, kind: str, **kw) -> float:
    """One point of the figure: build, then output_change."""
    model, x, gen = build(variant, depth, seed, **kw)
    return output_change(model, x, gen, kind)


def run(depths=DEPTHS, seeds=range(6), variants=VARIANTS, kinds=KINDS) -> list[dict]:
    """All points; one row per (kind, variant, depth) with the median, min, max over seeds and the raw values."""
    rows = []
    for kind in kinds:
        for variant in variants:
            for depth in depths:
                vals = [measure(variant, depth, s, kind) for s in seeds]
                print(f"  {kind} {variant} L={depth}: median {statistics.median(vals):.3e}", flush=True)
                rows.append(dict(kind=kind, variant=variant, depth=depth, median=statistics.median(vals),
                                 min=min(vals), max=max(vals), values=vals))
    return rows


def growth_slopes(rows: list[dict]) -> dict[tuple[str, str], tuple[float, float]]:
    """Least-squares slopes of log(median change) against log(L) and against L, per (kind, variant).

    O(L) growth shows a log-log slope near 1; O(log L) growth a slope well below 1 that falls with L.
    """
    out = {}
    for key in {(r["kind"], r["variant"]) for r in rows}:
        pts = sorted((r["depth"], r["median"]) for r in rows if (r["kind"], r["variant"]) == key)
        xs = [math.log(d) for d, _ in pts]
        ys = [math.log(m) for _, m in pts]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)
        ratio = pts[-1][1] / pts[0][1]
        out[key] = (slope, ratio)
    return out


def write_outputs(rows: list[dict], seeds: int, seconds: float, out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "figure4.csv", "w") as f:
        f.write("kind,variant,depth,median,min,max,values\n")
        for r in rows:
            vals = " ".join(f"{v:.4e}" for v in r["values"])
            f.write(f"{r['kind']},{r['variant']},{r['depth']},{r['median']:.6e},{r['min']:.6e},{r['max']:.6e},{vals}\n")
    depths = sorted({r["depth"] for r in rows})
    slopes = growth_slopes(rows)
    lines = ["# Admin Figure 4 at small scale (CPU, float32)", "",
             f"Encoder width 64, 4 heads, FFN 256, batch 8 x 16 tokens; {seeds} seeds; "
             f"median [min, max] of the mean squared output change. Generated by benchmarks/admin/figure4.py "
             f"in {seconds:.0f} s.", ""]
    for kind in KINDS:
        desc = {"perturb": "(a) random perturbation of every projection weight, relative std 1e-2",
                "adam": "(b) one Adam step, lr 1e-4, MSE to a random target",
                "adam_small": "(b') one Adam step, lr 1e-5 (linear regime), MSE to a random target"}[kind]
        lines += [f"## {desc}", "", "| variant | " + " | ".join(f"L={d}" for d in depths)
                  + " | log-log slope | change(L=max)/change(L=min) |",
                  "| --- | " + " | ".join("---" for _ in depths) + " | --- | --- |"]
        for variant in VARIANTS:
            rs = {r["depth"]: r for r in rows if r["kind"] == kind and r["variant"] == variant}
            if not rs:
                continue
            cells = [f"{rs[d]['median']:.2e} [{rs[d]['min']:.1e}, {rs[d]['max']:.1e}]" for d in depths]
            slope, ratio = slopes[(kind, variant)]
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {slope:.2f} | {ratio:.1f} |")
        lines.append("")
    (out_dir / "figure4.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(5.5 * len(KINDS), 4.2))
    colors = {"post": "tab:red", "pre": "tab:blue", "admin": "tab:green", "deepnorm": "tab:gray"}
    for ax, kind in zip(axes, KINDS, strict=True):
        for variant in VARIANTS:
            rs = sorted((r for r in rows if r["kind"] == kind and r["variant"] == variant), key=lambda r: r["depth"])
            if not rs:
                continue
            d = [r["depth"] for r in rs]
            ax.plot(d, [r["median"] for r in rs], marker="o", color=colors[variant], label=variant,
                    ls="--" if variant == "deepnorm" else "-")
            ax.fill_between(d, [r["min"] for r in rs], [r["max"] for r in rs], color=colors[variant], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("layers L")
        ax.set_ylabel("mean squared output change")
        ax.set_title({"perturb": "random weight perturbation (rel. 1e-2)", "adam": "one Adam step, lr 1e-4",
                      "adam_small": "one Adam step, lr 1e-5"}[kind])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Admin Figure 4, small scale (width 64, CPU): median and min-max over {seeds} seeds")
    fig.tight_layout()
    fig.savefig(out_dir / "figure4.png", dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, L <= 8, no files written")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny shapes: one thread is fastest (and robust on a loaded machine)
    t0 = time.time()
    if args.quick:
        rows = run(depths=(2, 4, 8), seeds=range(2))
    else:
        rows = run(seeds=range(args.seeds))
    dt = time.time() - t0
    for r in rows:
        print(f"{r['kind']:8s} {r['variant']:9s} L={r['depth']:3d} median {r['median']:.3e} "
              f"[{r['min']:.2e}, {r['max']:.2e}]")
    for (kind, variant), (slope, ratio) in sorted(growth_slopes(rows).items()):
        print(f"{kind:8s} {variant:9s} log-log slope {slope:.2f}  ratio L_max/L_min {ratio:.1f}")
    if not args.quick:
        write_outputs(rows, args.seeds, dt, args.out)
        print(f"wrote {args.out}/figure4.(md|csv|png) in {dt:.0f} s")


if __name__ == "__main__":
    main()
