"""The telemetry flag costs the Triton forward only (M,)-sized extras (DESIGN section 7), counted in the interpreter.

Every masked-in tl.load / tl.store of the forward kernel is attributed to the kernel argument whose tensor
holds the address (the method of tests/test_triton_bytes.py). For each variant, in the one-pass and the
chunked path, the launch with STORE_STATS reads and writes exactly the bytes of the launch without it, per
argument, plus one write of the (M, 8) float32 statistics: 32 bytes per row, nothing per element.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
interpreter = pytest.importorskip("triton.runtime.interpreter")

from fusednorm.backends import triton_impl  # noqa: E402
from fusednorm.backends.contract import STATS_WIDTH, ForwardArgs  # noqa: E402
from fusednorm.triton import heuristics  # noqa: E402
from fusednorm.variant import ScaleKind, Variant  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts bytes in the Triton interpreter (CPU)")
M, N = 6, 64


class ForwardTraffic:
    """Bytes read and written per argument name by the forward kernel launches made inside ``counting``."""

    def __init__(self, monkeypatch):
        self.launches: list[tuple[Counter, Counter]] = []
        self._accesses: list[tuple[str, np.ndarray, int]] = []
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
        kernel, traffic = triton_impl._forward_kernel, self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    traffic._accesses = []
                    kernel[grid](*args, **kwargs)
                    traffic.launches.append(traffic._attribute(dict(zip(kernel.arg_names, args, strict=False))))
                return launch

        monkeypatch.setattr(triton_impl, "_forward_kernel", Launcher())

    def _record(self, kind, ptrs, mask):
        addresses = np.broadcast_to(ptrs.data, np.shape(ptrs.data))
        keep = np.broadcast_to(mask.data, addresses.shape)
        self._accesses.append((kind, addresses[keep].astype(np.uint64), ptrs.get_element_ty().primitive_bitwidth // 8))

    def _attribute(self, named: dict) -> tuple[Counter, Counter]:
        ranges = {k: (t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for k, t in named.items()
                  if isinstance(t, torch.Tensor)}
        read, written = Counter(), Counter()
        for kind, addresses, size in self._accesses:
            owner = np.full(addresses.shape, "", dtype=object)
            for name, (lo, hi) in ranges.items():
                owner[(addresses >= lo) & (addresses < hi)] = name
            assert (owner != "").all(), "an access outside every argument"
            for name in set(owner):
                (read if kind == "read" else written)[name] += int((owner == name).sum()) * size
        return read, written


VARIANTS = {
    "post_ln_store_h": Variant(has_residual=True, has_bias=True),
    "admin_vector": Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, has_bias=True),
    "pre_ln_vector_dropout": Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, prenorm=True, has_dropout=True,
                                     has_bias=True),
    "rms_norm": Variant(is_rms=True),
}


def _args(v: Variant) -> ForwardArgs:
    gen = torch.Generator().manual_seed(0)
    half = dict(dtype=torch.float16)
    return ForwardArgs(
        x=torch.randn(M, N, generator=gen).to(**half),
        residual=torch.randn(M, N, generator=gen).to(**half) if v.has_residual else None,
        weight=torch.randn(N, generator=gen).to(**half), bias=torch.randn(N, generator=gen).to(**half) if v.has_bias
        else None, residual_scale=torch.rand(N, generator=gen).to(**half) if v.learned_scale else None,
        seed=torch.tensor([3]) if v.has_dropout else None, dropout_p=0.25 if v.has_dropout else 0.0)


@pytest.mark.parametrize("chunked", [False, True], ids=["one_pass", "chunked"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_stats_flag_adds_only_32_bytes_per_row(name, chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(heuristics, "MAX_BLOCK_N", 16)
    traffic = ForwardTraffic(monkeypatch)
    variant = VARIANTS[name]
    args = _args(variant)
    triton_impl.forward(variant, args)
    triton_impl.forward(dataclasses.replace(variant, store_stats=True), args)
    (read_off, written_off), (read_on, written_on) = traffic.launches
    assert read_on == read_off, (read_on, read_off)  # nothing more read, STATS never read
    extra = written_on - written_off
    assert extra == Counter(STATS=M * STATS_WIDTH * 4), extra  # (M, 8) float32, written once
    assert written_on - Counter(STATS=M * STATS_WIDTH * 4) == written_off
    # The instrument sees the (M, N) traffic: x read once (twice in chunks when h is not stored), 2 B each.
    assert read_off["X"] == (2 if chunked and not variant.store_h else 1) * M * N * 2
