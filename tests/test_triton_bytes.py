"""Byte-count proof that the Triton kernels are one pass (DESIGN section 5), on the CPU.

The Triton interpreter performs every tl.load / tl.store through two builder methods; the test
wraps them and adds up the masked-in bytes, attributed to the kernel argument whose tensor holds
the address. For each variant, with 16-bit tensors, the bytes per element of the (M, N) tensors
must equal DESIGN section 5's row exactly (each listed tensor read or written once, nothing else
of size M x N touched); per-row statistics are M values; the (N,) parameters are read at most
once per program (on the GPU these re-reads hit L2, not DRAM); the backward's column partial sums
are one (num_programs, N) float32 row per program. A kernel that re-read x would fail.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import pytest
import torch

import fusednorm

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fusednorm.triton as triton_backend  # noqa: E402
from fusednorm.triton import heuristics  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts bytes in the Triton interpreter (CPU)")

interpreter = pytest.importorskip("triton.runtime.interpreter")
M, N = 6, 64


class Traffic:
    """Bytes read and written per kernel argument, for every launch of the wrapped kernels."""

    def __init__(self):
        self.launches: list[dict] = []  # one per launch: {"kernel", "args": {name: tensor}, "read", "written"}
        self._accesses: list[tuple[str, np.ndarray, int]] = []

    def _record(self, kind, ptrs, mask):
        addresses = np.broadcast_to(ptrs.data, np.shape(ptrs.data))
        keep = np.broadcast_to(mask.data, addresses.shape)
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        self._accesses.append((kind, addresses[keep].astype(np.uint64), size))

    @contextlib.contextmanager
    def counting(self, monkeypatch):
        builder = interpreter.InterpreterBuilder
        real_load, real_store = builder.create_masked_load, builder.create_masked_store

        def load(builder_self, ptrs, mask, *args):
            self._record("read", ptrs, mask)
            return real_load(builder_self, ptrs, mask, *args)

        def store(builder_self, ptrs, value, mask, *args):
            self._record("written", ptrs, mask)
            return real_store(builder_self, ptrs, value, mask, *args)

        monkeypatch.setattr(builder, "create_masked_load", load)
        monkeypatch.setattr(builder, "create_masked_store", store)
        for attr in ("_forward_kernel", "_backward_kernel"):
            monkeypatch.setattr(triton_backend, attr, self._wrap(getattr(triton_backend, attr)))
        yield self

    def _wrap(self, kernel):
        traffic = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    named = dict(zip(kernel.arg_names, args, strict=False))
                    traffic._accesses = []
                    kernel[grid](*args, **kwargs)
                    traffic.launches.append(traffic._attribute(kernel.fn.__name__, named, grid[0]))
                return launch

        return Launcher()

    def _attribute(self, kernel_name, named, programs):
        tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
        ranges = {k: (t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for k, t in tensors.items()}
        result = {"kernel": kernel_name, "args": tensors, "programs": programs,
                  "read": defaultdict(int), "written": defaultdict(int)}
        for kind, addresses, size in self._accesses:
            owner = np.full(addresses.shape, "", dtype=object)
            for name, (lo, hi) in ranges.items():
                owner[(addresses >= lo) & (addresses < hi)] = name
            assert (owner != "").all(), f"{kernel_name}: access outside every argument"
            for name in set(owner):
                result[kind][name] += int((owner == name).sum()) * size
        return result


ROW_TENSORS = {"X", "R", "Y", "H", "DY", "DH_IN", "DX", "DR"}
STATS = {"MEAN", "RSTD"}
PARAMS = {"W", "B", "S"}
PARTIALS = {"DW_PARTIAL", "DB_PARTIAL", "DS_PARTIAL"}

# DESIGN section 5 per variant (16-bit tensors): the (M, N) tensors read / written by each kernel.
VARIANTS = {
    "layer_norm": (dict(op="layer_norm"), ({"X"}, {"Y"}), ({"DY", "X"}, {"DX"}), 4, 6),
    "rms_norm": (dict(op="rms_norm"), ({"X"}, {"Y"}), ({"DY", "X"}, {"DX"}), 4, 6),
    "post_ln_no_scale": (dict(op="add_layer_norm"), ({"X", "R"}, {"Y", "H"}), ({"DY", "H"}, {"DX"}), 8, 6),
    "post_ln_learned_vector": (dict(op="add_layer_norm", scale="vector"), ({"X", "R"}, {"Y"}),
                               ({"DY", "X", "R"}, {"DX", "DR"}), 6, 10),
    "post_ln_learned_scalar_rms": (dict(op="add_rms_norm", scale="scalar"), ({"X", "R"}, {"Y"}),
                                   ({"DY", "X", "R"}, {"DX", "DR"}), 6, 10),
    "pre_ln": (dict(op="add_rms_norm", prenorm=True), ({"X", "R"}, {"Y", "H"}), ({"DY", "DH_IN", "H"}, {"DX"}), 8, 8),
    # A learned scale in the Pre-LN layout adds one read of the residual (for dscale).
    "pre_ln_learned_vector": (dict(op="add_layer_norm", prenorm=True, scale="vector"), ({"X", "R"}, {"Y", "H"}),
                              ({"DY", "DH_IN", "H", "R"}, {"DX", "DR"}), 8, 12),
    # Dropout reads and writes no mask; dresidual = dh now differs from dx = dh * mask / (1 - p),
    # so it is written (the only extra bytes: a second gradient that exists).
    "post_ln_dropout": (dict(op="add_layer_norm", dropout_p=0.25), ({"X", "R"}, {"Y", "H"}),
                        ({"DY", "H"}, {"DX", "DR"}), 8, 8),
    # A constant scale (DeepNorm): dresidual = dh * alpha, also a distinct gradient.
    "post_ln_constant_scale": (dict(op="add_layer_norm", scale=0.7), ({"X", "R"}, {"Y", "H"}),
                               ({"DY", "H"}, {"DX", "DR"}), 8, 8),
}


def _run(spec: dict, dtype=torch.float16):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(M, N, generator=gen) + 1).to(dtype).requires_grad_(True)
    residual = torch.randn(M, N, generator=gen).to(dtype).requires_grad_(True)
    weight = torch.randn(N, generator=gen).to(dtype).requires_grad_(True)
    bias = torch.randn(N, generator=gen).to(dtype).requires_grad_(True)
    scale = spec.get("scale")
    if scale == "vector":
        scale = torch.rand(N, generator=gen).to(dtype).requires_grad_(True)
    elif scale == "scalar":
        scale = torch.rand((), generator=gen).to(dtype).requires_grad_(True)
    op = spec["op"]
    if op == "layer_norm":
        out = fusednorm.layer_norm(x, weight, bias, backend="triton")
    elif op == "rms_norm":
        out = fusednorm.rms_norm(x, weight, backend="triton")
    else:
        fn = fusednorm.add_layer_norm if op == "add_layer_norm" else fusednorm.add_rms_norm
        args = (x, residual, weight, bias) if op == "add_layer_norm" else (x, residual, weight)
        out = fn(*args, residual_scale=scale, dropout_p=spec.get("dropout_p", 0.0),
                 prenorm=spec.get("prenorm", False), backend="triton")
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


def _per_element(launch) -> tuple[dict, dict]:
    """Bytes per element of the (M, N) tensors, read and written, by argument."""
    return ({k: v / (M * N) for k, v in launch["read"].items() if k in ROW_TENSORS},
            {k: v / (M * N) for k, v in launch["written"].items() if k in ROW_TENSORS})


def _check_side_traffic(launch) -> None:
    programs, args = launch["programs"], launch["args"]
    for name in STATS & set(args):
        for kind in ("read", "written"):
            assert launch[kind].get(name, 0) in (0, M * args[name].element_size()), (name, kind)
    for name in PARAMS & set(args):
        assert launch["written"].get(name, 0) == 0
        assert launch["read"].get(name, 0) <= programs * args[name].numel() * args[name].element_size(), name
    for name in PARTIALS & set(args):
        assert launch["read"].get(name, 0) == 0
        assert launch["written"][name] == programs * N * 4, name  # one float32 row per program


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bytes_per_element_equal_design_floor(variant, monkeypatch):
    spec, (fwd_reads, fwd_writes), (bwd_reads, bwd_writes), fwd_bytes, bwd_bytes = VARIANTS[variant]
    traffic = Traffic()
    with traffic.counting(monkeypatch):
        _run(spec)
    forward, backward = traffic.launches
    assert forward["kernel"] == "_forward_kernel" and backward["kernel"] == "_backward_kernel"
    for launch, reads, writes, total in ((forward, fwd_reads, fwd_writes, fwd_bytes),
                                         (backward, bwd_reads, bwd_writes, bwd_bytes)):
        read, written = _per_element(launch)
        # Each listed tensor exactly once, 2 bytes per element; nothing else of size (M, N).
        assert read == dict.fromkeys(reads, 2.0), (launch["kernel"], read)
        assert written == dict.fromkeys(writes, 2.0), (launch["kernel"], written)
        assert sum(read.values()) + sum(written.values()) == total
        _check_side_traffic(launch)


def test_float32_residual_stream_counts_four_bytes(monkeypatch):
    """Pre-LN with residual_in_fp32: the residual and h are float32, x, y, dy, dx 16-bit."""
    traffic = Traffic()
    with traffic.counting(monkeypatch):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(M, N, generator=gen).to(torch.bfloat16).requires_grad_(True)
        residual = torch.randn(M, N, generator=gen).requires_grad_(True)
        weight = torch.randn(N, generator=gen).requires_grad_(True)
        y, h = fusednorm.add_rms_norm(x, residual, weight, prenorm=True, residual_in_fp32=True, backend="triton")
        torch.autograd.backward((y, h), (torch.randn_like(y), torch.randn_like(h)))
    forward, backward = traffic.launches
    assert _per_element(forward) == ({"X": 2.0, "R": 4.0}, {"Y": 2.0, "H": 4.0})
    assert _per_element(backward) == ({"DY": 2.0, "DH_IN": 4.0, "H": 4.0}, {"DX": 2.0, "DR": 4.0})


def test_chunked_rows_read_inputs_twice(monkeypatch):
    """Rows wider than one block (documented in kernels.py): statistics, then outputs, so inputs twice."""
    monkeypatch.setattr(heuristics, "MAX_BLOCK_N", 16)
    traffic = Traffic()
    with traffic.counting(monkeypatch):
        _run(dict(op="add_layer_norm"))
        _run(dict(op="add_layer_norm", prenorm=True, scale="vector"))
    forward, backward, forward_pre, backward_pre = traffic.launches
    assert _per_element(forward) == ({"X": 2.0, "R": 2.0, "H": 2.0}, {"Y": 2.0, "H": 2.0})
    assert _per_element(backward) == ({"DY": 4.0, "H": 4.0}, {"DX": 2.0})
    # dh_in and the residual (for dscale only) are needed in the second sweep alone: read once.
    assert _per_element(forward_pre) == ({"X": 2.0, "R": 2.0, "H": 2.0}, {"Y": 2.0, "H": 2.0})
    assert _per_element(backward_pre) == ({"DY": 4.0, "H": 4.0, "DH_IN": 2.0, "R": 2.0}, {"DX": 2.0, "DR": 2.0})


@triton.jit
def _reads_twice(X, Y, N, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + cols, mask=cols < N)
    tl.store(Y + cols, x + tl.load(X + cols, mask=cols < N), mask=cols < N)


def test_counter_sees_a_second_read(monkeypatch):
    """The instrument itself: a kernel that reads x twice is counted twice (masked lanes excluded)."""
    traffic = Traffic()
    x, y = torch.randn(10, dtype=torch.float16), torch.empty(10, dtype=torch.float16)
    with traffic.counting(monkeypatch):
        traffic._accesses = []
        _reads_twice[(1,)](x, y, 10, BLOCK=16)
        launch = traffic._attribute("_reads_twice", {"X": x, "Y": y}, 1)
    assert launch["read"] == {"X": 40} and launch["written"] == {"Y": 20}
