"""DESIGN section 6 on every backend: the variant matrix x the backends, one test, one assertion
(``fusednorm.testing.assert_section6``), and float64 gradcheck.

Backends (each with its matrix from ``fusednorm.case_matrix``, where the prunings are written):

- "torch": the whole variant matrix (``case_matrix.full``), through the backend's autograd Function (the CPU
  path switched off);
- "cpu-path": backend "torch" as CPU users get it (``fusednorm.cpu_path``: ATen's ops for the calls it takes,
  the Function for the others), every variant at a dtype rotating over DTYPES, N in (1, 7, 64)
  (``_cpu_path_matrix``; tests/test_cpu_path.py checks which calls it takes);
- "triton": under the Triton interpreter (no GPU) the pruned ``case_matrix.interpreted``, on a GPU the
  whole matrix and wide rows, many rows and float64 (``case_matrix.gpu``); "triton-chunked" (block cap
  lowered to 16 columns: rows wider than one block) and "triton-params-per-row" (the wide rows' paths that
  re-read the parameters per row, forced on at N = 37) add their own;
- "cuda": the compiled extension, on a GPU only (marked gpu; skipped where it is not built), ``case_matrix.gpu``;
- "cuda-emulated": backend="cuda" running the CPU emulation of the CUDA kernels on CPU tensors
  (tests/_cuda_emulation.py; skipped while that module is absent), ``case_matrix.emulated``.

No backend gets an allowance of its own: interpreted Triton rounds float32 -> bfloat16 to nearest even as
the GPU does (tests/test_bf16_rounding.py). Every output and gradient of a case is compared
(``Case.outputs``); NaN never passes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import zlib
from collections.abc import Callable

import pytest
import torch

import fusednorm
from fusednorm import case_matrix
from fusednorm.backends import cuda_impl
from fusednorm.testing import Case, assert_section6, case_variants, check_case, gradcheck_case
from fusednorm.variant import Variant

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
try:  # written by another change; this test works with and without it
    import _cuda_emulation  # tests/ is on sys.path (pytest's rootdir import)
except ImportError:
    _cuda_emulation = None


def _lower_block_cap(monkeypatch):
    from fusednorm.triton import heuristics

    monkeypatch.setattr(heuristics, "MAX_BLOCK_N", 16)


def _params_per_row_from_16_columns(monkeypatch):
    from fusednorm.triton import heuristics

    # launch_config reads these per call: the forward's and the backward's per-row parameter paths.
    monkeypatch.setattr(heuristics, "PARAMS_PER_ROW_BLOCK_N", 16)
    monkeypatch.setattr(heuristics, "FORWARD_PARAMS_PER_ROW_BLOCK_N", 16)


def _emulate_cuda(monkeypatch):
    _cuda_emulation.install_as_cuda(monkeypatch)


@dataclasses.dataclass(frozen=True)
class Target:
    """A backend as the tests run it: which backend name the calls pass, on which device, with which set-up
    (a monkeypatch), on which matrix; ``why_not``: the reason it cannot run here, or None."""

    name: str
    backend: str
    device: str
    matrix: Callable[[], list[Case]]
    setup: Callable | None = None
    why_not: str | None = None
    gradcheck: Callable[[], list[Case]] | None = None
    fast_gradcheck: bool = False


def _why_no_cuda() -> str | None:
    if not HAS_CUDA:
        return "needs a CUDA GPU"
    return None if "cuda" in fusednorm.available_backends("cuda") else cuda_impl.why_unavailable()


def _function_path(monkeypatch):
    """Backend "torch" through its autograd Function: the backend itself, not the CPU path."""
    from fusednorm import _plan, cpu_path

    monkeypatch.setattr(cpu_path, "_enabled", False)
    monkeypatch.setattr(_plan, "_PLANS", {})  # plans cached with the CPU path on; restored after the test


def _cpu_path_matrix() -> list[Case]:
    return list(case_matrix.cases_of(case_variants(), case_matrix.DTYPES, (1, 7, 64), ((5,), (2, 3)), one_dtype=True))


_DEVICE = "cuda" if HAS_CUDA else "cpu"
_NO_TRITON = None if HAS_TRITON else "triton is not installed"
TARGETS = (
    Target("torch", "torch", "cpu", case_matrix.full, _function_path, gradcheck=case_matrix.gradcheck),
    Target("cpu-path", "torch", "cpu", _cpu_path_matrix),
    Target("triton", "triton", _DEVICE, case_matrix.gpu if HAS_CUDA else case_matrix.interpreted, why_not=_NO_TRITON,
           gradcheck=lambda: case_matrix.gradcheck((3, 5)), fast_gradcheck=not HAS_CUDA),
    Target("triton-chunked", "triton", _DEVICE, case_matrix.chunked, _lower_block_cap, _NO_TRITON),
    Target("triton-params-per-row", "triton", _DEVICE, case_matrix.params_per_row, _params_per_row_from_16_columns,
           _NO_TRITON),
    Target("cuda", "cuda", "cuda", case_matrix.gpu, why_not=_why_no_cuda(), gradcheck=case_matrix.gradcheck),
    Target("cuda-emulated", "cuda", "cpu", case_matrix.emulated, _emulate_cuda,
           None if _cuda_emulation is not None else "tests/_cuda_emulation.py is absent"),
)


def _params(matrix_of: Callable[[Target], Callable | None]) -> list:
    """(target, case) parameters; a target that cannot run here is one skipped item, not a skipped matrix."""
    params = []
    for target in TARGETS:
        matrix = matrix_of(target)
        if matrix is None:
            continue
        marks = [pytest.mark.gpu] if target.device == "cuda" else []
        if target.why_not is not None:
            params.append(pytest.param(target, None, id=f"{target.name}-skipped",
                                       marks=marks + [pytest.mark.skip(reason=target.why_not)]))
            continue
        params += [pytest.param(target, case, id=f"{target.name}-{case.name()}", marks=marks) for case in matrix()]
    return params


def _set_up(target: Target, monkeypatch) -> None:
    if target.setup is not None:
        target.setup(monkeypatch)


@pytest.mark.parametrize(("target", "case"), _params(lambda t: t.matrix))
def test_matches_float64_reference(target, case, monkeypatch):
    _set_up(target, monkeypatch)
    seed = zlib.crc32(case.name().encode())
    assert_section6(check_case(case, target.backend, device=target.device, seed=seed))


@pytest.mark.parametrize(("target", "case"), _params(lambda t: t.gradcheck))
def test_gradcheck_float64(target, case, monkeypatch):
    _set_up(target, monkeypatch)
    # fast_mode: random projections instead of one finite difference per input element, which costs
    # hundreds of interpreted launches.
    assert gradcheck_case(case, target.backend, target.device, fast_mode=target.fast_gradcheck)


# ---- the matrices: what they cover --------------------------------------------------------------------


def test_chunked_matrix_really_chunks(monkeypatch):
    """The chunked target proves nothing unless its rows are wider than the lowered block cap."""
    pytest.importorskip("triton")
    from fusednorm.triton import heuristics

    _lower_block_cap(monkeypatch)
    for case in case_matrix.chunked():
        rows, n = case.shape
        for backward in (False, True):
            assert heuristics.launch_config(rows, n, torch.device(_DEVICE), backward=backward).num_chunks > 1


def test_full_matrix_is_every_variant_at_every_dtype():
    cases = case_matrix.full()
    got = {(c.variant, c.dtype, c.param_dtype) for c in cases}
    want = {(v, d, p) for v in case_variants() for d, p in case_matrix.DTYPES if case_matrix.realizable(v, d)}
    assert got == want and len(cases) == len(want)
    for dtype in case_matrix.DTYPES:  # the rotation reaches every width, leading shape and offset per dtype
        at = [c for c in cases if (c.dtype, c.param_dtype) == dtype]
        assert {c.shape[-1] for c in at} == {1, 7, 64, 1000}, dtype
        assert {c.shape[:-1] for c in at} == {(5,), (2, 3)}, dtype
        assert {c.weight_offset for c in at} == {0.0, 1.0}, dtype


def _flag_values(cases: list[Case]) -> dict[str, set]:
    return {f.name: {getattr(c.variant, f.name) for c in cases} for f in dataclasses.fields(Variant)}


@pytest.mark.parametrize("matrix", [case_matrix.full, case_matrix.gpu, case_matrix.check, case_matrix.interpreted,
                                    case_matrix.check_interpreted, case_matrix.emulated])
def test_every_flag_value_and_dtype_is_in_each_matrix(matrix):
    cases = matrix()
    assert len({c.name() for c in cases}) == len(cases), "case names (test ids) must be unique"
    everything = _flag_values(list(case_matrix.cases_of(case_variants(), case_matrix.DTYPES)))
    assert _flag_values(cases) == everything
    assert {torch.float32, torch.bfloat16} <= {c.dtype for c in cases}
    assert {0.0, 1.0} == {c.weight_offset for c in cases}


def test_interpreted_matrix_keeps_every_residual_flag_at_every_dtype():
    """The pruning drops dtypes only for dropout and parameter-less variants: the core ones run at each."""
    cases = case_matrix.interpreted()
    core = [v for v in case_variants() if case_matrix.default_affine(v) and not v.has_dropout]
    for dtype, pdt in case_matrix.DTYPES[:4]:
        ran = {c.variant for c in cases if (c.dtype, c.param_dtype) == (dtype, pdt)}
        assert {v for v in core if case_matrix.realizable(v, dtype)} <= ran, dtype
    assert {1, 37} == {c.shape[-1] for c in cases}
