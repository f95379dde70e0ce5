#!/usr/bin/env bash
# Builds the CUDA extension fusednorm._C (csrc/) on a CPU-only CI machine that has the CUDA build of
# torch and the CUDA toolkit, and prints the ptxas register/spill report of every kernel.
#
#   .ci/build_cuda.sh                 # CI: sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), editable install
#   .ci/build_cuda.sh --report DIR    # also write DIR/ptxas_cuda_sm80.txt and DIR/ptxas_cuda_sm90.txt
#                                     # (builds for "8.0;9.0"; used for benchmarks/results/)
#   .ci/build_cuda.sh --inplace ...   # build with `setup.py build_ext --inplace` instead of pip: the .so
#                                     # lands in fusednorm/ and the Python environment is left as it is
# Every build ends with the SASS report (benchmarks/cuda_sass_report.py): global load/store widths per
# kernel, written to benchmarks/results/cuda_sass.{md,json}.
#
# Environment: CUDA_HOME (found below when unset: the real toolkit root, never the directory of an
# nvcc wrapper script), TORCH_CUDA_ARCH_LIST (default 9.0 here; setup.py's own default is 8.0;9.0),
# MAX_JOBS (default: number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."

report_dir=""
inplace=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --report) report_dir="${2:?--report needs a directory}"; shift 2 ;;
    --inplace) inplace=1; shift ;;
    *) echo "build_cuda.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

# The toolkit root has bin/nvcc as a real binary next to include/cuda_runtime.h. The nvcc on PATH may
# be a wrapper script (exec /usr/local/cuda-13.0/bin/nvcc "$@"), so its parent is not the root.
is_script() { [[ "$(head -c 2 "$1" 2>/dev/null)" == "#!" ]]; }

find_cuda_home() {
  local candidates=()
  [[ -n "${CUDA_HOME:-}" ]] && candidates+=("$CUDA_HOME")
  if command -v nvcc >/dev/null 2>&1; then
    local nvcc_path
    nvcc_path="$(readlink -f "$(command -v nvcc)")"
    candidates+=("$(dirname "$(dirname "$nvcc_path")")")
    # A wrapper script names the real nvcc.
    if is_script "$nvcc_path"; then
      local target
      target="$(grep -oE '/[^ "]*/bin/nvcc' "$nvcc_path" | head -n 1 || true)"
      [[ -n "$target" ]] && candidates+=("$(dirname "$(dirname "$target")")")
    fi
  fi
  candidates+=(/usr/local/cuda /usr/local/cuda-*)
  local dir
  for dir in "${candidates[@]}"; do
    if [[ -x "$dir/bin/nvcc" && -f "$dir/include/cuda_runtime.h" ]] && ! is_script "$dir/bin/nvcc"; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

CUDA_HOME="$(find_cuda_home)" || { echo "build_cuda.sh: no CUDA toolkit root found (set CUDA_HOME)" >&2; exit 1; }
export CUDA_HOME
export FUSEDNORM_BUILD_CUDA=1
export FUSEDNORM_PTXAS_VERBOSE=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -n "$report_dir" ]]; then
  export TORCH_CUDA_ARCH_LIST="8.0;9.0"
else
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
fi
echo "build_cuda.sh: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
"$CUDA_HOME/bin/nvcc" --version | tail -n 2
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

log="$(mktemp -t fusednorm_build.XXXXXX.log)"
rm -rf build/temp.* fusednorm/_C*.so
start=$(date +%s)
if [[ "$inplace" == 1 ]]; then
  build=(python setup.py build_ext --inplace)
else
  # --no-build-isolation: setup.py imports the installed (CUDA) torch. -v: show the compiler output.
  build=(python -m pip install --no-build-isolation --no-deps -v -e .)
fi
"${build[@]}" >"$log" 2>&1 || {
  tail -n 60 "$log"
  echo "build_cuda.sh: build failed (full log: $log)" >&2
  exit 1
}
end=$(date +%s)
echo "build_cuda.sh: built fusednorm._C in $((end - start)) s"

# ptxas -v report: one line per kernel and architecture: registers, spills, shared memory.
summarize() {
  python - "$log" "$1" <<'EOF'
import re
import subprocess
import sys

log, arch = sys.argv[1], sys.argv[2]
rows, name, current = [], None, None
for line in open(log, errors="replace"):
    m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
    if m:
        name, current = m.group(1), m.group(2)
        continue
    if name is None or current != arch:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        spills = (int(m.group(2)), int(m.group(3)))
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m:
        smem = re.search(r"(\d+) bytes smem", line)
        rows.append((name, int(m.group(1)), spills, int(smem.group(1)) if smem else 0))
        name = None
demangled = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                           text=True).stdout.splitlines() if rows else []
print(f"# ptxas -v, {arch}: registers / spill stores / spill loads / static smem per kernel")
print("# Variant<T, IS_RMS, HAS_RESIDUAL, HAS_DROPOUT, STORE_H>: 0 off, 1 on, 2 read at run time (the")
print("# forward's STORE_H); every other flag is read from the params (csrc/README.md)")
worst = 0
for (_, regs, (st, ld), smem), pretty in sorted(zip(rows, demangled), key=lambda r: r[1]):
    pretty = pretty.replace("fusednorm::", "")
    print(f"{regs:4d} regs  {st:4d} B spill st  {ld:4d} B spill ld  {smem:5d} B smem  {pretty}")
    worst = max(worst, st + ld)
print(f"# {len(rows)} kernels, max registers {max((r[1] for r in rows), default=0)}, "
      f"kernels with spills: {sum(1 for r in rows if sum(r[2]) > 0)}")
EOF
}

IFS=';' read -r -a arches <<<"$TORCH_CUDA_ARCH_LIST"
for arch in "${arches[@]}"; do
  sm="sm_${arch//./}"
  sm="${sm%+PTX}"
  if [[ -n "$report_dir" ]]; then
    mkdir -p "$report_dir"
    {
      echo "# nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -oE 'release [0-9.]+'), torch $(python -c 'import torch; print(torch.__version__)')"
      summarize "$sm"
    } | tee "$report_dir/ptxas_cuda_${sm//_/}.txt"
  else
    summarize "$sm"
  fi
done
python -c "import fusednorm._C, torch; print('fusednorm._C loads:', fusednorm._C.__file__, [n for n in ('cuda_fwd', 'cuda_bwd', 'cuda_launch_config', 'cuda_variant_facts', 'cuda_keep_threshold', 'cuda_philox_r0') if hasattr(torch.ops.fusednorm, n)])"

# SASS: global load/store widths per kernel (128-bit vectors for 16-bit outputs), regenerated every build.
python benchmarks/cuda_sass_report.py --out benchmarks/results/cuda_sass
