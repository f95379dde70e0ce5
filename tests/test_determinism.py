"""Bit-for-bit determinism across GPUs and across batches (DESIGN section 2).

- The backward's row partition -- which rows each float32 partial of dweight/dbias/dscale sums, and so
  the gradients' bits -- is a pure function of (M, N, dtype, variant): never of the SM count. Checked by
  making the SM-count query report H100 (132), A100 (108), H100 PCIe (114), MIG-slice (16) and 1-SM
  values: the triton backend's launches and gradients must not change, bit for bit; and through
  ``torch.ops.fusednorm.cuda_launch_config`` for the CUDA backend's heuristic (csrc/fusednorm.h).
- A row's y, h, dx and dresidual do not depend on the other rows of the batch: row k of an M-row call
  equals the 1-row call on that row, bit for bit (the row's statistics and reductions are those of its
  own tile shape, which depends on N alone).
"""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

import fusednorm
from fusednorm.variant import ScaleKind, Variant

triton = pytest.importorskip("triton")

from fusednorm.backends import triton_impl  # noqa: E402
from fusednorm.backends.contract import BackwardArgs, ForwardArgs  # noqa: E402
from fusednorm.triton import heuristics  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SM_COUNTS = (132, 108, 114, 16, 1)


@pytest.fixture
def sm_count(monkeypatch):
    """Returns a setter: from then on torch reports that many SMs for every CUDA device."""
    real = torch.cuda.get_device_properties

    def set_count(count: int):
        def fake(device=None):
            props = real(device) if torch.cuda.is_available() else types.SimpleNamespace(name="fake", total_memory=0)
            return types.SimpleNamespace(**{k: getattr(props, k) for k in dir(props) if not k.startswith("_")},
                                         multi_processor_count=count)
        monkeypatch.setattr(torch.cuda, "get_device_properties", fake)
        assert torch.cuda.get_device_properties(0).multi_processor_count == count  # what any query would see

    return set_count


VARIANTS = [Variant(is_rms=True), Variant(has_bias=True), Variant(is_rms=True, has_residual=True, prenorm=True),
            Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, has_bias=True),
            Variant(has_residual=True, scale_kind=ScaleKind.SCALAR, prenorm=True, has_dropout=True)]


def test_triton_launch_is_a_pure_function_of_the_problem(sm_count):
    problems = [(m, n, backward, v, dt) for m in (1, 300, 5000, 10**6) for n in (8, 512, 1000, 4096, 8192, 12288,
                                                                                  16384, 65536)
                for backward in (False, True) for v in VARIANTS for dt in (torch.bfloat16, torch.float32)]
    seen = None
    for count in SM_COUNTS:
        sm_count(count)
        configs = [heuristics.launch_config(m, n, torch.device("cuda", 0), backward, v, dt)
                   for m, n, backward, v, dt in problems]
        assert seen is None or configs == seen, f"the launch changed with {count} SMs"
        seen = configs


def _gradients(variant: Variant, m: int, n: int, dtype=torch.float32, seed: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt).to(DEVICE)

    x, residual = randn(m, n) + 1, randn(m, n)
    scale = {ScaleKind.VECTOR: randn(n).abs() + 0.5, ScaleKind.SCALAR: randn(()).abs() + 0.5}.get(variant.scale_kind)
    common = dict(weight=randn(n), residual_scale=scale, dropout_p=0.2 if variant.has_dropout else 0.0,
                  seed=torch.tensor([77], dtype=torch.int64, device=DEVICE) if variant.has_dropout else None)
    out = triton_impl.forward(variant, ForwardArgs(
        x=x, residual=residual if variant.has_residual else None, bias=randn(n) if variant.has_bias else None,
        **common))
    grads = triton_impl.backward(variant, BackwardArgs(
        dy=randn(m, n), mean=out.mean, rstd=out.rstd, dh_in=randn(m, n) if variant.prenorm else None,
        x=None if variant.store_h else x, h=out.h if variant.store_h else None,
        residual=residual if variant.has_residual and (not variant.store_h or variant.learned_scale) else None,
        bias_dtype=dtype if variant.has_bias else None, **common))
    return [t for t in (*out, *grads) if t.numel()]


@pytest.mark.parametrize("variant,n,m,cap", [(VARIANTS[1], 64, 600, None), (VARIANTS[3], 40, 12, 16)],
                         ids=["one-pass", "chunked"])
def test_triton_gradients_bit_identical_whatever_the_sm_count(variant, n, m, cap, sm_count, monkeypatch):
    """At N = 64, 600 rows in 38 tiles of 16 rows; with the chunked path (block cap 16), 12 one-row
    tiles. The control moves the partition (the reference chip of one SM: several tiles per program)
    and must change the column sums' bits: so the comparison can fail."""
    if cap:
        monkeypatch.setattr(heuristics, "MAX_BLOCK_N", cap)
    reference = None
    for count in (132, 16):
        sm_count(count)
        grads = _gradients(variant, m, n)
        if reference is not None:
            assert all(torch.equal(a, b) for a, b in zip(grads, reference, strict=True)), f"{count} SMs"
        reference = grads
    programs = heuristics.launch_config(m, n, backward=True, variant=variant).num_programs
    monkeypatch.setattr(heuristics, "REFERENCE_SMS", 1)
    assert heuristics.launch_config(m, n, backward=True, variant=variant).num_programs != programs
    moved = _gradients(variant, m, n)
    assert any(not torch.equal(a, b) for a, b in zip(moved, reference, strict=True)), "the control moved nothing"


