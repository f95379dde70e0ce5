#!/usr/bin/env bash
# Download the wheels of the benchmark's peers into .whl/ (git-ignored via .git/info/exclude), so that they
# can travel to a GPU machine without network: name ".whl" in the device tool's `carry`, and
# benchmarks/gpu_run.sh installs every .whl/*.whl it finds into /tmp/site.
#
#   bash benchmarks/fetch_peer_wheels.sh            # liger-kernel (pure Python + Triton: one small wheel)
#
# Not fetched, and why (the runner reports them as missing):
# - flash-attn: PyPI has only its source distribution; building it needs the GPU machine and a long compile.
# - apex: the PyPI project named "apex" is an unrelated package; NVIDIA's apex is built from source.
set -eu
cd "$(dirname "$0")/.."
LIGER_VERSION=${LIGER_VERSION:-0.8.5}
PY_VERSION=${PY_VERSION:-3.12}   # the device image's python3 (see the device notes)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  -d .whl "liger-kernel==$LIGER_VERSION"
# Its requirements (torch, triton) are already on the device image.
ls -la .whl
