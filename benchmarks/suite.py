"""The benchmark loop: for each dtype, op, N and implementation, time forward, backward and
forward+backward, count the floor bytes (each case's Variant, floor.py), and measure peak memory of
forward+backward.

What is timed (one call each):
    fwd    : the forward with grad enabled (it saves what the backward needs, as in training)
    bwd    : torch.autograd.grad over a retained graph: every input and parameter gradient
    fwdbwd : forward, then autograd.grad (no graph retained)
Gradients are returned by autograd.grad, never accumulated into .grad, so no extra add is timed.
If the inputs of one call fit in twice the L2 cache, several input sets are rotated.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Sequence

import torch

from . import environment, floor, report
from .floor import Case
from .impls import Built, Impl, TorchEager, all_impls, select
from .timing import Timer, copy_bandwidth, l2_cache_bytes, peak_memory_bytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SKIPPED = "skipped: time budget exhausted"


@dataclasses.dataclass
class Row:
    """One figure: one implementation, case (op and case name, see floor.Case), dtype, N and direction."""

    op: str
    case: str
    dtype: str
    N: int
    M: int
    impl: str
    direction: str
    status: str  # "ok", or why there is no figure ("missing: ...", "error: ...", "skipped: ...")
    time_ms: float | None = None
    floor_bytes: int | None = None
    gbps: float | None = None
    frac_copy: float | None = None
    floor_ms: float | None = None
    peak_mem_bytes: int | None = None
    mem_vs_torch: float | None = None
    check: str = ""
    note: str = ""
    input_sets: int = 1


@dataclasses.dataclass
class InputSet:
    x: torch.Tensor
    residual: torch.Tensor | None
    dy: torch.Tensor
    dh: torch.Tensor | None


def make_inputs(case: Case, rows: int, cols: int, dtype: torch.dtype, device, seed: int) -> InputSet:
    """Random inputs (normal plus a per-row offset, never zeros) that require grad, and output grads."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand():
        t = torch.randn(rows, cols, device=device, dtype=torch.float32, generator=gen)
        t += torch.randn(rows, 1, device=device, dtype=torch.float32, generator=gen)
        return t.to(dtype)

    x = rand().requires_grad_(True)
    residual = rand().requires_grad_(True) if case.variant.has_residual else None
    dh = rand() if case.variant.prenorm else None
    return InputSet(x, residual, rand(), dh)


def _tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _check(out, ref, dtype: torch.dtype) -> str:
    """Sanity check of one forward against torch eager's (not the correctness test, which lives in
    tests/): max |out - ref| within a few units of the dtype's rounding of the largest value."""
    out, ref = _tuple(out), _tuple(ref)
    if len(out) != len(ref):
        return f"mismatch: {len(out)} outputs, torch gives {len(ref)}"
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
    worst = 0.0
    for o, r in zip(out, ref, strict=True):
        if o.shape != r.shape:
            return f"mismatch: shape {tuple(o.shape)} vs {tuple(r.shape)}"
        err = (o.detach().float() - r.float()).abs().max().item()
        scale = max(1.0, r.float().abs().max().item())
        if not err <= tol * scale:  # NaN fails too
            return f"mismatch: max err {err:.3g} (scale {scale:.3g})"
        worst = max(worst, err / scale)
    return f"ok ({worst:.1e})"


class Budget:
    """Wall-clock budget: configurations not started in time are reported as skipped."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def exhausted(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start > self.seconds


def _rotation_sets(case: Case, rows: int, cols: int, dtype: torch.dtype, l2: int | None) -> int:
    """How many input sets to rotate: enough that one call's fwd+bwd inputs span twice the L2."""
    if l2 is None:
        return 1
    per_set = case.floor_bytes("fwdbwd", rows, cols, dtype)
    return 1 if per_set >= 2 * l2 else min(64, math.ceil(2 * l2 / max(per_set, 1)))