BATCH = [(Variant(has_bias=True), 8, 600, None), (Variant(is_rms=True, has_residual=True, prenorm=True), 8, 600, None),
         (Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, has_bias=True), 1000, 200, None),
         (Variant(is_rms=True, has_residual=True, prenorm=True), 40, 24, 16)]


@pytest.mark.parametrize("variant,n,m,cap", BATCH, ids=[f"{v.name}-N{n}" for v, n, _, _ in BATCH])
def test_a_row_does_not_depend_on_the_batch(variant, n, m, cap, monkeypatch):
    """Row k of an M-row call (k = first, middle, last) equals the 1-row call on that row, bit for bit:
    y, h, mean, rstd, dx, dresidual. What M changes is how many tiles a program takes, whether the last
    tile is ragged, and where the row sits in its tile; the partition of a 1-SM reference chip gives all
    of that at 600 rows (N = 8: tiles of 16 rows, 2 tiles per forward program, 10 per backward program),
    200 (N = 1000: tiles of 4 rows) and, for the chunked path (block cap 16, N = 40), 24 rows. 20000 rows
    would take minutes in the interpreter (every interpreted helper call costs about a millisecond)."""
    monkeypatch.setattr(heuristics, "REFERENCE_SMS", 1)
    if cap:
        monkeypatch.setattr(heuristics, "MAX_BLOCK_N", cap)
    gen = torch.Generator().manual_seed(5)
    x, residual, dy, dh_in = (torch.randn(m, n, generator=gen).to(DEVICE) for _ in range(4))
    x += 1
    weight = torch.randn(n, generator=gen).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(DEVICE) if variant.has_bias else None
    scale = torch.rand(n, generator=gen).to(DEVICE) + 0.5 if variant.scale_kind == ScaleKind.VECTOR else None
    assert heuristics.launch_config(m, n, backward=True, variant=variant).rows_per_program > 1

    def run(rows):
        common = dict(weight=weight, residual_scale=scale)
        res = residual[rows] if variant.has_residual else None
        out = triton_impl.forward(variant, ForwardArgs(x=x[rows], residual=res, bias=bias, **common))
        grads = triton_impl.backward(variant, BackwardArgs(
            dy=dy[rows], mean=out.mean, rstd=out.rstd, dh_in=dh_in[rows] if variant.prenorm else None,
            x=None if variant.store_h else x[rows], h=out.h if variant.store_h else None,
            residual=res if not variant.store_h or variant.learned_scale else None,
            bias_dtype=torch.float32 if variant.has_bias else None, **common))
        return [t for t in (*out, grads.dx, grads.dresidual) if t.numel()]

    batch = run(slice(0, m))
    for k in (0, m // 2 + 3, m - 1):
        single = run(slice(k, k + 1))
        for a, b in zip(batch, single, strict=True):
            assert torch.equal(a[k:k + 1], b), f"row {k} of {m}"


BUILT = importlib.util.find_spec("fusednorm._C") is not None
needs_extension = pytest.mark.skipif(not BUILT, reason="fusednorm._C is not built (.ci/build_cuda.sh builds it)")


@needs_extension
def test_cuda_backward_partition_does_not_depend_on_the_sm_count():
    """csrc/fusednorm.h: the backward's grid (and so its partial rows, one per block and row group) is a
    pure function of (M, N, dtype, partial slots); the forward's grid may use the SM count (rows are
    independent there), its block shape may not."""
    from fusednorm.backends import cuda_impl

    if not cuda_impl.is_built():
        pytest.skip(cuda_impl.why_unavailable())
    for rows in (1, 37, 4096, 65536, 10**7):
        for cols in (8, 1000, 4096, 8192, 16384, 65536):
            for elem_bytes in (2, 4, 8):
                for slots in (0, 1, 3):
                    configs = {cuda_impl.launch_config(rows, cols, elem_bytes, sms, per_sm, True, slots)
                               for sms in SM_COUNTS for per_sm in (1, 2, 4)}
                    assert len(configs) == 1, (rows, cols, elem_bytes, slots, configs)
                    forward = {cuda_impl.launch_config(rows, cols, elem_bytes, sms, per_sm, False)._replace(grid=0)
                               for sms in SM_COUNTS for per_sm in (1, 2, 4)}
                    assert len(forward) == 1
    # The control: the forward's grid does follow the SM count (so the query reaches the heuristic).
    assert cuda_impl.launch_config(10**7, 1024, 2, 132, 2, False).grid != cuda_impl.launch_config(
        10**7, 1024, 2, 16, 2, False).grid


def test_public_api_uses_the_same_partition(sm_count):
    """The public function goes through the same launch: gradients of fusednorm.rms_norm are those of
    the backend call, whatever the SM count."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(100, 64, generator=gen).to(DEVICE).requires_grad_(True)
    w = torch.randn(64, generator=gen).to(DEVICE).requires_grad_(True)
    dy = torch.randn(100, 64, generator=gen).to(DEVICE)
    results = []
    for count in (132, 16):
        sm_count(count)
        x.grad = w.grad = None
        fusednorm.rms_norm(x, w, backend="triton").backward(dy)
        results.append((x.grad.clone(), w.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
