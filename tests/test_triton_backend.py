"""The "triton" backend's own guarantees: its section-6 correctness over the variant matrix (including
rows wider than one block and the per-row parameter path) is in tests/test_correctness.py; here the
rest: gradcheck of the chunked path, bit-identical gradients run to run, the Philox mask bit for bit,
no launch for M = 0, strided and NaN rows, a row wider than the real block cap.

Without a GPU these tests run the kernels in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

import pytest
import torch

import fusednorm
from fusednorm.backends.contract import ForwardArgs
from fusednorm.dropout import dropout_keep_mask, philox_r0
from fusednorm.testing import Case, assert_section6, check_case, gradcheck_case, variant

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fusednorm.backends import triton_impl  # noqa: E402
from fusednorm.dropout import keep_threshold  # noqa: E402
from fusednorm.triton import heuristics  # noqa: E402
from fusednorm.triton.helpers import philox_keep  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_wide_row_beyond_the_block_cap():
    """N = 16411 > MAX_BLOCK_N with the real cap: two chunks, the second one ragged."""
    n = heuristics.MAX_BLOCK_N + 27
    assert heuristics.launch_config(2, n, torch.device(DEVICE), backward=False).num_chunks == 2
    assert_section6(check_case(Case("add_layer_norm[vector,prenorm]", (2, n)), "triton", device=DEVICE))


@pytest.mark.parametrize("name", ["add_layer_norm[vector,prenorm]", "add_rms_norm[scalar]"])
def test_triton_gradcheck_float64_chunked(name, monkeypatch):
    monkeypatch.setattr(heuristics, "MAX_BLOCK_N", 4)
    assert gradcheck_case(Case(name, (3, 10), torch.float64), "triton", DEVICE, fast_mode=True)


def _grads(backend: str, seed: int, **options):
    gen = torch.Generator().manual_seed(seed)
    m, n = 10, 40  # several rows per program: partial sums over rows, then across programs
    x = (torch.randn(m, n, generator=gen) + 2).to(DEVICE).requires_grad_(True)
    residual = torch.randn(m, n, generator=gen).to(DEVICE).requires_grad_(True)
    weight = torch.randn(n, generator=gen).to(DEVICE).requires_grad_(True)
    bias = torch.randn(n, generator=gen).to(DEVICE).requires_grad_(True)
    scale = torch.rand(n, generator=gen).to(DEVICE).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen).to(DEVICE)
    torch.manual_seed(seed)
    y = fusednorm.add_layer_norm(x, residual, weight, bias, residual_scale=scale, backend=backend, **options)
    y.backward(dy)
    return [y.detach(), x.grad, residual.grad, weight.grad, bias.grad, scale.grad]


@pytest.mark.parametrize("cap", [16384, 16], ids=["one-block", "chunked"])
def test_triton_gradients_bit_identical_run_to_run(cap, monkeypatch):
    monkeypatch.setattr(heuristics, "MAX_BLOCK_N", cap)
    first = _grads("triton", 7, dropout_p=0.2)
    second = _grads("triton", 7, dropout_p=0.2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_triton_row_groups_keep_the_column_sums_bits(monkeypatch):
    """Rows of several bands go band by band over groups of rows, each band's column sums resumed from the
    program's partial row: 10 rows of 40 columns in 2 programs of 5 rows (groups of 2, 2 and 1: the last
    one partial), 3 bands (chunks of 4 columns). Bit-identical to one group of all rows (the order of
    the kernel before groups: every column adds its rows in order), and right (the torch backend)."""
    monkeypatch.setattr(heuristics, "MAX_BLOCK_N", 4)
    monkeypatch.setattr(heuristics, "REFERENCE_SMS", 1)
    cfg = heuristics.launch_config(10, 40, backward=True, variant=variant("add_layer_norm[vector]"),
                                   dtype=torch.float32)
    assert (cfg.num_bands, cfg.num_programs, cfg.rows_per_program, cfg.group_rows) == (3, 2, 5, 2)
    grouped = _grads("triton", 3)
    monkeypatch.setattr(heuristics, "CHUNKED_GROUP_ROWS", 5)
    one_group = _grads("triton", 3)
    for a, b in zip(grouped, one_group, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(grouped, _grads("torch", 3), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_agrees_with_torch_backend():
    """Same inputs, same dropout seed: the two backends agree to float32 rounding."""
    for a, b in zip(_grads("triton", 11, dropout_p=0.3), _grads("torch", 11, dropout_p=0.3), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@triton.jit
def _keep_kernel(SEED, INDEX, KEEP, threshold, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    keep = philox_keep(tl.load(SEED), tl.load(INDEX + offs), threshold)
    tl.store(KEEP + offs, keep.to(tl.int8))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_philox_keep_matches_dropout_module_bit_for_bit(p):
    """Indices past 2^32 and seeds with high bits set: both words of counter and key matter."""
    gen = torch.Generator().manual_seed(4)
    index = torch.cat([torch.arange(64), torch.randint(0, 2**40, (64,), generator=gen)]).to(DEVICE)
    seed = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64, device=DEVICE)
    keep = torch.empty(128, dtype=torch.int8, device=DEVICE)
    _keep_kernel[(1,)](seed, index, keep, keep_threshold(p), BLOCK=128)
    expected = (philox_r0(seed, index) >> 8) >= keep_threshold(p)
    assert torch.equal(keep.bool(), expected)


def test_dropout_mask_of_forward_is_the_dropout_module_mask():
    """h = dropout(ones) exposes the kernel's mask; it must be dropout_keep_mask's, bit for bit."""
    m, n, p = 7, 45, 0.3
    x = torch.ones(m, n, device=DEVICE)
    seed = torch.tensor([987654321987], dtype=torch.int64, device=DEVICE)
    h = triton_impl.forward(variant("rms_norm[prenorm,dropout,no_weight]"),
                             ForwardArgs(x, seed=seed, dropout_p=p)).h
    keep = dropout_keep_mask(seed, m, n, p)
    assert torch.equal(h != 0, keep)
    assert torch.equal(h[keep], torch.full_like(h[keep], 1.0 / (1.0 - p)))
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05


def test_empty_input_launches_nothing(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for M == 0")

    monkeypatch.setattr(triton_impl, "_forward_kernel", NoLaunch())
    monkeypatch.setattr(triton_impl, "_backward_kernel", NoLaunch())
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    residual = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, device=DEVICE, requires_grad=True)
    scale = torch.randn(8, device=DEVICE, requires_grad=True)
    y, h = fusednorm.add_layer_norm(x, residual, weight, None, residual_scale=scale, prenorm=True, backend="triton")
    assert y.shape == h.shape == (0, 8)
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == (0, 8) and torch.equal(weight.grad, torch.zeros(8, device=DEVICE))
    assert torch.equal(scale.grad, torch.zeros(8, device=DEVICE))


def test_strided_rows_and_nan_rows():
    """Row strides that are not N (a column slice), and a NaN row that stays in its row."""
    base = torch.randn(6, 80, device=DEVICE) + 1
    x = base[:, :33]
    assert x.stride(0) == 80
    x[2, 5] = float("nan")
    weight = torch.randn(33, device=DEVICE)
    y = fusednorm.layer_norm(x, weight, None, backend="triton")
    expected = fusednorm.layer_norm(x.contiguous(), weight, None, backend="torch")
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()
    torch.testing.assert_close(y, expected, equal_nan=True)