def bench_config(impl: Impl, case: Case, dtype_name: str, cols: int, rows: int, sets: Sequence[InputSet],
                 scale: torch.Tensor | None, timer: Timer, directions: Sequence[str], copy_gbps: float,
                 ref_out, torch_peak: int | None) -> list[Row]:
    """All the rows of one implementation on one (case, dtype, N)."""
    dtype = DTYPES[dtype_name]
    device = sets[0].x.device
    base = dict(op=case.op, case=case.name, dtype=dtype_name, N=cols, M=rows, impl=impl.name, input_sets=len(sets))

    def row(direction: str, **kw) -> Row:
        return Row(direction=direction, **{**base, **kw})

    try:
        built: Built = impl.build(case, cols, dtype, device)
        check = _check(built.fn(sets[0].x, sets[0].residual, scale), ref_out, dtype)  # also the first warm-up
    except Exception as exc:  # noqa: BLE001  (one failing implementation must not stop the run)
        return [row(d, status=f"error: {type(exc).__name__}: {str(exc)[:300]}") for d in directions]

    def grad_inputs(s: InputSet) -> list[torch.Tensor]:
        return [t for t in (s.x, s.residual, scale) if t is not None] + built.params

    def grad_outputs(s: InputSet) -> tuple:
        return (s.dy, s.dh) if case.variant.prenorm else (s.dy,)

    def call(s: InputSet):
        return built.fn(s.x, s.residual, scale)

    turn = itertools.cycle(range(len(sets)))

    def fwd():
        return call(sets[next(turn)])

    def fwdbwd(s: InputSet | None = None):
        s = s if s is not None else sets[next(turn)]
        return torch.autograd.grad(_tuple(call(s)), grad_inputs(s), grad_outputs(s), allow_unused=True)

    times: dict[str, float] = {}
    notes: dict[str, str] = {}
    errors: dict[str, str] = {}
    for direction in sorted(directions, key=("fwd", "fwdbwd", "bwd").index):
        try:
            if direction == "fwd":
                times[direction] = timer.median_ms(fwd)
            elif direction == "fwdbwd":
                times[direction] = timer.median_ms(fwdbwd)
            else:
                try:
                    times[direction] = _time_backward(timer, [_tuple(call(s)) for s in sets],
                                                      [grad_inputs(s) for s in sets], [grad_outputs(s) for s in sets])
                except RuntimeError as exc:
                    # A backward that cannot be replayed over a retained graph: fall back to the difference.
                    if "fwd" in times and "fwdbwd" in times:
                        times[direction] = times["fwdbwd"] - times["fwd"]
                        notes[direction] = f"bwd = fwdbwd - fwd (retain_graph failed: {str(exc)[:80]})"
                    else:
                        raise
        except Exception as exc:  # noqa: BLE001
            errors[direction] = f"error: {type(exc).__name__}: {str(exc)[:300]}"

    peak = None
    if "fwdbwd" in directions and "fwdbwd" not in errors:
        try:
            peak = peak_memory_bytes(device, lambda: fwdbwd(sets[0]))
        except Exception as exc:  # noqa: BLE001
            notes["fwdbwd"] = f"peak memory failed: {type(exc).__name__}"

    rows_out = []
    for direction in directions:
        if direction in errors:
            rows_out.append(row(direction, status=errors[direction], check=check, note=built.note))
            continue
        ms = times[direction]
        if not ms > 0:  # a derived backward (fwdbwd - fwd) inside the noise
            rows_out.append(row(direction, status=f"error: non-positive time {ms:.4g} ms", check=check,
                                note="; ".join(n for n in (built.note, notes.get(direction, "")) if n)))
            continue
        nbytes = case.floor_bytes(direction, rows, cols, dtype)
        gbps = nbytes / (ms * 1e-3) / 1e9
        note = "; ".join(n for n in (built.note, notes.get(direction, "")) if n)
        extra = {}
        if direction == "fwdbwd":
            extra = dict(peak_mem_bytes=peak,
                         mem_vs_torch=(peak / torch_peak) if peak is not None and torch_peak else None)
        rows_out.append(row(direction, status="ok", time_ms=ms, floor_bytes=nbytes, gbps=gbps,
                            frac_copy=gbps / copy_gbps,
                            floor_ms=nbytes / (copy_gbps * 1e9) * 1e3, check=check, note=note, **extra))
    return rows_out


