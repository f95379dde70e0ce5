"""The telemetry flag leaves the forward kernels without it unchanged: a codegen comparison, no GPU needed.

Triton: compiles ``_forward_kernel`` for sm_90a (as benchmarks/triton_compile_report.py does: the launch
heuristic's BLOCK_N / warps, divisibility hints on pointers, strides and N) for the report's forward
variants, fp16 and bf16, N in {1024, 4096, 8192, 16384, 32768}, from this tree and from a base tree (a git
revision, extracted with ``git archive``), with STORE_STATS off, and compares the PTX instructions (debug
sections, .loc/.file lines and comments removed: they carry file paths and line numbers) and ptxas's
registers and spills. With STORE_STATS on (this tree) it reports registers, spills and global stores.

CUDA (``--cuda-so`` and ``--cuda-base-so``, two builds of fusednorm._C): disassembles both with cuobjdump and
compares the SASS of each ``fwd_kernel<Variant<...>>`` of the base with ``fwd_kernel<Variant<...>, 0>`` (the
telemetry-off instantiation) of this tree, instruction for instruction.

    python benchmarks/telemetry_codegen.py --base <rev> [--cuda-so fusednorm/_C.abi3.so --cuda-base-so OTHER.so]
        [--out benchmarks/results/telemetry_codegen]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (1024, 4096, 8192, 16384, 32768)
DTYPES = ("*fp16", "*bf16")
# name -> (flags, tensors present): the forward variants of benchmarks/triton_compile_report.py, plus Admin.
VARIANTS = {
    "layer_norm": (dict(IS_RMS=False, HAS_RESIDUAL=False, SCALE_KIND=0, HAS_DROPOUT=False, STORE_H=False,
                        HAS_WEIGHT=True, HAS_BIAS=True), ["X", "W", "B", "Y", "MEAN", "RSTD"]),
    "add_rms_norm (store h)": (dict(IS_RMS=True, HAS_RESIDUAL=True, SCALE_KIND=0, HAS_DROPOUT=False, STORE_H=True,
                                    HAS_WEIGHT=True, HAS_BIAS=False), ["X", "R", "W", "Y", "H", "RSTD"]),
    "add_layer_norm Admin post-LN, (N,) scale": (
        dict(IS_RMS=False, HAS_RESIDUAL=True, SCALE_KIND=3, HAS_DROPOUT=False, STORE_H=False, HAS_WEIGHT=True,
             HAS_BIAS=True), ["X", "R", "W", "B", "S", "Y", "MEAN", "RSTD"]),
    "add_layer_norm pre-LN, (N,) scale, dropout": (
        dict(IS_RMS=False, HAS_RESIDUAL=True, SCALE_KIND=3, HAS_DROPOUT=True, STORE_H=True, HAS_WEIGHT=True,
             HAS_BIAS=True), ["X", "R", "W", "B", "S", "SEED", "Y", "H", "MEAN", "RSTD"]),
}
FLOAT32_POINTERS = {"MEAN", "RSTD", "STATS"}


def emit(tree: str, stats: bool) -> list[dict]:
    """Compiles every specialization from the package in ``tree`` (run in a subprocess: a fresh import)."""
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, tree)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusednorm.triton import heuristics
    from fusednorm.triton.forward import _forward_kernel

    ptxas = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
    rows = []
    for name, (flags, present) in VARIANTS.items():
        for dtype in DTYPES:
            for n in WIDTHS:
                config = heuristics.block_config(n, backward=False)  # (block_n, chunks, warps[, tile rows, ...])
                block_n, num_chunks, num_warps = config[:3]
                constexprs = dict(flags, COMPUTE=tl.float32, BLOCK_N=block_n, NUM_CHUNKS=num_chunks)
                # Launch constexprs of later revisions (tiles of rows, prefetch, per-row parameters): the
                # heuristic's tile, without prefetch or per-row parameters.
                for name, value in (("ROWS", config[3] if len(config) > 3 else 1), ("NUM_STAGES", 1),
                                    ("PARAMS_PER_ROW", False)):
                    if name in _forward_kernel.arg_names:
                        constexprs[name] = value
                tensors = set(present)
                if "STORE_STATS" in _forward_kernel.arg_names:
                    constexprs["STORE_STATS"] = stats
                    tensors |= {"STATS"} if stats else set()
                signature, attrs = {}, {}
                for i, arg in enumerate(_forward_kernel.arg_names):
                    if arg in constexprs:
                        signature[arg] = "constexpr"
                    elif arg.isupper() and arg not in ("M", "N"):
                        if arg not in tensors:
                            signature[arg], constexprs[arg] = "constexpr", None
                            continue
                        signature[arg] = "*i64" if arg == "SEED" else "*fp32" if arg in FLOAT32_POINTERS else dtype
                        attrs[(i,)] = [["tt.divisibility", 16]]
                    else:
                        signature[arg] = "i32"
                        if arg == "N" or arg.startswith("stride_"):
                            attrs[(i,)] = [["tt.divisibility", 16]]
                source = ASTSource(_forward_kernel, signature, constexprs=constexprs, attrs=attrs)
                ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
                ptx = ptx.asm["ptx"]
                code = ptx.split(".section\t.debug")[0]
                body = "\n".join(line.split("//")[0].rstrip() for line in code.splitlines()
                                 if not line.strip().startswith((".loc", ".file", "//")))
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "k.ptx").write_text(ptx)
                    out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(Path(tmp) / "k.ptx"), "-o",
                                          str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True)
                text = out.stdout + out.stderr
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups()
                rows.append(dict(variant=name, dtype=dtype[1:], N=n, BLOCK_N=block_n, warps=num_warps,
                                 registers=int(re.search(r"Used (\d+) registers", text).group(1)),
                                 spill_store=int(spills[0]), spill_load=int(spills[1]),
                                 global_stores=len(re.findall(r"\bst\.global", ptx)),
                                 ptx_sha=hashlib.sha256(body.encode()).hexdigest()[:16]))
    return rows


def run_emit(tree: str, stats: bool) -> list[dict]:
    done = subprocess.run([sys.executable, __file__, "--emit", tree] + (["--stats"] if stats else []),
                          capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items()
                                                                            if k != "TRITON_INTERPRET"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def base_tree(rev: str, into: str) -> str:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "fusednorm"], capture_output=True, check=True)
    with tempfile.TemporaryFile() as f:
        f.write(archive.stdout)
        f.seek(0)
        tarfile.open(fileobj=f).extractall(into, filter="data")
    return into


def sass_by_kernel(so: str) -> dict[str, str]:
    """Demangled forward kernel name -> its SASS instructions and their encodings."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(cuobjdump), "-sass", so], capture_output=True, text=True, check=True).stdout
    kernels = {}
    for chunk in text.split("Function : ")[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if "fwd_kernel" not in name:
            continue
        demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
        # Instructions with their encodings; offsets and the column padding (which differs between a .so and
        # a .cubin) removed.
        code = [re.sub(r"\s+", " ", re.sub(r"/\*[0-9a-f]{4,}\*/", "", line)).strip() for line in chunk.splitlines()[1:]
                if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
        kernels[demangled] = "\n".join(code)
    return kernels


def resource_usage(so: str) -> dict[str, dict]:
    """Demangled forward kernel name -> {"REG": ..., "STACK": ..., ...} (cuobjdump -res-usage)."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(cuobjdump), "-res-usage", so], capture_output=True, text=True, check=True).stdout
    usage = {}
    for name, values in re.findall(r"Function (\S+):\n\s+(.*)", text):
        if "fwd_kernel" in name:
            demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
            usage[demangled] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d\])?):(\d+)", values)}
    return usage


def compare_cuda(so: str, base_so: str) -> dict:
    mine, base = sass_by_kernel(so), sass_by_kernel(base_so)
    pairs, same = 0, 0
    for name, code in base.items():  # fwd_kernel<Variant<...> > -> fwd_kernel<Variant<...>, 0>
        twin = name.replace("> >(fusednorm::FwdParams)", ">, 0>(fusednorm::FwdParams)")
        pairs += 1
        same += mine.get(twin) == code
    usage = resource_usage(so)
    on = {k.split("Variant<")[1].split(">, 1>")[0]: (v["REG"], v["STACK"]) for k, v in usage.items() if ", 1>(" in k}
    off = {k.split("Variant<")[1].split(">, 0>")[0]: v["REG"] for k, v in usage.items() if ", 0>(" in k}
    return dict(base_kernels=len(base), compared=pairs, identical_sass=same, stats_kernels=len(on),
                registers={k: dict(off=off[k], on=on[k][0], stack_on=on[k][1]) for k in sorted(on)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--emit", help=argparse.SUPPRESS)
    p.add_argument("--stats", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base", help="a git revision to compare with (e.g. the commit before the flag); required")
    p.add_argument("--cuda-so")
    p.add_argument("--cuda-base-so", help="a build of csrc/ at the base revision (same TORCH_CUDA_ARCH_LIST)")
    p.add_argument("--note", default="", help="a sentence for the report (e.g. where the base build comes from)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "telemetry_codegen")
    args = p.parse_args(argv)
    if args.emit:
        print(json.dumps(emit(args.emit, args.stats)))
        return 0
    if not args.base:
        p.error("--base is required")
    with tempfile.TemporaryDirectory() as tmp:
        base = run_emit(base_tree(args.base, tmp), stats=False)
    off, on = run_emit(str(ROOT), stats=False), run_emit(str(ROOT), stats=True)
    cuda = compare_cuda(args.cuda_so, args.cuda_base_so) if args.cuda_so and args.cuda_base_so else None
    same = sum(a["ptx_sha"] == b["ptx_sha"] and a["registers"] == b["registers"]
               for a, b in zip(base, off, strict=True))
    lines = ["# Telemetry flag: forward codegen with and without it (sm_90a, no GPU)", "",
             f"`python benchmarks/telemetry_codegen.py --base {args.base}`: Triton `_forward_kernel` compiled from the "
             f"base revision and from this tree with STORE_STATS off: **{same} of {len(base)} specializations have "
             "identical PTX instructions and registers**. With STORE_STATS on (this tree):", "",
             "| variant | dtype | N | BLOCK_N | warps | registers off / on | spill st/ld on (B) "
             "| global stores off / on |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for a, b in zip(off, on, strict=True):
        lines.append(f"| {a['variant']} | {a['dtype']} | {a['N']} | {a['BLOCK_N']} | {a['warps']} | {a['registers']} / "
                     f"{b['registers']} | {b['spill_store']}/{b['spill_load']} | {a['global_stores']} / "
                     f"{b['global_stores']} |")
    if args.note:
        lines += ["", args.note]
    if cuda:
        lines += ["", f"CUDA (`--cuda-so {args.cuda_so} --cuda-base-so {args.cuda_base_so}`, cuobjdump -sass): "
                  f"**{cuda['identical_sass']} of {cuda['compared']} forward kernels of the base have identical SASS** "
                  "(instructions and encodings) in their telemetry-off instantiation `fwd_kernel<V, 0>`; "
                  f"{cuda['stats_kernels']} telemetry-on kernels `fwd_kernel<V, 1>` besides (stack > 0: spills):", "",
                  "| Variant<T, IS_RMS, HAS_RESIDUAL, HAS_DROPOUT, STORE_H> | registers off / on | stack on (B) |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v['off']} / {v['on']} | {v['stack_on']} |" for k, v in cuda["registers"].items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(dict(base=base, off=off, on=on, cuda=cuda), indent=1) + "\n")
    print("\n".join(lines))
    return 0 if same == len(base) and (cuda is None or cuda["identical_sass"] == cuda["compared"]) else 1


if __name__ == "__main__":
    sys.exit(main())
