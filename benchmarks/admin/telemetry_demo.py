"""Telemetry demo (CPU, a few minutes): beta per layer per step, and a NaN caught and its step skipped.

1. The sorting task of train_demo.py (18 layers, width 64, Adam lr 1e-3 without warmup, batch 32) for the
   plain Post-LN, Admin (admin_init on one batch) and Pre-LN encoders, each trained under
   ``fusednorm.monitor``: beta = Var[f] / Var[h] of every one of the 36 Add*Norm calls at every step, from
   the fused kernels' row statistics. Post-LN's calls depend on their own branch about as much at layer 18
   as at layer 1; Admin's (and Pre-LN's) dependence falls with depth, ~1/i.
2. The Admin model again, with a NaN written into one embedding entry of one batch mid-training, and the
   README's skip-step recipe (a fused Adam handed ``mon.nonfinite()`` as ``found_inf``): the monitor sees
   the NaN first at the first norm of that step, the update is skipped on the device, training goes on.

    python benchmarks/admin/telemetry_demo.py          # writes benchmarks/results/admin/telemetry*.{md,csv,png}
    python benchmarks/admin/telemetry_demo.py --steps 10 --no-write   # smoke
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
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
from fusednorm.monitor import Record, plot_beta  # noqa: E402

_SPEC = importlib.util.spec_from_file_location("train_demo", Path(__file__).with_name("train_demo.py"))
train_demo = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(train_demo)

OUT_DIR = ROOT / "benchmarks" / "results" / "admin"
LABELS = {"post": "Post-LN", "admin": "Admin", "pre": "Pre-LN"}
VOCAB, SEQ, BATCH = 16, 8, 32


def make_model(variant: str, depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = train_demo.SortModel(VOCAB, SEQ, depth, variant)
    if variant == "admin":
        x_profile, _ = train_demo.batch(torch.Generator().manual_seed(10_000 + seed), BATCH, SEQ, VOCAB)
        fusednorm.admin_init(model, lambda: model(x_profile))
    return model


def train_monitored(variant: str, depth: int, seed: int, steps: int, lr: float, poison_step: int | None = None):
    """Trains under a monitor with the skip-step recipe; returns (records, per-step log rows)."""
    model = make_model(variant, depth, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    data = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    poison = {}

    def corrupt_embedding(module, args, output):  # one NaN in one token's embedding, one step only
        if poison.pop("now", False):
            output = output.clone()
            output[3, 2, 5] = float("nan")
        return output

    model.tok.register_forward_hook(corrupt_embedding)
    log = []
    with fusednorm.monitor(model) as mon:
        for step in range(steps):
            model.train()
            x, y = train_demo.batch(data, BATCH, SEQ, VOCAB)
            poison["now"] = step == poison_step
            loss = loss_fn(model(x).reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            bad = mon.nonfinite() | ~torch.isfinite(loss)  # device tensors: no sync inside the step
            optimizer.found_inf = bad.float()  # the fused optimizer skips this update on the device
            optimizer.step()
            del optimizer.found_inf
            optimizer.zero_grad(set_to_none=True)
            mon.step()
            log.append((step, loss.detach(), bad))
    records = mon.records()
    first_seen = {}
    for r in records:
        if r.nonfinite_rows and r.step not in first_seen:
            first_seen[r.step] = r
    rows = []
    for step, loss, bad in log:  # read back once, after training
        first = first_seen.get(step)
        rows.append(dict(step=step, loss=float(loss), skipped=bool(bad),
                         first_nonfinite_norm=first.name if first else "",
                         nonfinite_rows=first.nonfinite_rows if first else 0,
                         params_finite=None))
    rows[-1]["params_finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return records, rows


def final_loss(log: list[dict], tail: int = 10) -> float:
    """Mean training loss of the last ``tail`` steps that were not skipped."""
    return statistics.fmean(r["loss"] for r in log[-tail:] if not r["skipped"])


def per_layer(records: list[Record], step: int) -> list[float]:
    return [r.beta for r in records if r.step == step]


def write_outputs(runs: dict, nan_rows: list[dict], nan_records: list[Record], args, seconds: float) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    fields = ("step", "name", "beta", "rms_stream", "rms_branch", "max_abs_h", "nonfinite_rows")
    with open(out / "telemetry_beta.csv", "w", newline="") as f:  # 4 significant digits: the file stays small
        writer = csv.writer(f)
        writer.writerow(["variant", *fields])
        for variant, (records, _) in runs.items():
            writer.writerows([variant, *(f"{v:.4g}" if isinstance(v, float) else v
                                         for v in (getattr(r, k) for k in fields))] for r in records)
    with open(out / "telemetry_nan.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(nan_rows[0]))
        writer.writeheader()
        writer.writerows(nan_rows)

    last = args.steps - 1
    names = [r.name for r in runs["post"][0] if r.step == 0]
    lines = ["# Telemetry demo: beta per layer, and a NaN caught (CPU, float32)", "",
             f"`benchmarks/admin/telemetry_demo.py`: sorting {SEQ} tokens over {VOCAB} symbols, {args.depth}-layer "
             f"encoders (width 64), Adam lr {args.lr} without warmup, batch {BATCH}, {args.steps} steps, seed "
             f"{args.seed}, every step under `fusednorm.monitor` (torch backend). {seconds:.0f} s in all. "
             "beta = Var[f] / Var[h] of each Add*Norm call (population variances over the call), from the "
             "kernels' row statistics. Raw values: `telemetry_beta.csv`; plot: `telemetry_beta.png`.", "",
             "## beta per sublayer, first and last step", "",
             "| sublayer | " + " | ".join(f"{LABELS[v]} step 0 | {LABELS[v]} step {last}" for v in runs) + " |",
             "| --- |" + " ---: | ---: |" * len(runs)]
    table = {v: (per_layer(rec, 0), per_layer(rec, last)) for v, (rec, _) in runs.items()}
    shown = sorted({0, 1, 2, 3, 5, 9, 17, 23, 29, 34, 35} & set(range(len(names))))
    for i in shown:
        cells = " | ".join(f"{table[v][0][i]:.3f} | {table[v][1][i]:.3f}" for v in runs)
        lines.append(f"| {i + 1}: {names[i]} | {cells} |")
    lines += ["", "Final training loss (mean of the last 10 steps): " + ", ".join(
        f"{LABELS[v]} {final_loss(log):.3f}" for v, (_, log) in runs.items()) + ".", ""]
    skipped = [r for r in nan_rows if r["skipped"]]
    poisoned = [r for r in nan_records if r.nonfinite_rows]
    lines += ["## A NaN injected mid-training", "",
              f"Admin model, same task and seed, a NaN written into one embedding entry (sequence 3, position 2) "
              f"at step {args.poison_step}; the step runs the README's skip-step recipe (fused Adam, "
              "`found_inf = mon.nonfinite() | ~isfinite(loss)`). Per-step log: `telemetry_nan.csv`.", "",
              f"- Steps skipped: {[r['step'] for r in skipped]}.",
              f"- First norm that saw a non-finite value: `{skipped[0]['first_nonfinite_norm']}` "
              f"({skipped[0]['nonfinite_rows']} of {poisoned[0].rows} rows); calls with non-finite rows in that "
              f"step: {len(poisoned)} of {len(names)}; in any other step: "
              f"{sum(r.step != args.poison_step for r in poisoned)}.",
              "- Loss around it: " + ", ".join(f"step {r['step']}: {r['loss']:.3f}" for r in nan_rows
                                                if abs(r["step"] - args.poison_step) <= 2) + ".",
              f"- Final loss {final_loss(nan_rows):.3f} (the same run without the NaN: "
              f"{final_loss(runs['admin'][1]):.3f}); parameters finite at the end: "
              f"{nan_rows[-1]['params_finite']}.", ""]
    (out / "telemetry.md").write_text("\n".join(lines) + "\n")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5))
    axes = fig.subplots(2, 2)
    for ax, (variant, (records, _)) in zip(axes.flat, runs.items(), strict=False):
        calls = sum(r.step == 0 for r in records)
        plot_beta(records, ax=ax, title=f"{LABELS[variant]}: beta of each of the {calls} calls over steps")
        ax.set_ylim(5e-3, 1.5)
    ax = axes.flat[3]
    colors = {"post": "tab:red", "admin": "tab:green", "pre": "tab:blue"}
    for variant, (first, final) in table.items():
        ax.plot(range(1, len(first) + 1), first, color=colors[variant], ls=":", label=f"{LABELS[variant]} step 0")
        ax.plot(range(1, len(final) + 1), final, color=colors[variant], label=f"{LABELS[variant]} step {last}")
    ax.plot(range(1, len(names) + 1), [1 / i for i in range(1, len(names) + 1)], color="gray", lw=0.8, ls="--",
            label="1/i")
    ax.set_yscale("log")
    ax.set_ylim(5e-3, 1.5)
    ax.set_xlabel("sublayer i (execution order)")
    ax.set_ylabel("beta = Var[f] / Var[h]")
    ax.set_title("dependence on its own branch, by depth")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.suptitle(f"{args.depth}-layer encoders on sorting, Adam lr {args.lr} without warmup: Post-LN's calls depend "
                 "on their own branch at every depth, Admin's and Pre-LN's ~1/i")
    fig.tight_layout()
    fig.savefig(out / "telemetry_beta.png", dpi=90)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poison-step", type=int, default=None, help="default: the middle step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.poison_step = args.steps // 2 if args.poison_step is None else args.poison_step
    torch.set_num_threads(args.threads)
    t0 = time.time()
    runs = {}
    for variant in ("post", "admin", "pre"):
        t1 = time.time()
        runs[variant] = train_monitored(variant, args.depth, args.seed, args.steps, args.lr)
        print(f"{LABELS[variant]}: loss {final_loss(runs[variant][1]):.3f}, "
              f"beta first/last call at the last step {per_layer(runs[variant][0], args.steps - 1)[0]:.3f} / "
              f"{per_layer(runs[variant][0], args.steps - 1)[-1]:.3f} ({time.time() - t1:.0f} s)", flush=True)
    nan_records, nan_rows = train_monitored("admin", args.depth, args.seed, args.steps, args.lr, args.poison_step)
    print("skipped:", [r["step"] for r in nan_rows if r["skipped"]],
          "first seen by:", [r["first_nonfinite_norm"] for r in nan_rows if r["skipped"]], flush=True)
    if not args.no_write:
        write_outputs(runs, nan_rows, nan_records, args, time.time() - t0)
        print(f"wrote {args.out}/telemetry.md, telemetry_beta.(csv|png), telemetry_nan.csv")


if __name__ == "__main__":
    main()