def _time_backward(timer: Timer, graphs: list[tuple], inputs: list[list], grads: list[tuple]) -> float:
    """Median time of autograd.grad over retained graphs, one per input set, rotated."""
    order = itertools.cycle(range(len(graphs)))

    def bwd():
        i = next(order)
        return torch.autograd.grad(graphs[i], inputs[i], grads[i], retain_graph=True, allow_unused=True)

    return timer.median_ms(bwd)


def spread_order(values: Sequence[int]) -> list[int]:
    """``values`` in the order that covers their range soonest: the middle, the largest, the smallest,
    then the midpoints of the remaining gaps (e.g. 4096, 65536, 512, 1024, 16384, 2048, 8192, 32768)."""
    vals = sorted(set(values))
    if len(vals) <= 2:
        return vals
    mid = (len(vals) - 1) // 2
    order = [vals[mid], vals[-1], vals[0]]
    gaps = [(1, mid - 1), (mid + 1, len(vals) - 2)]
    while gaps:
        lo, hi = gaps.pop(0)
        if lo > hi:
            continue
        m = (lo + hi) // 2
        order.append(vals[m])
        gaps += [(lo, m - 1), (m + 1, hi)]
    return order


def _prepare(case: Case, n_rows: int, cols: int, dtype: torch.dtype, device, l2: int | None):
    """Input sets (rotated when they would fit in L2), the learned scale (or None) and torch eager's
    forward outputs on the first set (the reference of the sanity check)."""
    n_sets = _rotation_sets(case, n_rows, cols, dtype, l2)
    sets = [make_inputs(case, n_rows, cols, dtype, device, seed=1000 * i + cols) for i in range(n_sets)]
    scale = None
    if case.variant.learned_scale:
        gen = torch.Generator(device="cpu").manual_seed(cols + 1)
        scale = (1.0 + 0.2 * torch.rand(cols, generator=gen)).to(device=device, dtype=dtype)
        scale.requires_grad_(True)
    ref = TorchEager().build(case, cols, dtype, device)
    with torch.no_grad():
        ref_out = tuple(t.detach() for t in _tuple(ref.fn(sets[0].x, sets[0].residual, scale)))
    return sets, scale, ref_out


def _absent(reason: str) -> str:
    """The status of an implementation that cannot run here: "missing: ..." (a peer not installed)
    or "unavailable: ..." (installed or ours, but it cannot run on this machine)."""
    return reason if reason.startswith("missing") else f"unavailable: {reason}"


def _rows_without_figure(impls: Sequence[Impl], directions: Sequence[str], status: str, **base) -> list[Row]:
    """One row per implementation and direction that says why there is no figure."""
    return [Row(impl=impl.name, direction=d, status=status, **base) for impl in impls for d in directions]


