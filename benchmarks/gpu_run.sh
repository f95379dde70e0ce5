#!/usr/bin/env bash
# One call on a GPU machine: install fusednorm with its CUDA extension, run the gpu-marked tests, run the
# benchmarks, and leave logs, results and plots under $OUT. No step aborts the run: each one's exit code
# and duration are logged, and the summary at the end lists them all.
#
#   bash benchmarks/gpu_run.sh [arguments for python -m benchmarks.run]
#
# Environment (all optional):
#   OUT           where everything goes (default ./out/gpu_run)
#   TOTAL_BUDGET  seconds the whole script may take (default 560: the device tool stops a command at 600);
#                 the benchmark gets what install and tests leave, minus a margin, via --time-budget
#   BENCH_MIN     seconds kept for the benchmark when the tests' time limit is set (default 240)
#   SKIP_INSTALL=1, SKIP_TESTS=1   skip those steps (e.g. a second call on a warm machine; the install
#                 step also reuses a fusednorm/_C*.so newer than csrc/ and setup.py by itself)
#   PYTHON        the interpreter (default python3: on the device image, the one that holds torch)
#
# Peers: the device machine has no network. A peer's wheel travels in .whl/ (ignored by git; see
# benchmarks/fetch_peer_wheels.sh) with `carry: [".whl"]`; this script installs every .whl/*.whl it finds
# into /tmp/site. A peer that is still missing is reported as missing by the runner, not skipped.
#
# At most 8 files come back from $OUT, so the script leaves exactly these there: gpu_run.log (every step's
# output), results.csv, results.json, table.md, gbps_{bf16,fp16,fp32}.png, and logs.tar.gz (per-step logs,
# pytest's junit XML, environment report).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out/gpu_run}
PYTHON=${PYTHON:-python3}
TOTAL_BUDGET=${TOTAL_BUDGET:-560}
STEPS=$(mktemp -d /tmp/gpu_run_steps.XXXXXX)
mkdir -p "$OUT"
LOG=$OUT/gpu_run.log
: >"$LOG"
START=$(date +%s)
SUMMARY=()
export PYTHONUNBUFFERED=1 ROOT PYTHON

elapsed() { echo $(( $(date +%s) - START )); }

# run_limited LIMIT_S LOGFILE COMMAND...: run COMMAND in a session of its own; past LIMIT_S end every
# process of that session (by session id: a build's compilers run in process groups of their own, which
# `timeout` would leave running) and return 124.
run_limited() {
  local limit=$1 logfile=$2
  shift 2
  setsid "$@" >"$logfile" 2>&1 &
  local sid=$! waited=0
  while kill -0 "$sid" 2>/dev/null; do
    if [ "$waited" -ge "$limit" ]; then
      end_session "$sid" TERM
      sleep 5
      end_session "$sid" KILL
      wait "$sid" 2>/dev/null
      return 124
    fi
    sleep 1
    waited=$((waited + 1))
  done
  wait "$sid"
}

end_session() {
  local sid=$1 sig=$2 pid
  for pid in $(ps -eo pid=,sid= | awk -v s="$sid" '$2 == s {print $1}'); do kill -"$sig" "$pid" 2>/dev/null; done
}

# step NAME TIMEOUT_S COMMAND...: run it with a time limit, log everything, never abort.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "=== [$(elapsed) s] step $name (limit ${limit} s): $*" | tee -a "$LOG"
  if declare -F "$1" >/dev/null; then
    # A shell function: hand it to a child bash together with its definition.
    run_limited "$limit" "$STEPS/$name.log" bash -c "$(declare -f "$1"); $*"
  else
    run_limited "$limit" "$STEPS/$name.log" "$@"
  fi
  rc=$?
  cat "$STEPS/$name.log" >>"$LOG"
  local status="ok"
  [ "$rc" -eq 124 ] && status="TIMED OUT"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status="FAILED"
  [ "$rc" -eq 5 ] && [ "$name" = tests ] && status="NO TESTS COLLECTED (no gpu-marked test)"
  echo "=== [$(elapsed) s] step $name: rc=$rc $status ($(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
  SUMMARY+=("$name: rc=$rc $status ($(( $(date +%s) - t0 )) s)")
  return 0
}

