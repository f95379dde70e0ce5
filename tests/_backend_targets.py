"""The backends as this machine runs them, for tests that call the public API on each: torch (the backend itself,
through its autograd Function: the CPU path switched off); cpu-path (backend "torch" on the CPU as users get it:
``fusednorm.cpu_path``, ATen's ops, for the calls it takes); triton
(interpreted on CPU tensors without a GPU, on the GPU with one); the CUDA kernels emulated on the CPU
(tests/_cuda_emulation.py, skipped where it is absent); the compiled cuda backend (GPU only).

``TARGETS`` parametrizes a fixture: ``target_fixture`` returns (backend name, device) after the set-up.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fusednorm
from fusednorm import _plan, cpu_path

try:
    import _cuda_emulation  # tests/ is on sys.path (pytest's rootdir import)
except ImportError:
    _cuda_emulation = None

HAS_CUDA = torch.cuda.is_available()


def _why_no_real_cuda() -> str | None:
    if not HAS_CUDA:
        return "needs a CUDA GPU"
    if "cuda" in fusednorm.available_backends("cuda"):
        return None
    from fusednorm.backends import cuda_impl

    return cuda_impl.why_unavailable()


def _emulate(monkeypatch) -> None:
    if _cuda_emulation is None:
        pytest.skip("tests/_cuda_emulation.py is absent")
    _cuda_emulation.install_as_cuda(monkeypatch)


def function_path(monkeypatch) -> None:
    """Backend "torch" through its autograd Function (the backend itself), not the CPU path, for one test."""
    monkeypatch.setattr(cpu_path, "_enabled", False)
    monkeypatch.setattr(_plan, "_PLANS", {})  # plans cached with the CPU path on; restored after the test


_NO_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
# (backend name, device, set-up)
TARGETS = [
    pytest.param(("torch", "cpu", function_path), id="torch"),
    pytest.param(("torch", "cpu", None), id="cpu-path"),
    pytest.param(("triton", "cuda", None), id="triton-gpu", marks=[pytest.mark.gpu, _NO_TRITON]) if HAS_CUDA
    else pytest.param(("triton", "cpu", None), id="triton-interpreted", marks=[_NO_TRITON]),
    pytest.param(("cuda", "cpu", _emulate), id="cuda-emulated"),
    pytest.param(("cuda", "cuda", None), id="cuda-gpu",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(_why_no_real_cuda() is not None,
                                                            reason=str(_why_no_real_cuda()))]),
]


def target_fixture(request, monkeypatch) -> tuple[str, str]:
    """The body of a fixture parametrized with ``TARGETS``: runs the set-up, returns (backend, device)."""
    backend, device, setup = request.param
    if setup is not None:
        setup(monkeypatch)
    return backend, device
