"""Host cost per call of every fusednorm op and module against ATen (issue 15, item 1).

On the CPU the kernels are stubbed: the backend fusednorm resolves to is replaced by one that returns
preallocated results of the right shapes (``StubBackend``), and the CPU path (``fusednorm.cpu_path``: ATen's
own ops on CPU tensors, no backend) is switched off, so what is timed is everything fusednorm does around a
kernel launch on any device: argument checks, Variant, autograd, the op layer, reshapes, allocations of
small tensors. The references are ATen's own calls, compute included (at 4x64 float32 it is small):

- forward: ``F.layer_norm`` / ``F.rms_norm``'s whole call (the goal: fusednorm's forward <= 2x it);
- forward+backward: ATen's composed ops, ``x + r`` (or ``r * s + x``), the norm and ``backward`` (the
  goal: <= 1.5x), with the same tensors requiring grad as in the fusednorm call.

Method: one thread (torch.set_num_threads(1)), ``time.perf_counter`` around ``--calls`` calls, the minimum
over ``--repeats`` repeats (timeit's convention: on a shared machine the higher samples measure the other
processes; ``--statistic median`` for the median), in microseconds per call; fusednorm and its reference take
turns in each repeat (both see the same load). On a GPU (``--device cuda``) nothing is stubbed: the
real launch is timed, plain and replayed in a CUDA graph (that part needs a GPU; not run here).

    python benchmarks/overhead.py [--device cpu|cuda] [--out benchmarks/results/overhead_cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusednorm  # noqa: E402
from fusednorm import _plan, backends, cpu_path  # noqa: E402
from fusednorm.backends.contract import allocate_backward, allocate_forward  # noqa: E402

FORWARD_GOAL, TRAIN_GOAL = 2.0, 1.5


class StubBackend:
    """A backend whose forward / backward return results preallocated once per (variant, shapes, dtypes)."""

    def __init__(self):
        self._results = {}

    def _cached(self, key, make):
        result = self._results[key] = make()
        for t in result:  # uninitialised memory may hold NaNs and subnormals, slow to sum and accumulate
            if t is not None:
                t.zero_()
        return result

    # id(variant): fusednorm's call plans hold their Variant, so the ids are stable here; hashing the frozen
    # dataclass itself would add its own cost to every call timed.
    def forward(self, variant, args):
        key = (id(variant), args.x.shape, args.x.dtype)
        result = self._results.get(key)
        return result if result is not None else self._cached(key, lambda: allocate_forward(variant, args.x))

    def backward(self, variant, args):
        key = (id(variant), args.dy.shape, args.dy.dtype, args.bias_dtype)
        result = self._results.get(key)
        return result if result is not None else self._cached(key, lambda: allocate_backward(
            variant, args.dy, args.weight, args.residual_scale, args.bias_dtype))


def install_stub() -> Callable[[], None]:
    """Make every backend name resolve to the stub, and keep every call on the autograd Function / backend
    path: the CPU path (``fusednorm.cpu_path``, ATen's own ops instead of the backend on the CPU) is switched
    off, so what is timed is the layer every device's calls go through. Returns the function that undoes it."""
    real_implementation, real_usable = backends.implementation, cpu_path.usable
    stub = StubBackend()
    backends.implementation = lambda name: stub
    cpu_path.usable = lambda *args: False
    _plan.clear()  # plans cached before decided cpu_path.usable with the real one

    def undo():
        backends.implementation, cpu_path.usable = real_implementation, real_usable
        _plan.clear()
    return undo


STATISTICS = {"min": min, "median": statistics.median}


def per_call_us(fn: Callable[[], object], calls: int, repeats: int, statistic: str = "median") -> float:
    return paired_us([fn], calls, repeats, statistic)[0]


def paired_us(fns: list[Callable[[], object]], calls: int, repeats: int, statistic: str = "median") -> list[float]:
    """us per call of each of ``fns``, the ``statistic`` ("median" or "min") of ``repeats`` samples; the functions
    take turns within each repeat, so that a busy machine slows all of them alike (the ratios are what this
    benchmark is about)."""
    for fn in fns:
        for _ in range(max(calls // 10, 5)):
            fn()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, own in zip(fns, samples, strict=True):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            own.append((time.perf_counter() - start) / calls * 1e6)
    return [STATISTICS[statistic](own) for own in samples]


def cuda_graph_us(fn: Callable[[], object], calls: int, repeats: int, statistic: str = "median") -> float:
    """Per call when ``calls`` calls are captured in one CUDA graph and replayed (GPU only)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    return per_call_us(replay, 1, repeats, statistic) / calls


def _cases(rows: int, n: int, device, dtype) -> list[dict]:
    """(name, fusednorm forward, ATen forward reference, ATen training composition, the inputs needing grad)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_(grad)

    x, r = rand(rows, n, grad=True), rand(rows, n, grad=True)
    w, b, s = rand(n, grad=True), rand(n, grad=True), rand(n, grad=True)
    ln_ref = lambda: F.layer_norm(x, (n,), w, b)  # noqa: E731
    rms_ref = lambda: F.rms_norm(x, (n,), w, 1e-6)  # noqa: E731
    modules = {
        "LayerNorm": fusednorm.LayerNorm(n, device=device, dtype=dtype),
        "RMSNorm": fusednorm.RMSNorm(n, device=device, dtype=dtype),
        "AddLayerNorm": fusednorm.AddLayerNorm(n, device=device, dtype=dtype),
        "AddRMSNorm(prenorm)": fusednorm.AddRMSNorm(n, prenorm=True, device=device, dtype=dtype),
    }
    # torch.nn's own modules, with the same parameters: the like-for-like reference of the module rows (the goal
    # stays F.layer_norm / F.rms_norm's call; this column shows what nn.Module.__call__ itself costs on both sides).
    torch_ln = torch.nn.LayerNorm(n, device=device, dtype=dtype)
    torch_ln.weight, torch_ln.bias = modules["LayerNorm"].weight, modules["LayerNorm"].bias
    torch_rms = torch.nn.RMSNorm(n, eps=1e-6, device=device, dtype=dtype)
    torch_rms.weight = modules["RMSNorm"].weight
    module_refs = {"LayerNorm module": lambda: torch_ln(x), "RMSNorm module": lambda: torch_rms(x),
                   "AddLayerNorm module": lambda: torch_ln(x + r), "AddRMSNorm(prenorm) module":
                   lambda: (lambda h: (torch_rms(h), h))(x + r)}
    cases = [
        ("layer_norm", lambda: fusednorm.layer_norm(x, w, b), ln_ref, lambda: F.layer_norm(x, (n,), w, b)),
        ("rms_norm", lambda: fusednorm.rms_norm(x, w), rms_ref, lambda: F.rms_norm(x, (n,), w, 1e-6)),
        ("add_layer_norm", lambda: fusednorm.add_layer_norm(x, r, w, b), ln_ref,
         lambda: F.layer_norm(x + r, (n,), w, b)),
        ("add_layer_norm(prenorm)", lambda: fusednorm.add_layer_norm(x, r, w, b, prenorm=True), ln_ref,
         lambda: (lambda h: (F.layer_norm(h, (n,), w, b), h))(x + r)),
        ("add_layer_norm(learned scale)", lambda: fusednorm.add_layer_norm(x, r, w, b, residual_scale=s), ln_ref,
         lambda: F.layer_norm(torch.addcmul(x, r, s), (n,), w, b)),
        ("add_rms_norm", lambda: fusednorm.add_rms_norm(x, r, w), rms_ref, lambda: F.rms_norm(x + r, (n,), w, 1e-6)),
        ("add_rms_norm(prenorm, constant scale)", lambda: fusednorm.add_rms_norm(x, r, w, residual_scale=0.5,
                                                                                  prenorm=True), rms_ref,
         lambda: (lambda h: (F.rms_norm(h, (n,), w, 1e-6), h))(torch.add(x, r, alpha=0.5))),
        ("LayerNorm module", lambda: modules["LayerNorm"](x), ln_ref, lambda: F.layer_norm(x, (n,), w, b)),
        ("RMSNorm module", lambda: modules["RMSNorm"](x), rms_ref, lambda: F.rms_norm(x, (n,), w, 1e-6)),
        ("AddLayerNorm module", lambda: modules["AddLayerNorm"](x, r), ln_ref, lambda: F.layer_norm(x + r, (n,), w, b)),
        ("AddRMSNorm(prenorm) module", lambda: modules["AddRMSNorm(prenorm)"](x, r), rms_ref,
         lambda: (lambda h: (F.rms_norm(h, (n,), w, 1e-6), h))(x + r)),
    ]
    return [dict(name=name, fused=fused, forward_ref=fref, train_ref=tref, module_ref=module_refs.get(name))
            for name, fused, fref, tref in cases]


def _train(fn: Callable[[], object]) -> Callable[[], None]:
    """fn's forward, then backward of the sum of its outputs (gradients accumulate into .grad)."""
    def step():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o.sum() for o in outs])
    return step


def run(device: str, rows: int, n: int, calls: int, repeats: int, statistic: str = "min") -> list[dict]:
    torch.set_num_threads(1)
    dev = torch.device(device)
    rows_out = []
    undo = install_stub() if dev.type == "cpu" else (lambda: None)
    try:
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def timed(*fns):
            return paired_us([lambda fn=fn: (fn(), sync()) for fn in fns], calls, repeats, statistic)

        for case in _cases(rows, n, dev, torch.float32):
            with torch.no_grad():
                fwd_nograd, ref_nograd = timed(case["fused"], case["forward_ref"])
            fwd, ref = timed(case["fused"], case["forward_ref"])
            train, train_ref = timed(_train(case["fused"]), _train(case["train_ref"]))
            row = dict(case=case["name"], device=device, rows=rows, n=n, stubbed=dev.type == "cpu", statistic=statistic,
                       calls=calls, repeats=repeats,
                       forward_nograd_us=fwd_nograd, aten_forward_nograd_us=ref_nograd, forward_us=fwd,
                       aten_forward_us=ref, train_us=train, aten_train_us=train_ref)
            row["forward_nograd_ratio"] = row["forward_nograd_us"] / row["aten_forward_nograd_us"]
            row["forward_ratio"] = row["forward_us"] / row["aten_forward_us"]
            row["train_ratio"] = row["train_us"] / row["aten_train_us"]
            if case["module_ref"] is not None:  # forward with grad, against torch.nn's module call
                fused_us, module_us = timed(case["fused"], case["module_ref"])
                row.update(module_forward_us=fused_us, torch_module_forward_us=module_us,
                           torch_module_forward_ratio=fused_us / module_us)
            if dev.type == "cuda":
                with torch.no_grad():
                    row["forward_graph_us"] = cuda_graph_us(case["fused"], 100, repeats, statistic)
                    row["aten_forward_graph_us"] = cuda_graph_us(case["forward_ref"], 100, repeats, statistic)
            rows_out.append(row)
    finally:
        undo()
    return rows_out


class _Bare(torch.autograd.Function):
    """An autograd Function that does nothing but return a preallocated tensor (and save ``saved``, if any):
    what apply and save_for_backward cost by themselves. The output comes in a tuple, not as an argument:
    autograd would make a returned input an alias view, which costs more than the rest."""

    @staticmethod
    def forward(ctx, out, saved, *inputs):
        if saved:
            ctx.save_for_backward(*saved)
        return out[0]

    @staticmethod
    def backward(ctx, dy):
        return None


def breakdown(rows: int, n: int, calls: int, repeats: int, statistic: str = "min") -> dict[str, float]:
    """What a LayerNorm module's forward with grad is made of (CPU, kernels stubbed), us per call: each step of
    the call timed alone, from the outside in (each includes the ones below it), and Python's own pieces
    (nn.Module's call of an empty forward, a bare autograd Function's apply, saving four tensors)."""
    torch.set_num_threads(1)
    undo = install_stub()
    try:
        from fusednorm import functional as fn
        x, r = torch.randn(rows, n, requires_grad=True), torch.randn(rows, n, requires_grad=True)
        module, empty = fusednorm.LayerNorm(n), torch.nn.Identity()
        w, b = module.weight, module.bias
        ln = (False, x, None, w, b, module.eps, None, 0.0, False, False, 0.0, None)
        add = (False, x, r, w, b, module.eps, None, 0.0, False, False, 0.0, None)
        plan = _plan.lookup(*ln, False, False)
        facts_check = _plan._facts_check((x, w, b))  # what lookup_norm's cached plan is checked with
        out, four = torch.empty(rows, n), (x, w, torch.empty(rows), torch.empty(rows))
        steps = {
            "module(x)": lambda: module(x),
            "module.forward(x)": lambda: module.forward(x),
            "functional._call_norm (compile / functorch / telemetry checks, plan, Function)":
                lambda: fn._call_norm(False, x, w, b, module.eps, 0.0, None),
            "plan lookup, layer_norm (lookup_norm)":
                lambda: _plan.lookup_norm(False, x, w, b, module.eps, 0.0, None, False),
            "the tensor facts check within it (x, weight, bias)": lambda: facts_check(x, w, b),
            "plan lookup, add_layer_norm": lambda: _plan.lookup(*add, False, False),
            "_NormNoResidual.apply (the Function with its forward)": lambda: fn._NormNoResidual.apply(plan, x, w, b),
            "the forward's own work (ForwardArgs, op layer, stubbed backend)":
                lambda: fn._norm_forward(None, plan, x, w, b),
            "nn.Module call of an empty forward (Identity)": lambda: empty(x),
            "bare autograd.Function.apply, 3 tensors needing grad": lambda: _Bare.apply((out,), (), x, w, b),
            "the same, saving 4 tensors": lambda: _Bare.apply((out,), four, x, w, b),
            "F.layer_norm (the reference)": lambda: F.layer_norm(x, (n,), w, b),
        }
        times = paired_us(list(steps.values()), calls, repeats, statistic)
    finally:
        undo()
    return dict(zip(steps, times, strict=True))


def markdown(results: list[dict]) -> str:
    r0 = results[0]
    lines = [f"Host cost per call, us ({r0['statistic']} of {r0['repeats']} repeats of {r0['calls']} calls; "
             f"one thread; {r0['rows']}x{r0['n']} float32; "
             f"device {results[0]['device']}; kernels stubbed: {results[0]['stubbed']}). Goals: forward <= "
             f"{FORWARD_GOAL}x F.layer_norm / F.rms_norm's whole call; forward+backward <= {TRAIN_GOAL}x ATen's "
             "composed ops.", "",
             "| case | fwd no_grad | ATen | ratio | fwd (grad) | ATen | ratio | fwd+bwd | ATen composed | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        def mark(ratio, goal):
            return f"{ratio:.2f}" + ("" if ratio <= goal else " (over)")
        lines.append(f"| {r['case']} | {r['forward_nograd_us']:.1f} | {r['aten_forward_nograd_us']:.1f} | "
                     f"{mark(r['forward_nograd_ratio'], FORWARD_GOAL)} | {r['forward_us']:.1f} | "
                     f"{r['aten_forward_us']:.1f} | {mark(r['forward_ratio'], FORWARD_GOAL)} | {r['train_us']:.1f} | "
                     f"{r['aten_train_us']:.1f} | {mark(r['train_ratio'], TRAIN_GOAL)} |")
    modules = [r for r in results if "torch_module_forward_us" in r]
    if modules:
        lines += ["", "Modules, forward with grad, against torch.nn's own module call (torch.nn.LayerNorm / RMSNorm, "
                  "with ``x + r`` for the Add* modules; nn.Module.__call__ on both sides; timed in their own pairs):",
                  "", "| module | fusednorm | torch.nn | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['module_forward_us']:.1f} | {r['torch_module_forward_us']:.1f} | "
                  f"{r['torch_module_forward_ratio']:.2f} |" for r in modules]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument("--statistic", choices=sorted(STATISTICS), default="min")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    results = run(args.device, args.rows, args.n, args.calls, args.repeats, args.statistic)
    table = markdown(results)
    if args.device == "cpu":
        parts = breakdown(args.rows, args.n, args.calls, args.repeats, args.statistic)
        results.append(dict(case="breakdown", device="cpu", rows=args.rows, n=args.n, us=parts))
        table += ("\nWhat a LayerNorm module's forward with grad is made of (us per call, each step timed alone, "
                  "including the steps below it):\n\n| step | us |\n|---|---|\n"
                  + "".join(f"| {k} | {v:.2f} |\n" for k, v in parts.items()))
    write_results(results, table, args.out)


def write_results(results, table: str, out: str | None) -> None:
    """Print the Markdown table; with ``out``, also write OUT.json (the raw results) and OUT.md."""
    print(table)
    if out:
        with open(out + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
