"""The CUDA kernels of csrc/ on the CPU, as a backend: ``emulated_backend()`` and ``install_as_cuda``.

csrc/emulation/emulate.cpp compiles the kernel templates as host C++ (each CUDA thread a std::thread,
barriers and warp shuffles emulated) together with the host code the GPU path runs (csrc/host.h: the
parameter structs filled from tensor descriptions, the flag word and the scalars; the backward's
partial rows and fixed-order column sums). This module builds it with g++ (cached by the sources'
hash), describes tensors to it through ctypes (one small struct, host.h's TensorView) and implements
the backend contract of fusednorm/backends/contract.py over it, inside the Python host steps of the real
backend (``cuda_impl.run_forward`` / ``run_backward``: parameter dtypes the kernels do not read). Results
are allocated here with the contract's own ``allocate_forward`` / ``allocate_backward``; everything else is
C++.

Needs g++ (C++20) and the CUDA headers (cuda_fp16.h, cuda_bf16.h); without them the callers skip.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

from fusednorm import backends
from fusednorm.backends import cuda_impl
from fusednorm.backends.contract import (
    BackwardArgs,
    ForwardArgs,
    ForwardResult,
    Gradients,
    allocate_backward,
    allocate_forward,
    zero_parameter_gradients,
)
from fusednorm.variant import Variant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = ("emulation/emulate.cpp", "fusednorm.h", "host.h", "philox.h", "device_utils.cuh", "fwd_kernel.cuh",
           "bwd_kernel.cuh", "row_stats.cuh")
# The emulated device: 2 SMs, 2 resident blocks each (small grids, several blocks and partial rows).
NUM_SMS, BLOCKS_PER_SM = 2, 2
# csrc/fusednorm.h: DType.
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3, torch.int64: 4}
# csrc/host.h: variant_facts, in this order.
VARIANT_FACTS = ("is_rms", "has_residual", "scale_kind", "has_dropout", "prenorm", "residual_f32", "h_f32",
                 "has_weight", "has_bias", "learned_scale", "store_h", "dresidual_is_dx", "store_dresidual",
                 "residual_dtype", "h_dtype", "store_stats")


class TensorView(ctypes.Structure):
    """csrc/host.h: TensorView (absent when data is NULL)."""

    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("row_stride", ctypes.c_int64)]


def describe(t: torch.Tensor | None) -> TensorView:
    """The TensorView of a CPU tensor; a tensor without elements (a result that does not apply) is absent."""
    if t is None or t.numel() == 0:
        return TensorView()
    return TensorView(t.data_ptr(), DTYPE_CODES[t.dtype], t.shape[0] if t.dim() == 2 else 1,
                      t.shape[-1] if t.dim() >= 1 else 1, t.stride(0) if t.dim() == 2 else 0)


def _views(tensors) -> ctypes.Array:
    return (TensorView * len(tensors))(*(describe(t) for t in tensors))


def _cuda_include() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/cuda-13.0"):
        if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []):
        path = os.path.join(base, "cu13", "include")
        if os.path.isfile(os.path.join(path, "cuda_fp16.h")):
            return path
    return None


@functools.cache
def _library() -> ctypes.CDLL:
    """The emulation library, built once per source version (pytest.skip without g++ or CUDA headers)."""
    include = _cuda_include()
    if include is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h)")
    digest = hashlib.sha256(b"".join(open(os.path.join(CSRC, s), "rb").read() for s in SOURCES)).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"fusednorm_emulate_{digest}.so")
    if not os.path.exists(path):
        partial = path + f".{os.getpid()}"
        subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", f"-I{include}", "-o", partial,
                        os.path.join(CSRC, "emulation", "emulate.cpp")], check=True)
        os.replace(partial, path)
    lib = ctypes.CDLL(path)
    views, i64, f64, c_int = ctypes.POINTER(TensorView), ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.fusednorm_emu_forward.argtypes = [i64, views, f64, f64, f64, f64, c_int, c_int]
    lib.fusednorm_emu_backward.argtypes = [i64, views, f64, f64, f64, c_int, c_int]
    lib.fusednorm_emu_variant_facts.argtypes = [i64, c_int, ctypes.POINTER(i64)]
    lib.fusednorm_emu_keep_threshold.argtypes = [f64]
    lib.fusednorm_emu_keep_threshold.restype = i64
    return lib


def _check(status: int, variant: int) -> None:
    if status != 0:
        raise ValueError(f"the emulated cuda backend rejected variant flag word {variant:#x}")


class EmulatedBackend:
    """The backend contract (``forward`` / ``backward``) over the emulated kernels, on CPU tensors; plus
    the C++ host facts (``variant_facts``, ``keep_threshold``) for the tests that compare them."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def forward(self, variant: Variant, args: ForwardArgs) -> ForwardResult:
        return cuda_impl.run_forward(self._forward_kernels, variant, args)

    def backward(self, variant: Variant, args: BackwardArgs) -> Gradients:
        return cuda_impl.run_backward(self._backward_kernels, variant, args)

    def _forward_kernels(self, variant: Variant, args: ForwardArgs) -> ForwardResult:
        out = allocate_forward(variant, args.x)
        if args.x.numel() == 0:
            return out
        a = args
        tensors = _views((a.x, a.residual, a.weight, a.bias, a.residual_scale, a.seed, *out))
        _check(self.lib.fusednorm_emu_forward(variant.flags, tensors, a.eps, a.scale_value, a.dropout_p,
                                              a.weight_offset, NUM_SMS, BLOCKS_PER_SM), variant.flags)
        return out

    def _backward_kernels(self, variant: Variant, args: BackwardArgs) -> Gradients:
        grads = allocate_backward(variant, args.dy, args.weight, args.residual_scale, args.bias_dtype)
        if args.dy.numel() == 0:
            return zero_parameter_gradients(grads)
        a = args
        tensors = _views((a.dy, a.dh_in, a.x, a.residual, a.h, a.weight, a.residual_scale, a.mean, a.rstd, a.seed,
                          *grads))
        _check(self.lib.fusednorm_emu_backward(variant.flags, tensors, a.scale_value, a.dropout_p, a.weight_offset,
                                               NUM_SMS, BLOCKS_PER_SM), variant.flags)
        return grads

    def variant_facts(self, flags: int, x_dtype: torch.dtype) -> dict[str, int]:
        """csrc/host.h's variant_facts of a flag word, by name (dtypes as DTYPE_CODES, -1 for none)."""
        out = (ctypes.c_int64 * len(VARIANT_FACTS))()
        _check(self.lib.fusednorm_emu_variant_facts(flags, DTYPE_CODES[x_dtype], out), flags)
        return dict(zip(VARIANT_FACTS, out, strict=True))

    def keep_threshold(self, dropout_p: float) -> int:
        return self.lib.fusednorm_emu_keep_threshold(dropout_p)


def emulated_backend() -> EmulatedBackend:
    """The emulated cuda backend (builds the library on first use; pytest.skip without g++/CUDA headers)."""
    return EmulatedBackend(_library())


def install_as_cuda(monkeypatch) -> EmulatedBackend:
    """Make backend="cuda" run the emulated kernels on CPU tensors for the rest of the test."""
    from fusednorm import _plan

    emulated = emulated_backend()
    real_implementation, real_why = backends.implementation, backends._why_unavailable
    # Call plans hold the backend module they run (Plan.impl): none cached before or during the test may outlive it.
    monkeypatch.setattr(_plan, "_PLANS", {})
    monkeypatch.setattr(backends, "implementation",
                        lambda name: emulated if name == "cuda" else real_implementation(name))
    monkeypatch.setattr(backends, "_why_unavailable",
                        lambda name, device: None if name == "cuda" else real_why(name, device))
    return emulated
