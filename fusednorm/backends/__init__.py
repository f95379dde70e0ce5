"""Backend choice, in one place.

Backends: "torch" (plain torch, the CPU path and the reference), "triton" (the kernel family in
``fusednorm/triton``; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cuda" (the compiled
extension built from ``csrc/``). "auto" picks the fastest available for the tensor's device:
triton on CUDA (then cuda, then torch), torch on the CPU.

Each backend module (``<name>_impl.py`` here) provides ``forward`` and ``backward`` with the contract
of ``backends/contract.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS
_global_backend = "auto"


class BackendUnavailableError(ValueError):
    """The requested backend exists but cannot run here (not built, no GPU, no triton)."""


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_unavailable(name: str, device: torch.device | None) -> str | None:
    """None if ``name`` can run on tensors of ``device`` here, else the reason, in words."""
    if name == "torch":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton backend unavailable: the triton package is not installed (pip install triton)"
        if device is not None and device.type != "cuda" and not _triton_interpreted():
            return (f"triton backend needs CUDA tensors (got {device.type} tensors); "
                    "set TRITON_INTERPRET=1 before importing triton to run its kernels on the CPU")
        if device is None and not torch.cuda.is_available() and not _triton_interpreted():
            return "triton backend needs a CUDA GPU or TRITON_INTERPRET=1"
        if (device is None or device.type != "cuda") and _triton_interpreted() and _triton_compiled_for_gpu():
            return ("triton backend unavailable on the CPU: TRITON_INTERPRET=1 was set after triton had been "
                    "imported (triton's own library functions were then built for the GPU, and interpreted kernels "
                    "cannot call them). Set TRITON_INTERPRET=1 before anything imports triton (torch.compile and "
                    "torch._dynamo do): in the environment of the process, or first thing in the script")
        return None
    if name == "cuda":
        from . import cuda_impl

        reason = cuda_impl.why_unavailable()
        if reason is not None:
            return reason
        if device is not None and device.type != "cuda":
            return f"cuda backend needs CUDA tensors (got {device.type} tensors)"
        return None
    raise AssertionError(name)


def _triton_compiled_for_gpu() -> bool:
    """triton was imported without the interpreter: its library functions (tl.sum, ...) are GPU JITFunctions."""
    standard = sys.modules.get("triton.language.standard")
    return standard is not None and type(standard.sum).__name__ != "InterpretedFunction"


# Under torch.compile the answer is a constant of the graph: Dynamo calls this at trace time instead of
# tracing it (the cuda backend's first check imports its extension, which Dynamo refuses to trace).
# This is exactly what torch.compiler.assume_constant_result does, without importing torch._dynamo
# at `import fusednorm`: Dynamo imports triton, and triton must be imported after TRITON_INTERPRET is
# set (fusednorm.check and the tests set it when there is no GPU).
_why_unavailable._dynamo_marked_constant = True


def _check_name(name: object, argument: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str, one of {_CHOICES}, got {type(name).__name__}")
    if name not in _CHOICES:
        raise ValueError(f"{argument} must be one of {_CHOICES}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the backend used when a call passes ``backend=None``: "auto", "torch", "triton" or "cuda".

    Raises ValueError for an unknown name, BackendUnavailableError (a ValueError) for a backend that
    cannot run on this machine at all.
    """
    _check_name(name, "backend")
    if name != "auto":
        reason = _why_unavailable(name, None)
        if reason is not None:
            raise BackendUnavailableError(reason)
    global _global_backend
    _global_backend = name


def get_backend() -> str:
    """The global backend name set by ``set_backend`` ("auto" by default)."""
    return _global_backend


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on tensors of ``device`` (any device if None) on this machine."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        return []  # no CUDA tensors can exist here, so nothing runs on them
    return [name for name in BACKENDS if _why_unavailable(name, device) is None]


def resolve(backend: str | None, device: torch.device) -> str:
    """The concrete backend for a call on tensors of ``device``; raises if it cannot run there."""
    name = _global_backend if backend is None else _check_name(backend, "backend")
    if name == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)
        return next(n for n in order if _why_unavailable(n, device) is None)
    reason = _why_unavailable(name, device)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return name


_IMPLEMENTATIONS: dict[str, ModuleType] = {}


def implementation(name: str) -> ModuleType:
    """The module with ``forward``/``backward`` for a resolved backend name (imported at its first use)."""
    module = _IMPLEMENTATIONS.get(name)
    if module is None:
        module = _IMPLEMENTATIONS[name] = importlib.import_module(f".{name}_impl", __name__)
    return module
