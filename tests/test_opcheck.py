"""torch.library.opcheck on the op layer: fusednorm::fwd and fusednorm::bwd, every variant, every CPU backend.

opcheck runs each op for real and checks its schema (no hidden mutation or aliasing), its fake (meta)
function against the real outputs (shapes, dtypes, strides), its autograd registration, and that
AOTAutograd can trace it with dynamic shapes. The argument sets are those the functional layer
builds (fusednorm/functional.py): what the forward stores decides what the backward receives.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fusednorm
from fusednorm.dropout import draw_seed

CPU_BACKENDS = fusednorm.available_backends("cpu")
FWD = torch.ops.fusednorm.fwd.default
BWD = torch.ops.fusednorm.bwd.default


def _variants():
    """(dtype, param_dtype, is_rms, residual_kind, prenorm, residual_in_fp32, dropout_p, affine)."""
    for is_rms, kind in itertools.product((False, True), ("none", "plain", "float", "scalar", "vector")):
        yield torch.float32, None, is_rms, kind, False, False, 0.0, True
        if kind != "none":
            yield torch.float32, None, is_rms, kind, True, False, 0.0, True
    for is_rms in (False, True):
        yield torch.bfloat16, torch.float32, is_rms, "vector", False, False, 0.0, True
        yield torch.bfloat16, torch.float32, is_rms, "plain", True, True, 0.0, True
        yield torch.float16, None, is_rms, "scalar", True, True, 0.25, True
        yield torch.float32, None, is_rms, "vector", False, False, 0.25, True
        yield torch.float32, None, is_rms, "plain", True, False, 0.25, True
        yield torch.float32, None, is_rms, "none", False, False, 0.25, False
        yield torch.float64, None, is_rms, "float", True, False, 0.0, True


def _name(v) -> str:
    dtype, pdt, is_rms, kind, prenorm, res32, p, affine = v
    parts = ["rms" if is_rms else "ln", str(dtype)[6:], kind]
    parts += [f"params_{str(pdt)[6:]}"] if pdt else []
    parts += ["prenorm"] if prenorm else []
    parts += ["res_fp32"] if res32 else []
    parts += [f"p{p}"] if p else []
    parts += [] if affine else ["no_affine"]
    return "-".join(parts)


VARIANTS = list(_variants())
# The interpreted Triton kernels take ~1.5 s per opcheck pair: check one variant per kernel flag instead
# of the full product (every flag value appears at least once, for both norms).
_TRITON_SUBSET = ("ln-float32-none", "rms-float32-plain", "ln-bfloat16-vector-params_float32",
                  "rms-bfloat16-plain-params_float32-prenorm-res_fp32", "ln-float16-scalar-prenorm-res_fp32-p0.25",
                  "rms-float32-none-p0.25-no_affine", "ln-float64-float-prenorm", "rms-float32-vector-p0.25")
CASES = [(v, b) for b in CPU_BACKENDS for v in VARIANTS if b != "triton" or _name(v) in _TRITON_SUBSET]


def _arguments(variant, backend: str, rows: int = 5, n: int = 12):
    """fwd's arguments for ``variant`` and bwd's arguments built from fwd's real outputs."""
    dtype, pdt, is_rms, kind, prenorm, res32, p, affine = variant
    pdt = pdt or dtype
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt)

    x = rand(rows, n) + 2.0
    residual = None if kind == "none" else rand(rows, n, dt=torch.float32 if res32 else dtype)
    weight = (1.0 + 0.1 * rand(n, dt=pdt)) if affine else None
    bias = (0.1 * rand(n, dt=pdt)) if affine and not is_rms else None
    scale = {"scalar": (1.0 + 0.1 * rand(())).to(pdt), "vector": (1.0 + 0.1 * rand(n)).to(pdt)}.get(kind)
    scale_value = 0.75 if kind == "float" else 1.0
    seed = draw_seed("cpu") if p > 0 else None
    h_dtype = torch.float32 if res32 and dtype != torch.float64 else (residual.dtype if residual is not None else dtype)
    store_h = prenorm or (residual is not None and scale is None)
    fwd_args = (x, residual, weight, bias, scale, scale_value, 1e-5, p, seed, is_rms, store_h, h_dtype, backend)

    y, h, mean, rstd = FWD(*fwd_args)
    dy = rand(rows, n)
    dh_in = rand(rows, n, dt=h_dtype) if prenorm else None
    bwd_args = (dy, dh_in, None if store_h else x, residual if scale is not None else None, h if store_h else None,
                weight, bias.dtype if bias is not None else None, scale, scale_value, mean, rstd, p, seed, is_rms,
                dtype, residual.dtype if residual is not None else None, backend)
    return fwd_args, bwd_args


def test_triton_subset_names_exist():
    assert set(_TRITON_SUBSET) <= {_name(v) for v in VARIANTS}


def _assert_all_pass(result: dict) -> None:
    failures = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failures, failures


@pytest.mark.parametrize(("variant", "backend"), CASES, ids=[f"{_name(v)}-{b}" for v, b in CASES])
def test_opcheck_fwd_and_bwd(variant, backend):
    fwd_args, bwd_args = _arguments(variant, backend)
    _assert_all_pass(torch.library.opcheck(FWD, fwd_args))
    _assert_all_pass(torch.library.opcheck(BWD, bwd_args))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_empty_batch(backend):
    """M = 0: empty outputs, (N,) zero parameter gradients; the fake functions must agree."""
    variant = (torch.float32, None, False, "vector", True, False, 0.0, True)
    fwd_args, bwd_args = _arguments(variant, backend, rows=0)
    _assert_all_pass(torch.library.opcheck(FWD, fwd_args))
    _assert_all_pass(torch.library.opcheck(BWD, bwd_args))


def test_fake_outputs_match_real_ones_exactly():
    """Beyond opcheck's own comparison: every output's shape, dtype and stride, under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for variant in VARIANTS:
        fwd_args, bwd_args = _arguments(variant, "torch")
        for op, args in ((FWD, fwd_args), (BWD, bwd_args)):
            real = op(*args)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                fake = op(*fake_args)
            for r, f in zip(real, fake, strict=True):
                assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), (_name(variant), op)
