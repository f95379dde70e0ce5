"""Ahead-of-time sm_90a compile report of the Triton kernels, for the installed Triton; needs no GPU.

What is compiled is what the host code launches: for each variant of ``fusednorm.variant.all_variants()``,
x dtype and width N, the triton backend's ``forward`` and ``backward`` (fusednorm/backends/triton_impl.py)
run on meta tensors with the kernels replaced by a recorder, so the report sees the real constexprs,
the None arguments, the warps and the prefetch depth of every launch. Each distinct specialization is
compiled once (``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, with the divisibility-by-16 hints
that the runtime gives aligned tensors, row strides and N) and listed with every (variant, dtype, N)
that launches it. Triton's bundled ``ptxas -v --gpu-name sm_90a`` gives registers, spills and stack;
the PTX gives global access widths and cp.async counts; the metadata gives shared memory.

Two sweeps (both by default):
- ``spills``: every variant with its affine parameters (weight, and LayerNorm's bias; a variant without
  them compiles to a subset of the same code), bf16 and fp32 (fp16: the benchmarked ops; it differs
  from bf16 in the conversions only), at the widths where registers are tightest: the backward's tiles
  of several rows (N = 1024), the widest one-pass rows (8192; 16384 in the forward) and the chunked
  backward with its column sums in registers (16384); and the benchmarked ops with telemetry
  (``store_stats``: the forward also writes row statistics), bf16 and fp32. ``--all-variants`` adds the
  variants without parameters.
- ``widths``: the four benchmarked ops (rms_norm, layer_norm, add_rms_norm Pre-LN, add_layer_norm
  Post-LN with a learned (N,) scale), bf16, N = 512 ... 65536: the rows the predictions of
  benchmarks/README.md read (registers, resident CTAs per SM, bytes in flight).

    python benchmarks/triton_compile_report.py [--out benchmarks/results/triton_compile_report_3.8] [--jobs 2]

writes ``<out>.json`` (one row per specialization) and ``<out>.md``; exits 1 if any specialization
spills at N <= 16384.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU: the interpreter must be off before import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusednorm.backends import contract, triton_impl  # noqa: E402
from fusednorm.triton import backward as backward_module  # noqa: E402
from fusednorm.triton import forward as forward_module  # noqa: E402
from fusednorm.variant import ScaleKind, Variant, all_variants  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = {"_forward_kernel": forward_module._forward_kernel, "_backward_kernel": backward_module._backward_kernel,
           "_reduce_partials_kernel": backward_module._reduce_partials_kernel}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
           torch.int64: "*i64"}
# The widths where each kernel's registers are tightest (see the module docstring).
SPILL_WIDTHS = {"_forward_kernel": (8192, 16384), "_backward_kernel": (1024, 8192, 16384),
                "_reduce_partials_kernel": (1024,)}
ALL_WIDTHS = (512, 1024, 2048, 4096, 8192, 12288, 16384, 32768, 65536)
ROWS = 16381  # rows of the recorded launches: odd, so that no row count gets a divisibility hint
# sm_90: per SM 64K registers (allocated per warp in units of 256), 64 warps, 32 CTAs, 228 KB shared
# memory of which a CTA may take 227 KB, 1 KB reserved per CTA.
SM_REGISTERS, SM_WARPS, SM_CTAS, SM_SMEM, CTA_RESERVED_SMEM = 65536, 64, 32, 228 * 1024, 1024


def benchmarked_variants() -> dict[str, Variant]:
    """The ops of the benchmark matrix (issue 18 / benchmarks/README.md), as variants."""
    return {"rms_norm": Variant(is_rms=True),
            "layer_norm": Variant(has_bias=True),
            "add_rms_norm Pre-LN": Variant(is_rms=True, has_residual=True, prenorm=True),
            "add_layer_norm Post-LN (N,) scale": Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, has_bias=True)}


def _affine(variant: Variant) -> bool:
    return variant.has_weight and (variant.is_rms or variant.has_bias)


class _Recorder:
    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, args, kwargs))
        return launch


def recorded_launches(variant: Variant, dtype: torch.dtype, n: int) -> list[tuple[str, tuple, dict]]:
    """The kernel launches of one forward and one backward of ``variant`` on (ROWS, n) meta tensors."""
    launches: list = []
    saved = {name: getattr(triton_impl, name) for name in KERNELS}
    for name in KERNELS:
        setattr(triton_impl, name, _Recorder(name, launches))
    try:
        def meta(*shape, dt=dtype):
            return torch.empty(shape, dtype=dt, device="meta")

        rd, hd = variant.residual_dtype(dtype), variant.h_dtype(dtype)
        scale = {ScaleKind.VECTOR: meta(n), ScaleKind.SCALAR: meta()}.get(variant.scale_kind)
        seed = meta(1, dt=torch.int64) if variant.has_dropout else None
        common = dict(weight=meta(n) if variant.has_weight else None, residual_scale=scale, seed=seed,
                      scale_value=0.5 if variant.scale_kind == ScaleKind.CONSTANT else 1.0,
                      dropout_p=0.1 if variant.has_dropout else 0.0)
        residual = meta(ROWS, n, dt=rd) if variant.has_residual else None
        triton_impl.forward(variant, contract.ForwardArgs(x=meta(ROWS, n), residual=residual,
                                                          bias=meta(n) if variant.has_bias else None, **common))
        stats = meta(ROWS, dt=contract.compute_dtype(dtype))
        triton_impl.backward(variant, contract.BackwardArgs(
            dy=meta(ROWS, n), mean=stats, rstd=stats, dh_in=meta(ROWS, n, dt=hd) if variant.prenorm else None,
            x=None if variant.store_h else meta(ROWS, n), h=meta(ROWS, n, dt=hd) if variant.store_h else None,
            residual=residual if not variant.store_h or variant.learned_scale else None,
            bias_dtype=dtype if variant.has_bias else None, **common))
    finally:
        for name, kernel in saved.items():
            setattr(triton_impl, name, kernel)
    return launches


def specialization(name: str, args: tuple, kwargs: dict) -> tuple:
    """A hashable description of what Triton compiles for this launch (signature, constexprs, hints)."""
    kernel = KERNELS[name]
    signature, constexprs, hints = [], [], []
    for i, (arg, value) in enumerate(zip(kernel.arg_names, args, strict=False)):
        if isinstance(value, torch.Tensor):
            signature.append((arg, POINTER[value.dtype]))
            hints.append(i)  # 16-byte aligned (torch allocations are)
        elif value is None:
            signature.append((arg, "constexpr"))
            constexprs.append((arg, None))
        else:
            signature.append((arg, "i32"))
            aligned = arg == "N" or arg.startswith("stride")
            if aligned and value % 16 == 0 and i not in kernel.do_not_specialize:
                hints.append(i)
    options = []
    for arg, value in sorted(kwargs.items()):
        if arg == "maxnreg" and value is None:
            continue  # ptxas chooses
        if arg in ("num_warps", "num_stages", "maxnreg"):
            options.append((arg, value))
        else:
            signature.append((arg, "constexpr"))
            constexprs.append((arg, ("dtype", str(value)) if "triton.language" in type(value).__module__ else value))
    return name, tuple(signature), tuple(constexprs), tuple(hints), tuple(options)


def _ptxas() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z_:0-9]+)*?(?:\.v(\d))?\.([bfsu])(\d+)\b")


def compile_specialization(spec: tuple) -> dict:
    """Compile one specialization; its registers, spills, shared memory, access widths, cp.async count."""
    import triton.language as tl

    name, signature, constexprs, hints, options = spec
    kernel = KERNELS[name]
    values = {arg: tl.dtype(value[1]) if isinstance(value, tuple) else value for arg, value in constexprs}
    attrs = {(i,): [["tt.divisibility", 16]] for i in hints}
    source = ASTSource(kernel, dict(signature), constexprs=values, attrs=attrs)
    compiled = triton.compile(source, target=TARGET, options=dict(options))
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        done = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                              capture_output=True, text=True, check=True)
    text = done.stdout + done.stderr
    spill_st, spill_ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    widths = {"ld": Counter(), "st": Counter()}
    for op, vec, _kind, bits in _ACCESS.findall(ptx):
        widths[op][str(int(vec or 1) * int(bits))] += 1
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    warps = dict(options).get("num_warps", 4)
    smem = int(compiled.metadata.shared)
    return dict(registers=registers, spill_store_bytes=spill_st, spill_load_bytes=spill_ld,
                stack_bytes=int(re.search(r"(\d+) bytes stack frame", text).group(1)), shared_bytes=smem,
                cp_async=len(re.findall(r"\bcp\.async\.c[ag]\.shared", ptx)),
                ld={k: v for k, v in sorted(widths["ld"].items(), key=lambda kv: -int(kv[0]))},
                st={k: v for k, v in sorted(widths["st"].items(), key=lambda kv: -int(kv[0]))},
                num_warps=warps, resident_ctas=resident_ctas(registers, warps, smem))


def resident_ctas(registers: int, warps: int, smem: int) -> int:
    """CTAs per SM on sm_90 by the three limits: registers (per warp, in units of 256), warp slots, smem."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = SM_REGISTERS // (per_warp * warps)
    by_smem = SM_SMEM // (smem + CTA_RESERVED_SMEM)
    return max(0, min(SM_CTAS, SM_WARPS // warps, by_registers, by_smem))


def sweep(all_variants_too: bool) -> list[tuple[str, Variant, str, int]]:
    """(sweep, variant, dtype name, N) of both sweeps (the spill sweep's launches are kept only at their
    kernel's SPILL_WIDTHS)."""
    cases = []
    widths = sorted({n for kernel_widths in SPILL_WIDTHS.values() for n in kernel_widths})
    for variant in all_variants():
        if all_variants_too or _affine(variant):
            cases += [("spills", variant, dtype, n) for dtype in ("bf16", "fp32") for n in widths]
    for variant in benchmarked_variants().values():
        cases += [("widths", variant, "bf16", n) for n in ALL_WIDTHS]
        cases += [("spills", variant, "fp16", n) for n in widths]
        # Telemetry (store_stats: the forward also writes row statistics) on the benchmarked ops.
        monitored = dataclasses.replace(variant, store_stats=True)
        cases += [("spills", monitored, dtype, n) for dtype in ("bf16", "fp32") for n in widths]
    return cases


def build_report(jobs: int, all_variants_too: bool) -> dict:
    launched_by: dict[tuple, list] = {}
    for sweep_name, variant, dtype, n in sweep(all_variants_too):
        for name, args, kwargs in recorded_launches(variant, DTYPES[dtype], n):
            if sweep_name == "spills" and n not in SPILL_WIDTHS[name]:
                continue
            spec = specialization(name, args, kwargs)
            launched_by.setdefault(spec, []).append(dict(sweep=sweep_name, variant=variant.name, dtype=dtype, N=n,
                                                         **{k: kwargs[k] for k in ("BLOCK_N", "ROWS", "BAND_CHUNKS",
                                                                                   "NUM_CHUNKS", "NUM_STAGES",
                                                                                   "maxnreg")
                                                            if kwargs.get(k) is not None}))
    specs = list(launched_by)
    start = time.time()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(compile_specialization, specs, chunksize=4))
    rows = [dict(kernel=spec[0].strip("_"), **stats, launches=launched_by[spec])
            for spec, stats in zip(specs, results, strict=True)]
    ptxas = subprocess.run([_ptxas(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return dict(triton=triton.__version__, torch=torch.__version__, target="cuda sm_90a (GPUTarget('cuda', 90, 32))",
                ptxas=ptxas, generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                compile_seconds=round(time.time() - start), rows=rows)


def _spills(row: dict) -> bool:
    return bool(row["spill_store_bytes"] or row["spill_load_bytes"])


def _fmt(hist: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in hist.items())


def to_markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [f"# Triton kernels: sm_90a ahead-of-time compile report, triton {report['triton']}", "",
             f"{report['target']}, {report['ptxas']}, torch {report['torch']}; generated {report['generated']} by "
             "`python benchmarks/triton_compile_report.py` (no GPU; see its docstring for what is compiled).",
             f"{len(rows)} specializations, each compiled once ({report['compile_seconds']} s).", "",
             "Columns: registers per thread; spill stores/loads in bytes per thread; shared memory per CTA (prefetch",
             "buffers, reduction scratch); resident CTAs per SM (sm_90 limits: 64K registers, 64 warps, 32 CTAs,",
             "228 KB shared memory); cp.async: 16-byte asynchronous copies in the PTX (prefetch); global access",
             "widths in bits with counts (128 = v4.b32: vectorized; 32: per-row statistics and scalars).", "",
             "## Summary", ""]
    for kernel in sorted({r["kernel"] for r in rows}):
        mine = [r for r in rows if r["kernel"] == kernel]
        spilling = [r for r in mine if _spills(r)]
        small = [r for r in spilling if min(launch["N"] for launch in r["launches"]) <= 16384]
        one_cta = [r for r in mine if r["resident_ctas"] <= 1]
        lines.append(f"- {kernel}: {len(mine)} specializations, registers {min(r['registers'] for r in mine)}-"
                     f"{max(r['registers'] for r in mine)}, spilling {len(spilling)} ({len(small)} at N <= 16384), "
                     f"with cp.async {sum(r['cp_async'] > 0 for r in mine)}, one CTA per SM {len(one_cta)} "
                     f"(of which at 16+ warps {sum(r['num_warps'] >= 16 for r in one_cta)}).")
    spilling = [r for r in rows if _spills(r)]
    lines += ["", "Spilling specializations: " + ("none." if not spilling else "")]
    lines += [f"- {r['kernel']} {r['spill_store_bytes']}/{r['spill_load_bytes']} B, {r['registers']} registers: "
              + "; ".join(f"{x['variant']} {x['dtype']} N={x['N']}" for x in r["launches"][:6]) for r in spilling]
    lines += ["", "Below 1 CTA per SM for register or shared-memory reasons (fewer than 16 warps per SM):"]
    low = [r for r in rows if r["resident_ctas"] * r["num_warps"] < 16]
    lines += [f"- {r['kernel']} {r['registers']} registers x {r['num_warps']} warps, {r['shared_bytes']} B smem: "
              f"{r['resident_ctas']} CTA(s): " + "; ".join(f"{x['variant']} {x['dtype']} N={x['N']}"
                                                       for x in r["launches"][:4]) for r in low] or ["- none."]
    lines += ["", "## The benchmarked ops (bf16), every width", "",
              "| op | N | kernel | BLOCK_N | rows/tile | chunks/band | warps | stages | registers | spill st/ld "
              "| smem B | CTAs/SM | cp.async | loads (bits: count) | stores (bits: count) |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    names = {v.name: op for op, v in benchmarked_variants().items()}
    table = []
    for r in rows:
        for x in r["launches"]:
            if x["sweep"] == "widths" and r["kernel"] != "reduce_partials_kernel":
                table.append((list(names).index(x["variant"]), x["N"], r["kernel"], x, r))
    for _, n, kernel, x, r in sorted(table, key=lambda t: (t[0], t[2], t[1])):
        lines.append(f"| {names[x['variant']]} | {n} | {kernel} | {x.get('BLOCK_N')} | {x.get('ROWS', 1)} | "
                     f"{x.get('BAND_CHUNKS', '-')} | {r['num_warps']} | {x.get('NUM_STAGES', 1)} | {r['registers']} | "
                     f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['shared_bytes']} | {r['resident_ctas']} | "
                     f"{r['cp_async']} | {_fmt(r['ld'])} | {_fmt(r['st'])} |")
    lines += ["", "## Highest register counts per kernel and width (spill sweep)", "",
              "| kernel | N | registers | spill st/ld | warps | CTAs/SM | smem B | cp.async | variants (dtype) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    worst: dict[tuple, dict] = {}
    for r in rows:
        for x in r["launches"]:
            if x["sweep"] == "spills":
                key = (r["kernel"], x["N"])
                if key not in worst or r["registers"] > worst[key]["registers"]:
                    worst[key] = r
    for (kernel, n), r in sorted(worst.items()):
        who = [f"{x['variant']} ({x['dtype']})" for x in r["launches"] if x["N"] == n][:3]
        lines.append(f"| {kernel} | {n} | {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | "
                     f"{r['num_warps']} | {r['resident_ctas']} | {r['shared_bytes']} | {r['cp_async']} | "
                     f"{'; '.join(who)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    major_minor = ".".join(triton.__version__.split(".")[:2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(__file__).parent / "results" / f"triton_compile_report_{major_minor}"
    parser.add_argument("--out", default=str(default_out), help="path without suffix: writes .json and .md")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compiles")
    parser.add_argument("--all-variants", action="store_true", help="also the variants without weight/bias")
    args = parser.parse_args(argv)
    report = build_report(args.jobs, args.all_variants)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{out}.md").write_text(to_markdown(report))
    print(to_markdown(report).split("## The benchmarked")[0])
    bad = [r for r in report["rows"] if _spills(r) and min(x["N"] for x in r["launches"]) <= 16384]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
