"""The CUDA kernels of csrc/ run on the CPU: their templates compiled as host C++ by
csrc/emulation/emulate.cpp (threads as std::threads, shared memory, barriers and warp shuffles
emulated) and checked through the public API against the float64 oracle (DESIGN section 6,
fusednorm.testing.check_case), plus bit-identical gradients.

This is how CI without a GPU checks the kernels' logic: indexing, the 128-bit and scalar-tail paths,
chunked wide rows, the row reductions, the backward's column partials and their fixed-order sum,
dropout regenerated in the backward, store_h statistics. It does not check what only the device
compiler and hardware decide (register allocation, FMA contraction, the occupancy-derived grid);
tests/test_cuda_gpu.py does, on a GPU.

The host side (flags, allocation, alignment test, column sums) is a Python mirror of csrc/ops.cpp.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
import types

import pytest
import torch

import fusednorm
from fusednorm import backends
from fusednorm.backends.common import compute_dtype, dresidual_is_dx
from fusednorm.dropout import keep_threshold
from fusednorm.testing import RESIDUAL_KINDS, Case, check_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = ["emulation/emulate.cpp", "fusednorm.h", "philox.h", "device_utils.cuh", "fwd_kernel.cuh", "bwd_kernel.cuh"]
# The emulated device: 2 SMs, 2 resident blocks each (small grids, several blocks and partial rows).
NUM_SMS, BLOCKS_PER_SM = 2, 2


def _cuda_include() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/cuda-13.0"):
        if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []):
        path = os.path.join(base, "cu13", "include")
        if os.path.isfile(os.path.join(path, "cuda_fp16.h")):
            return path
    return None


def _build() -> ctypes.CDLL:
    include = _cuda_include()
    if include is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h)")
    digest = hashlib.sha256(b"".join(open(os.path.join(CSRC, s), "rb").read() for s in SOURCES)).hexdigest()[:16]
    library = os.path.join(tempfile.gettempdir(), f"fusednorm_emulate_{digest}.so")
    if not os.path.exists(library):
        partial = library + f".{os.getpid()}"
        subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", f"-I{include}", "-o", partial,
                        os.path.join(CSRC, "emulation", "emulate.cpp")], check=True)
        os.replace(partial, library)
    return ctypes.CDLL(library)


class LaunchConfig(ctypes.Structure):
    _fields_ = [("threads_per_row", ctypes.c_int), ("rows_per_block", ctypes.c_int),
                ("groups_per_thread", ctypes.c_int), ("chunk_cols", ctypes.c_int64), ("row_fits", ctypes.c_bool),
                ("grid", ctypes.c_int64), ("smem_bytes", ctypes.c_int64)]


_P, _I64, _F64, _B = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_bool


class FwdParams(ctypes.Structure):  # csrc/fusednorm.h, field for field
    _fields_ = ([(n, _P) for n in ("x", "residual", "weight", "bias", "residual_scale", "seed", "y", "h", "mean",
                                   "rstd")]
                + [(n, _I64) for n in ("rows", "cols", "x_row_stride", "residual_row_stride")]
                + [(n, _F64) for n in ("eps", "scale_value", "dropout_scale")] + [("keep_threshold", ctypes.c_uint32)]
                + [(n, _B) for n in ("is_rms", "has_residual", "has_dropout", "store_h", "has_weight", "has_bias")]
                + [("scale_kind", ctypes.c_int)]
                + [(n, _B) for n in ("residual_f32", "h_f32", "weight_f32", "bias_f32", "scale_f32", "vectorized")]
                + [("launch", LaunchConfig), ("num_sms", ctypes.c_int)])


class BwdParams(ctypes.Structure):
    _fields_ = ([(n, _P) for n in ("dy", "dh_in", "x", "residual", "h", "weight", "residual_scale", "mean", "rstd",
                                   "seed", "dx", "dresidual", "dweight_partial", "dbias_partial", "dscale_partial")]
                + [(n, _I64) for n in ("rows", "cols", "dy_row_stride", "dh_in_row_stride", "x_row_stride",
                                       "residual_row_stride", "h_row_stride")]
                + [(n, _F64) for n in ("scale_value", "dropout_scale")] + [("keep_threshold", ctypes.c_uint32)]
                + [(n, _B) for n in ("is_rms", "has_residual", "has_dropout", "read_h", "has_weight", "has_bias",
                                     "has_dh_in", "store_dresidual")]
                + [("scale_kind", ctypes.c_int)]
                + [(n, _B) for n in ("residual_f32", "h_f32", "dh_in_f32", "weight_f32", "scale_f32", "vectorized")]
                + [("launch", LaunchConfig), ("num_sms", ctypes.c_int)])


CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
NONE, CONSTANT, SCALAR, VECTOR = 0, 1, 2, 3


def _ptr(t):
    return t.data_ptr() if t is not None else None


def _aligned(t, row_stride: int, group: int) -> bool:
    return t is None or (t.data_ptr() % (t.element_size() * group) == 0 and row_stride % group == 0)


def _scale_kind(has_residual, residual_scale, scale_value):
    if not has_residual:
        return NONE
    if residual_scale is not None:
        return SCALAR if residual_scale.dim() == 0 else VECTOR
    return CONSTANT if scale_value != 1.0 else NONE


def _f32(t):
    return t is not None and t.dtype == torch.float32


class Emulated:
    """A backend module (forward/backward with the contract's signatures) over the emulated kernels."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        c_int = ctypes.c_int
        lib.fusednorm_emu_fwd.argtypes = [c_int, ctypes.POINTER(FwdParams), c_int, c_int]
        lib.fusednorm_emu_bwd_configure.argtypes = [c_int, ctypes.POINTER(BwdParams), c_int, c_int, c_int]
        lib.fusednorm_emu_bwd_configure.restype = c_int
        lib.fusednorm_emu_bwd.argtypes = [c_int, ctypes.POINTER(BwdParams)]
        lib.fusednorm_emu_column_sum.argtypes = [c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                                 ctypes.c_void_p]
        lib.fusednorm_emu_sizeof_fwd_params.restype = ctypes.c_size_t
        lib.fusednorm_emu_sizeof_bwd_params.restype = ctypes.c_size_t
        assert lib.fusednorm_emu_sizeof_fwd_params() == ctypes.sizeof(FwdParams)
        assert lib.fusednorm_emu_sizeof_bwd_params() == ctypes.sizeof(BwdParams)

    def forward(self, x, residual, weight, bias, residual_scale, scale_value, eps, dropout_p, seed, is_rms, store_h,
                h_dtype):
        rows, cols = x.shape
        cd = compute_dtype(x.dtype)
        y = torch.empty(rows, cols, dtype=x.dtype)
        h = torch.empty((rows, cols) if store_h else (0,), dtype=h_dtype)
        mean = torch.empty(0 if is_rms else rows, dtype=cd)
        rstd = torch.empty(rows, dtype=cd)
        if rows == 0:
            return y, h, mean, rstd
        group = 16 // x.element_size()
        p = FwdParams(x=_ptr(x), residual=_ptr(residual), weight=_ptr(weight), bias=_ptr(bias),
                      residual_scale=_ptr(residual_scale), seed=_ptr(seed) if dropout_p > 0 else None, y=_ptr(y),
                      h=_ptr(h) if store_h else None, mean=None if is_rms else _ptr(mean), rstd=_ptr(rstd),
                      rows=rows, cols=cols, x_row_stride=x.stride(0),
                      residual_row_stride=residual.stride(0) if residual is not None else 0, eps=eps,
                      scale_value=scale_value, dropout_scale=1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0,
                      keep_threshold=keep_threshold(dropout_p) if dropout_p > 0 else 0, is_rms=is_rms,
                      has_residual=residual is not None, has_dropout=dropout_p > 0, store_h=store_h,
                      has_weight=weight is not None, has_bias=bias is not None,
                      scale_kind=_scale_kind(residual is not None, residual_scale, scale_value),
                      residual_f32=_f32(residual), h_f32=h_dtype == torch.float32, weight_f32=_f32(weight),
                      bias_f32=_f32(bias), scale_f32=_f32(residual_scale))
        p.vectorized = (_aligned(x, x.stride(0), group)
                        and _aligned(residual, residual.stride(0) if residual is not None else 0, group)
                        and _aligned(weight, 0, group) and _aligned(bias, 0, group)
                        and (p.scale_kind != VECTOR or _aligned(residual_scale, 0, group))
                        and _aligned(y, cols, group) and (not store_h or _aligned(h, cols, group)))
        self.lib.fusednorm_emu_fwd(CODE[x.dtype], ctypes.byref(p), NUM_SMS, BLOCKS_PER_SM)
        return y, h, mean, rstd

    def _column_sums(self, partial, out):
        cd = partial.dtype
        sums = torch.empty(partial.shape[1], dtype=cd)
        self.lib.fusednorm_emu_column_sum(int(cd == torch.float64), _ptr(partial), partial.shape[0], partial.shape[1],
                                          _ptr(sums))
        if out.dim() == 0:
            total = torch.empty(1, dtype=cd)
            self.lib.fusednorm_emu_column_sum(int(cd == torch.float64), _ptr(sums), sums.shape[0], 1, _ptr(total))
            sums = total.reshape(())
        out.copy_(sums)

    def backward(self, dy, dh_in, x, residual, h, weight, bias_dtype, residual_scale, scale_value, mean, rstd,
                 dropout_p, seed, is_rms, x_dtype, residual_dtype):
        rows, cols = dy.shape
        cd = compute_dtype(x_dtype)
        store_dresidual = residual_dtype is not None and not dresidual_is_dx(residual_scale, scale_value, dropout_p,
                                                                             x_dtype, residual_dtype)
        dx = torch.empty(rows, cols, dtype=x_dtype)
        dresidual = torch.empty(rows, cols, dtype=residual_dtype) if store_dresidual else dy.new_empty((0,))
        dweight = torch.zeros(cols, dtype=weight.dtype) if weight is not None else dy.new_empty((0,))
        dbias = torch.zeros(cols, dtype=bias_dtype) if bias_dtype is not None else dy.new_empty((0,))
        dscale = torch.zeros_like(residual_scale) if residual_scale is not None else dy.new_empty((0,))
        if rows == 0:
            return dx, dresidual, dweight, dbias, dscale
        has_residual = residual_dtype is not None
        kind = _scale_kind(has_residual, residual_scale, scale_value)
        learned = kind in (SCALAR, VECTOR)
        group = 16 // dy.element_size()
        p = BwdParams(dy=_ptr(dy), dh_in=_ptr(dh_in), x=_ptr(x), residual=_ptr(residual), h=_ptr(h),
                      weight=_ptr(weight), residual_scale=_ptr(residual_scale), mean=None if is_rms else _ptr(mean),
                      rstd=_ptr(rstd), seed=_ptr(seed) if dropout_p > 0 else None, dx=_ptr(dx),
                      dresidual=_ptr(dresidual) if store_dresidual else None, rows=rows, cols=cols,
                      dy_row_stride=dy.stride(0), dh_in_row_stride=dh_in.stride(0) if dh_in is not None else 0,
                      x_row_stride=x.stride(0) if x is not None else 0,
                      residual_row_stride=residual.stride(0) if residual is not None else 0,
                      h_row_stride=h.stride(0) if h is not None else 0, scale_value=scale_value,
                      dropout_scale=1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0,
                      keep_threshold=keep_threshold(dropout_p) if dropout_p > 0 else 0, is_rms=is_rms,
                      has_residual=has_residual, has_dropout=dropout_p > 0, read_h=h is not None,
                      has_weight=weight is not None, has_bias=bias_dtype is not None, has_dh_in=dh_in is not None,
                      store_dresidual=store_dresidual, scale_kind=kind,
                      residual_f32=residual_dtype == torch.float32, h_f32=_f32(h), dh_in_f32=_f32(dh_in),
                      weight_f32=_f32(weight), scale_f32=_f32(residual_scale))
        p.vectorized = (_aligned(dy, dy.stride(0), group) and _aligned(x, p.x_row_stride, group)
                        and _aligned(h, p.h_row_stride, group) and _aligned(dh_in, p.dh_in_row_stride, group)
                        and _aligned(residual, p.residual_row_stride, group) and _aligned(weight, 0, group)
                        and (kind != VECTOR or _aligned(residual_scale, 0, group)) and _aligned(dx, cols, group)
                        and (not store_dresidual or _aligned(dresidual, cols, group)))
        slots = int(weight is not None) + int(bias_dtype is not None) + int(learned)
        partial_rows = self.lib.fusednorm_emu_bwd_configure(CODE[x_dtype], ctypes.byref(p), NUM_SMS, BLOCKS_PER_SM,
                                                            slots)
        # NaN-filled: a partial cell the kernel forgets to write poisons the gradient.
        partials = {name: torch.full((partial_rows, cols), float("nan"), dtype=cd)
                    for name, needed in (("dweight", weight is not None), ("dbias", bias_dtype is not None),
                                         ("dscale", learned)) if needed}
        p.dweight_partial = _ptr(partials.get("dweight"))
        p.dbias_partial = _ptr(partials.get("dbias"))
        p.dscale_partial = _ptr(partials.get("dscale"))
        self.lib.fusednorm_emu_bwd(CODE[x_dtype], ctypes.byref(p))
        for name, out in (("dweight", dweight), ("dbias", dbias), ("dscale", dscale)):
            if name in partials:
                self._column_sums(partials[name], out)
        return dx, dresidual, dweight, dbias, dscale


@pytest.fixture(scope="module")
def emulated():
    return Emulated(_build())


@pytest.fixture
def as_cuda_backend(emulated, monkeypatch):
    """backend="cuda" runs the emulated kernels on CPU tensors for the duration of a test."""
    real_implementation, real_why = backends.implementation, backends._why_unavailable
    module = types.SimpleNamespace(forward=emulated.forward, backward=emulated.backward)
    monkeypatch.setattr(backends, "implementation",
                        lambda name: module if name == "cuda" else real_implementation(name))
    monkeypatch.setattr(backends, "_why_unavailable",
                        lambda name, device: None if name == "cuda" else real_why(name, device))
    return emulated


def _assert_section6(case: Case, seed: int) -> None:
    results = check_case(case, "cuda", device="cpu", seed=seed)
    failures = [f"{r.output}: err {r.error:.3g} > bound {r.bound:.3g} (torch {r.torch_error:.3g})"
                f"{'' if r.nonfinite_match else ' NaN/Inf mismatch'}" for r in results if not r.ok]
    assert not failures, failures


ADD_OPS = ("add_layer_norm", "add_rms_norm")
LAYOUTS = ((False, False), (True, False), (True, True))  # (prenorm, residual_in_fp32)


def _cases():
    # Every add op x residual kind x layout, in fp32 at an odd width (scalar path) and in bf16 with
    # fp32 params at a vectorized width spanning two warps.
    for op, kind, (prenorm, res32) in itertools.product(ADD_OPS, RESIDUAL_KINDS, LAYOUTS):
        yield Case(op, (5, 37), torch.float32, None, kind, prenorm, res32)
        yield Case(op, (5, 1024), torch.bfloat16, torch.float32, kind, prenorm, res32)
    # Plain norms, every dtype, with and without params, N = 1 and a two-warp width.
    for op, (dtype, pdt) in itertools.product(("layer_norm", "rms_norm"), ((torch.float16, None),
                                                                          (torch.bfloat16, torch.float32),
                                                                          (torch.float32, None),
                                                                          (torch.float64, None))):
        yield Case(op, (3, 1), dtype, pdt)
        yield Case(op, (9, 200), dtype, pdt, has_weight=False, has_bias=False)
    # Rows wider than the registers: chunked forward and backward (fp16: > 16384 / > 8192 columns,
    # fp32: > 8192), dropout regenerated in every pass.
    yield Case("layer_norm", (2, 16400), torch.float16)
    yield Case("rms_norm", (2, 9000), torch.float32)
    yield Case("add_layer_norm", (2, 9000), torch.bfloat16, None, "vector", True, False, dropout_p=0.25)
    # Dropout in registers, Post-LN and Pre-LN with a learned vector scale.
    for op in ADD_OPS:
        yield Case(op, (3, 37), torch.float32, None, "plain", False, False, dropout_p=0.25)
        yield Case(op, (3, 300), torch.bfloat16, None, "vector", True, False, dropout_p=0.25)
    # Many rows: several row groups per block, blocks looping over rows, several partial rows.
    yield Case("add_layer_norm", (300, 64), torch.float16, None, "scalar", False, False)
    yield Case("add_rms_norm", (700, 40), torch.float32, None, "vector", True, True)  # > 128 blocks of rows


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=[c.name() for c in CASES])
def test_emulated_cuda_kernels_match_float64_reference(case, as_cuda_backend):
    _assert_section6(case, seed=CASES.index(case))


