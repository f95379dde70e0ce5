"""The "triton" backend against the float64 oracle (DESIGN section 6), plus its own guarantees.

Without a GPU these tests run the kernels in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). The interpreter converts float32 -> bfloat16 by
truncation instead of round-to-nearest, so bfloat16 cases get one extra bf16 ulp (2^-7, relative
to the reference's magnitude) on top of the section-6 bound; nothing else is loosened.

How the variant product is pruned to fit CI (~0.1-0.5 s per case in the interpreter):
- every add op x residual kind (none / plain / float / 0-d / (N,)) x layout (Post-LN, Pre-LN,
  Pre-LN with residual_in_fp32) x dtype (fp32, fp16, bf16, fp32 params with fp16 x) runs at one
  odd width N = 37 (masking, non-power-of-two);
- plain layer_norm / rms_norm: every dtype x N in (1, 37, 1000), with and without affine params;
- N = 1 and the chunked path (rows wider than one block) run for every op and residual kind in
  fp32 and bf16 (the chunked path with the block cap lowered to 16 columns, N = 100 -> 7 chunks,
  and once for real at N = 16411 > 16384);
- dropout (p = 0.25) for each add op x {plain Post-LN, (N,) Pre-LN} x {fp32, bf16, N = 37 and
  chunked};
- float64 (computed in float64 throughout) and float32 parameters under bfloat16 x, for the
  constant / 0-d / (N,) scales.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fusednorm
from fusednorm.dropout import dropout_keep_mask, philox_r0
from fusednorm.testing import GRADCHECK_CASES, RESIDUAL_KINDS, Case, check_case, gradcheck_op

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fusednorm.triton as triton_backend  # noqa: E402
from fusednorm.dropout import keep_threshold  # noqa: E402
from fusednorm.triton import heuristics  # noqa: E402
from fusednorm.triton.helpers import philox_keep  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
ADD_OPS = ("add_layer_norm", "add_rms_norm")
LAYOUTS = ((False, False), (True, False), (True, True))  # (prenorm, residual_in_fp32)
DTYPES = ((torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.float16, torch.float32))


def _assert_section6(case: Case, seed: int = 0) -> None:
    extra = 2.0**-7 if INTERPRETED and case.dtype == torch.bfloat16 else 0.0
    results = check_case(case, "triton", device=DEVICE, seed=seed, extra_atol=extra)
    failures = [f"{r.output}: err {r.error:.3g} > bound {r.bound:.3g} (torch {r.torch_error:.3g})"
                f"{'' if r.nonfinite_match else ' NaN/Inf mismatch'}" for r in results if not r.ok]
    assert not failures, failures
    expected = {"y", "dx"} | ({"h"} if case.prenorm else set()) | ({"dresidual"} if case.has_residual else set())
    expected |= {"dresidual_scale"} if case.residual_kind in ("scalar", "vector") else set()
    assert expected <= {r.output for r in results}


def _cases():
    for op, kind, (prenorm, res32), (dtype, pdt) in itertools.product(ADD_OPS, RESIDUAL_KINDS, LAYOUTS, DTYPES):
        yield Case(op, (4, 37), dtype, pdt, kind, prenorm, res32)
    for op, (dtype, pdt), n in itertools.product(("layer_norm", "rms_norm"), DTYPES, (1, 37, 1000)):
        yield Case(op, (3, n), dtype, pdt)
        yield Case(op, (3, n), dtype, pdt, has_weight=False, has_bias=False)
    for op, kind, dtype in itertools.product(ADD_OPS, RESIDUAL_KINDS, (torch.float32, torch.bfloat16)):
        yield Case(op, (3, 1), dtype, None, kind, kind in ("plain", "vector"), False)
    for op, kind in itertools.product(ADD_OPS, ("plain", "vector")):
        for dtype, prenorm in itertools.product((torch.float32, torch.bfloat16), (False, True)):
            yield Case(op, (4, 37), dtype, None, kind, prenorm, False, dropout_p=0.25)
    # float64 end to end (statistics in float64), and float32 parameters under bfloat16 x.
    for op, kind in itertools.product(ADD_OPS, ("float", "scalar", "vector")):
        yield Case(op, (3, 37), torch.float64, None, kind, kind == "vector", False, dropout_p=0.25 * (kind == "float"))
        yield Case(op, (3, 37), torch.bfloat16, torch.float32, kind, kind != "vector", kind == "scalar")


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=[c.name() for c in CASES])
def test_triton_matches_float64_reference(case):
    _assert_section6(case, seed=len(CASES) + CASES.index(case))


def _chunked_cases():
    for op in ("layer_norm", "rms_norm"):
        yield Case(op, (3, 100), torch.float32)
    for op, kind, dtype in itertools.product(ADD_OPS, RESIDUAL_KINDS, (torch.float32, torch.bfloat16)):
        yield Case(op, (3, 100), dtype, None, kind, kind in ("scalar", "vector"), kind == "plain")
    for op, dtype in itertools.product(ADD_OPS, (torch.float32, torch.bfloat16)):
        yield Case(op, (3, 100), dtype, None, "vector", True, False, dropout_p=0.25)
        yield Case(op, (3, 100), dtype, None, "plain", False, False, dropout_p=0.25)


CHUNKED = list(_chunked_cases())


@pytest.mark.parametrize("case", CHUNKED, ids=[c.name() for c in CHUNKED])
def test_triton_chunked_rows_match_reference(case, monkeypatch):
    """Rows wider than one block: the same kernels walk 16-column chunks (N = 100 -> 7 chunks)."""
    monkeypatch.setattr(heuristics, "MAX_BLOCK_N", 16)
    assert heuristics.launch_config(3, 100, torch.device(DEVICE), backward=True).num_chunks == 7
    _assert_section6(case, seed=CHUNKED.index(case))


def test_triton_wide_row_beyond_the_block_cap():
    """N = 16411 > MAX_BLOCK_N with the real cap: two chunks, the second one ragged."""
    n = heuristics.MAX_BLOCK_N + 27
    assert heuristics.launch_config(2, n, torch.device(DEVICE), backward=False).num_chunks == 2
    _assert_section6(Case("add_layer_norm", (2, n), torch.float32, None, "vector", True, False))


@pytest.mark.parametrize("op,options", GRADCHECK_CASES, ids=[f"{op}-{o}" for op, o in GRADCHECK_CASES])
def test_triton_gradcheck_float64(op, options):
    # fast_mode: random projections instead of one finite difference per input element, which
    # costs hundreds of interpreted launches.
    assert gradcheck_op(op, options, "triton", shape=(3, 5), device=DEVICE, fast_mode=True)


@pytest.mark.parametrize("op,options", [("add_layer_norm", dict(residual_scale="vector", prenorm=True)),
                                        ("add_rms_norm", dict(residual_scale="scalar"))],
                         ids=["add_layer_norm", "add_rms_norm"])
def test_triton_gradcheck_float64_chunked(op, options, monkeypatch):
    monkeypatch.setattr(heuristics, "MAX_BLOCK_N", 4)
    assert gradcheck_op(op, options, "triton", shape=(3, 10), device=DEVICE, fast_mode=True)


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
    y, h, mean, rstd = triton_backend.forward(x, None, None, None, None, 1.0, 1e-5, p, seed, True, True,
                                              torch.float32)
    keep = dropout_keep_mask(seed, m, n, p)
    assert torch.equal(h != 0, keep)
    assert torch.equal(h[keep], torch.full_like(h[keep], 1.0 / (1.0 - p)))
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05


def test_empty_input_launches_nothing(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for M == 0")

    monkeypatch.setattr(triton_backend, "_forward_kernel", NoLaunch())
    monkeypatch.setattr(triton_backend, "_backward_kernel", NoLaunch())
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


PARAMS_PER_ROW = [Case(op, (4, 37), dtype, None, kind, prenorm, False, dropout_p=p)
                  for op in ADD_OPS for kind in ("scalar", "vector") for dtype in (torch.float32, torch.bfloat16)
                  for prenorm, p in ((False, 0.0), (True, 0.25))]


@pytest.mark.parametrize("case", PARAMS_PER_ROW, ids=[c.name() for c in PARAMS_PER_ROW])
def test_triton_params_reloaded_per_row_match_reference(case, monkeypatch):
    """The register-saving path of wide learned-scale backwards (weight and scale re-read per row,
    normally from 8192 columns on) forced on at N = 37, so that CI runs it."""
    from fusednorm.triton import kernels

    monkeypatch.setattr(kernels, "_PARAMS_PER_ROW_BLOCK_N", tl.constexpr(16))
    _assert_section6(case, seed=PARAMS_PER_ROW.index(case))
