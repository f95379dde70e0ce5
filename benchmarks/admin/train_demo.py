"""Training demo: a deep Post-LN encoder without warmup, plain vs Admin vs Pre-LN (CPU, a few minutes).

Task: sort a sequence of T tokens drawn from a vocabulary of V symbols; the model reads the sequence and
predicts, at each position, the token of the sorted sequence there (an encoder with a per-position
classifier: a task that needs attention across the whole sequence).

Model: token + learned position embeddings -> fusednorm.models.Encoder (L layers, width 64, 4 heads, FFN 256)
-> linear classifier. Adam, constant learning rate from the first step (no warmup), batch 32.

Runs: plain Post-LN, Admin (Post-LN with omega from fusednorm.admin_init on one training batch) and Pre-LN
at depth L (default 18), plus a shallow Post-LN (3 layers) that shows the learning rate is a sane one.
Optional variants (--variants): admin_closed (omega from the closed form, no batch) and deepnorm.

    python benchmarks/admin/train_demo.py            # writes benchmarks/results/admin/train_demo.(md|csv|png)
    python benchmarks/admin/train_demo.py --steps 50 --seeds 1 --no-write   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fusednorm  # noqa: E402
from fusednorm.models import Encoder  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "results" / "admin"


class SortModel(nn.Module):
    """tokens (B, T) int64 -> logits (B, T, V)."""

    def __init__(self, vocab: int, seq: int, depth: int, variant: str, width: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(seq, width) * 0.5)
        nn.init.normal_(self.tok.weight, std=0.5)
        self.encoder = Encoder(depth, width, 4, 4 * width, variant)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.tok(tokens) + self.pos))


def batch(gen: torch.Generator, n: int, seq: int, vocab: int) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, vocab, (n, seq), generator=gen)
    return x, x.sort(dim=1).values


def train(variant: str, depth: int, seed: int, *, steps: int, lr: float, vocab: int = 16, seq: int = 10,
          batch_size: int = 64, eval_every: int = 20) -> dict:
    """One run; returns per-step training loss and periodic held-out token / sequence accuracy."""
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(seed)
    model = SortModel(vocab, seq, depth, "admin" if variant == "admin_closed" else variant)
    if variant == "admin_closed":  # no batch: admin-torch's closed form for N = 2 * depth branches
        fusednorm.admin_init(model)
    if variant == "admin":
        x_profile, _ = batch(torch.Generator().manual_seed(10_000 + seed), batch_size, seq, vocab)
        fusednorm.admin_init(model, lambda: model(x_profile))
    x_eval, y_eval = batch(torch.Generator().manual_seed(20_000), 1024, seq, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    losses, evals = [], []
    for step in range(1, steps + 1):
        model.train()
        x, y = batch(data, batch_size, seq, vocab)
        loss = loss_fn(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item() if torch.isfinite(loss) else float("nan"))
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                pred = model(x_eval).argmax(-1)
            evals.append((step, float((pred == y_eval).float().mean()), float((pred == y_eval).all(1).float().mean())))
    return dict(variant=variant, depth=depth, seed=seed, losses=losses, evals=evals)


def summarize(runs: list[dict], tail: int = 20) -> list[dict]:
    rows = []
    for key in dict.fromkeys((r["variant"], r["depth"]) for r in runs):
        rs = [r for r in runs if (r["variant"], r["depth"]) == key]
        final_loss = [statistics.fmean(r["losses"][-tail:]) for r in rs]
        tok = [r["evals"][-1][1] for r in rs]
        sq = [r["evals"][-1][2] for r in rs]
        rows.append(dict(variant=key[0], depth=key[1], final_loss=final_loss, token_acc=tok, seq_acc=sq))
    return rows


def label(variant: str, depth: int) -> str:
    return LABELS[variant] + f" L={depth}"


LABELS = {"post": "Post-LN", "admin": "Admin", "admin_closed": "Admin (closed form)", "pre": "Pre-LN",
          "deepnorm": "DeepNorm"}


def write_outputs(runs: list[dict], args, seconds: float, out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs)
    with open(out_dir / "train_demo.csv", "w") as f:
        f.write("variant,depth,seed,step,train_loss,token_acc,seq_acc\n")
        for r in runs:
            ev = {s: (a, b) for s, a, b in r["evals"]}
            for step, loss in enumerate(r["losses"], 1):
                a, b = ev.get(step, ("", ""))
                f.write(f"{r['variant']},{r['depth']},{r['seed']},{step},{loss:.5f},{a},{b}\n")
    fmt = lambda xs, p=3: " / ".join(f"{v:.{p}f}" for v in xs)
    seeds = ", ".join(map(str, sorted({r["seed"] for r in runs})))
    lines = ["# Training demo: deep Post-LN without warmup (CPU, float32)", "",
             f"Sorting {args.seq} tokens over a vocabulary of {args.vocab}; width 64, 4 heads, FFN 256; Adam lr "
             f"{args.lr} constant from step 1 (no warmup), batch {args.batch}, {len(runs[0]['losses'])} steps, "
             f"seeds {seeds}. Generated by benchmarks/admin/train_demo.py in {seconds:.0f} s of CPU processes "
             "(1 thread each). Values per seed; loss = mean training loss of the last 20 steps; accuracies on "
             "1024 held-out sequences at the last step (chance token accuracy ~ 1/16).", "",
             "Reproduce: `python benchmarks/admin/train_demo.py`, or one process per seed "
             "(`--seeds 1 --seed-start S --dump runS.json`) then `--merge run0.json run1.json run2.json`.", "",
             "| model | final train loss (per seed) | token accuracy (per seed) | sequence accuracy (per seed) |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {label(r['variant'], r['depth'])} | {fmt(r['final_loss'])} | {fmt(r['token_acc'])} | "
                     f"{fmt(r['seq_acc'])} |")
    (out_dir / "train_demo.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"post": "tab:red", "pre": "tab:blue", "admin": "tab:green", "admin_closed": "tab:olive",
              "deepnorm": "tab:gray"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    seen = set()
    for r in runs:
        key = (r["variant"], r["depth"])
        ls = ":" if r["depth"] < args.depth else "-"
        lab = label(*key) if key not in seen else None
        seen.add(key)
        loss = torch.tensor(r["losses"])
        smooth = torch.nn.functional.avg_pool1d(loss.view(1, 1, -1), 9, 1, 4, count_include_pad=False).view(-1)
        axes[0].plot(range(1, len(loss) + 1), smooth, color=colors[r["variant"]], ls=ls, alpha=0.8, label=lab)
        axes[1].plot([e[0] for e in r["evals"]], [e[1] for e in r["evals"]], color=colors[r["variant"]], ls=ls,
                     alpha=0.8, label=lab)
    axes[0].set_ylabel("training loss (9-step moving average)")
    axes[1].set_ylabel("held-out token accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend()
    others = " / ".join(dict.fromkeys(LABELS[r["variant"]] for r in runs if r["variant"] != "post"))
    fig.suptitle(f"Sorting, Adam lr {args.lr} without warmup: {args.depth}-layer Post-LN vs {others} "
                 f"({args.seeds} seeds each)")
    fig.tight_layout()
    fig.savefig(out_dir / "train_demo.png", dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--shallow", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny shapes)")
    p.add_argument("--variants", default="post,admin,pre")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (to split the seeds over processes)")
    p.add_argument("--dump", type=Path, help="also write the raw runs to this JSON file")
    p.add_argument("--merge", type=Path, nargs="+", help="write the outputs from these --dump files; train nothing")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        dumps = [json.loads(f.read_text()) for f in args.merge]
        rank = lambda r: (r["depth"] == args.depth, list(LABELS).index(r["variant"]), r["seed"])
        runs = sorted((r for d in dumps for r in d["runs"]), key=rank)
        args.seeds = len({r["seed"] for r in runs})
        write_outputs(runs, args, sum(d["seconds"] for d in dumps), args.out)
        print(f"wrote {args.out}/train_demo.(md|csv|png) from {len(runs)} runs")
        return
    t0 = time.time()
    runs = []
    configs = [("post", args.shallow)] if args.shallow else []
    configs += [(v, args.depth) for v in args.variants.split(",")]
    for order, (variant, depth) in enumerate(configs):
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            t1 = time.time()
            r = train(variant, depth, seed, steps=args.steps, lr=args.lr, vocab=args.vocab, seq=args.seq,
                      batch_size=args.batch)
            r["order"] = order
            runs.append(r)
            last = r["evals"][-1]
            print(f"{label(variant, depth):12s} seed {seed}: loss {statistics.fmean(r['losses'][-20:]):.3f} "
                  f"token acc {last[1]:.3f} seq acc {last[2]:.3f} ({time.time() - t1:.0f} s)", flush=True)
    dt = time.time() - t0
    if args.dump:
        args.dump.write_text(json.dumps(dict(seconds=dt, runs=runs)))
    if not args.no_write:
        write_outputs(runs, args, dt, args.out)
        print(f"wrote {args.out}/train_demo.(md|csv|png) in {dt:.0f} s")


if __name__ == "__main__":
    main()