def test_emulated_gradients_bit_identical_and_strided_input(as_cuda_backend):
    def run():
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(40, 130, generator=gen) + 2
        x = base[:, 1:129].clone().requires_grad_(True)  # contiguous rows of 128: the 128-bit path
        strided = base[:, 1:129]  # rows 130 apart, unaligned start: the scalar path
        residual = torch.randn(40, 128, generator=gen, requires_grad=True)
        weight = torch.randn(128, generator=gen, requires_grad=True)
        bias = torch.randn(128, generator=gen, requires_grad=True)
        scale = torch.rand((), generator=gen).requires_grad_(True)
        torch.manual_seed(5)
        y = fusednorm.add_layer_norm(x, residual, weight, bias, residual_scale=scale, dropout_p=0.1, backend="cuda")
        y.backward(torch.randn(40, 128, generator=gen))
        torch.manual_seed(5)
        y_strided = fusednorm.add_layer_norm(strided, residual.detach(), weight.detach(), bias.detach(),
                                             residual_scale=scale.detach(), dropout_p=0.1, backend="cuda")
        return [y.detach(), y_strided, x.grad, residual.grad, weight.grad, bias.grad, scale.grad]

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first[0], first[1]), "vectorized and scalar paths give the same bits"


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_emulated_nonfinite_value_at_a_dropped_position_poisons_its_row(op, as_cuda_backend):
    import test_reliability  # the same check as for the other backends (a module attribute: not collected)

    test_reliability.test_nonfinite_value_at_a_dropped_position_still_poisons_its_row("cuda", op, float("nan"))
