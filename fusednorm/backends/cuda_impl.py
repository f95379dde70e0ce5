"""The "cuda" backend: the compiled extension ``fusednorm._C`` built from ``csrc/``.

Not built yet: the CUDA kernel family is a later issue. ``why_unavailable`` says so, so that asking
for backend="cuda" raises a clear error instead of failing somewhere below.
"""

from __future__ import annotations

import importlib.util


def why_unavailable() -> str | None:
    if importlib.util.find_spec("fusednorm._C") is None:
        return ("cuda backend not built: install with FUSEDNORM_BUILD_CUDA=1 "
                "(needs a CUDA build of torch and nvcc)")
    return None