# 0. What machine is this.
env_report() {
  nvidia-smi || true
  "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "L2", getattr(p, "L2_cache_size", "?"), "memory", p.total_memory)
else:
    print("NO CUDA DEVICE VISIBLE")
EOF
  command -v nvcc && nvcc --version || echo "nvcc not on PATH"
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || echo "no git metadata"
}
step env 60 env_report

# 1. Peer wheels carried in .whl/ (no network on the device).
install_wheels() {
  ls "$ROOT"/.whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl carried: peers not preinstalled stay missing"; return 0; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$ROOT"/.whl/*.whl
}
step wheels 120 install_wheels
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi

# 2. Install fusednorm, building the CUDA extension (setup.py: FUSEDNORM_BUILD_CUDA=1 builds or fails saying why).
install_fusednorm() {
  if [ -z "${CUDA_HOME:-}" ]; then
    # The toolkit root, with include/cuda_runtime.h (an nvcc on PATH may be a wrapper script elsewhere).
    for cand in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")" \
                /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12; do
      if [ -f "$cand/include/cuda_runtime.h" ] && [ -x "$cand/bin/nvcc" ]; then export CUDA_HOME=$cand; break; fi
    done
  fi
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  # A warm machine keeps ignored build outputs: reuse an extension that is newer than every csrc/ file.
  local so
  so=$(ls -t "$ROOT"/fusednorm/_C*.so 2>/dev/null | head -n 1)
  if [ -n "$so" ] && [ -z "$(find "$ROOT/csrc" "$ROOT/setup.py" -newer "$so" 2>/dev/null | head -n 1)" ] &&
     "$PYTHON" -c "import fusednorm._C" 2>/dev/null; then
    echo "reusing $so (newer than csrc/ and setup.py): no rebuild"
    "$PYTHON" -c "import fusednorm; print('backends available on cuda:', fusednorm.available_backends('cuda'))"
    return 0
  fi
  local arch
  arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
  FUSEDNORM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e "$ROOT" &&
    "$PYTHON" -c "import fusednorm; print('backends available on cuda:', fusednorm.available_backends('cuda'))"
}
if [ "${SKIP_INSTALL:-0}" = "1" ]; then
  SUMMARY+=("install: skipped (SKIP_INSTALL=1)")
else
  step install 300 install_fusednorm
fi

# 3. The GPU tests.
if [ "${SKIP_TESTS:-0}" = "1" ]; then
  SUMMARY+=("tests: skipped (SKIP_TESTS=1)")
else
  # Leave the benchmark at least BENCH_MIN seconds; the tests get up to 240 s of what remains.
  tests_limit=$(( TOTAL_BUDGET - $(elapsed) - ${BENCH_MIN:-240} - 20 ))
  [ "$tests_limit" -gt 240 ] && tests_limit=240
  [ "$tests_limit" -lt 60 ] && tests_limit=60
  step tests "$tests_limit" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$STEPS/junit_gpu.xml" "$ROOT/tests"
fi

# 4. The benchmarks, in what time is left (configurations not started in time are reported as skipped).
left=$(( TOTAL_BUDGET - $(elapsed) - 20 ))
if [ "$left" -lt 30 ]; then
  SUMMARY+=("bench: not run: only ${left} s left of TOTAL_BUDGET=${TOTAL_BUDGET}")
else
  step bench "$left" "$PYTHON" -m benchmarks.run --out "$OUT" --time-budget $(( left - 45 )) "$@"
fi

# 5. Pack the per-step logs; the summary goes last so that it is at the end of the reply.
tar -czf "$OUT/logs.tar.gz" -C "$STEPS" . 2>/dev/null
{
  echo
  echo "=== gpu_run.sh summary ($(elapsed) s, OUT=$OUT)"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  if [ -f "$STEPS/tests.log" ]; then echo "--- tests (tail)"; tail -n 5 "$STEPS/tests.log"; fi
  if [ -f "$STEPS/bench.log" ]; then
    echo "--- benchmark summary table"
    sed -n '/^=\{100\}$/,$p' "$STEPS/bench.log"
  fi
} | tee -a "$LOG"
rm -rf "$STEPS"
exit 0