def run(args, command: str) -> dict:
    """Run the whole matrix that ``args`` selects; returns the report (meta, copy, impls, rows)."""
    cases = [floor.case_by_label(n) for n in args.ops] if args.ops else list(floor.CASES)  # before measuring
    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the benchmarks need a GPU; use --smoke for the CPU end-to-end check")
    else:
        device = torch.device("cuda")
    try:  # a compiled backward replayed over a retained graph must not have donated its buffers
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
    except (ImportError, AttributeError):
        pass
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    # Smoke: the output check is the only warm-up and one timed call is enough to prove the path;
    # one CPU thread, because waking a thread pool for a 512-element op costs milliseconds on a busy machine.
    timer = Timer(device, warmup_calls=0 if args.smoke else 2, cpu_repeats=1, warmup_ms=args.warmup_ms,
                  rep_ms=args.rep_ms)
    if args.smoke:
        torch.set_num_threads(1)
        print(f"== {report.SMOKE_BANNER}", flush=True)
    copy = copy_bandwidth(timer, args.copy_bytes)
    print(f"== copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['bytes'] / 1e6:.1f} MB read+written in "
          f"{copy['time_ms']:.4f} ms)", flush=True)

    names = args.impls
    if names is None and device.type == "cuda":
        # fusednorm's torch backend is the reference composition, not a kernel: on the GPU it only costs time.
        names = [impl.name for impl in all_impls() if impl.name != "fusednorm-torch"]
    impls = select(all_impls(args.compile_backend), names)
    availability = {impl.name: impl.why_unavailable(device) for impl in impls}
    for impl in impls:
        reason = availability[impl.name]
        print(f"== {impl.name:18s} {'available' if reason is None else 'UNAVAILABLE: ' + reason}", flush=True)
    l2 = l2_cache_bytes(device)
    budget = Budget(args.time_budget)
    rows: list[Row] = []

    # Under a time budget, what runs first should cover the most: every op at a spread of N before the
    # N in between (rows are sorted again in the tables and plots).
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for cols in spread_order(args.ns):
            for case in cases:
                if dtype == torch.float32 and case.variant.has_residual:
                    continue  # fp32 is benchmarked for the norms without residual only (DESIGN section 5 counts 16-bit)
                n_rows = max(1, args.elements // cols)
                base = dict(op=case.op, case=case.name, dtype=dtype_name, N=cols, M=n_rows)
                if budget.exhausted():
                    rows += _rows_without_figure(impls, args.directions, SKIPPED, **base)
                    continue
                try:
                    sets, scale, ref_out = _prepare(case, n_rows, cols, dtype, device, l2)
                except Exception as exc:  # noqa: BLE001  (e.g. out of memory: report it, go on)
                    rows += _rows_without_figure(impls, args.directions, f"error: inputs: {type(exc).__name__}: "
                                                 f"{str(exc)[:200]}", **base)
                    continue
                torch_peak = None
                for impl in impls:
                    if availability[impl.name] is not None or budget.exhausted():
                        status = SKIPPED if availability[impl.name] is None else _absent(availability[impl.name])
                        rows += _rows_without_figure([impl], args.directions, status, **base)
                        continue
                    t0 = time.monotonic()
                    got = bench_config(impl, case, dtype_name, cols, n_rows, sets, scale, timer, args.directions,
                                       copy["gbps"], ref_out, torch_peak)
                    if impl.name == "torch":
                        torch_peak = next((r.peak_mem_bytes for r in got if r.direction == "fwdbwd"), None)
                        for r in got:
                            if r.direction == "fwdbwd" and r.peak_mem_bytes:
                                r.mem_vs_torch = 1.0
                    rows += got
                    print(report.progress_line(got, time.monotonic() - t0), flush=True)
                del sets, scale, ref_out
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    meta = {
        "command": command,
        "commit": environment.git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "smoke": bool(args.smoke),
        "figures": report.SMOKE_BANNER if args.smoke else "GPU figures",
        **environment.machine(device),
        "versions": environment.versions(),
        "timing": timer.method,
        "elements_per_problem": args.elements,
        "compile_backend": args.compile_backend,
        "l2_rotation": ("input sets rotated when one call's fwd+bwd floor bytes are under 2x L2 "
                        f"(L2 = {l2} B); do_bench also clears L2 before each call") if l2 else
                       "no rotation (CPU)",
        "time_budget_s": args.time_budget,
        "wall_s": round(time.monotonic() - budget.start, 1),
    }
    if args.smoke:
        meta["device"] += f" [{report.SMOKE_BANNER}]"
    return {"meta": meta, "copy": copy, "bytes_table": report.bytes_table(cases),
            "implementations": {impl.name: {"kind": impl.kind, "available": availability[impl.name] is None,
                                            "reason": availability[impl.name]} for impl in impls},
            "rows": [dataclasses.asdict(r) for r in rows]}


def write_outputs(rep: dict, args) -> None:
    """results.csv, results.json, table.md and the plots under args.out."""
    os.makedirs(args.out, exist_ok=True)
    report.write_csv(rep, os.path.join(args.out, "results.csv"))
    report.write_json(rep, os.path.join(args.out, "results.json"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(report.full_table(rep))
    if args.no_plots:
        print("== plots: skipped (--no-plots)", flush=True)
    else:
        print(report.write_plots(rep, args.out), flush=True)
