"""The "torch" backend against the float64 oracle (DESIGN section 6), over the whole variant matrix.

norm type x residual kind (none / plain / float / 0-d / (N,)) x prenorm x residual_in_fp32 x dtype
(fp32, fp16, bf16, and fp32 params under 16-bit x) x N (1, odd, power of two, wide) x leading dims,
each checked on y, h and every gradient (residual_scale's included).
"""

import itertools
import zlib

import pytest
import torch

import fusednorm
from fusednorm.testing import GRADCHECK_CASES, RESIDUAL_KINDS, Case, check_case, gradcheck_op

DTYPES = [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
          (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
WIDTHS = [1, 7, 64, 1000]
LEADS = [(5,), (2, 3)]


def _cases():
    for (dtype, pdt), n, lead in itertools.product(DTYPES, WIDTHS, LEADS):
        shape = (*lead, n)
        yield Case("layer_norm", shape, dtype, pdt)
        yield Case("layer_norm", shape, dtype, pdt, has_weight=False, has_bias=False)
        yield Case("rms_norm", shape, dtype, pdt, eps=1e-6)
        for op, kind in itertools.product(("add_layer_norm", "add_rms_norm"), RESIDUAL_KINDS):
            for prenorm, res32 in ((False, False), (True, False), (True, True)):
                yield Case(op, shape, dtype, pdt, kind, prenorm, res32)
            if kind in ("plain", "vector"):
                yield Case(op, shape, dtype, pdt, kind, False, False, dropout_p=0.3)


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=[c.name() for c in CASES])
def test_torch_backend_matches_float64_reference(case):
    results = check_case(case, "torch", seed=zlib.crc32(case.name().encode()))
    failures = [f"{r.output}: err {r.error:.3g} > bound {r.bound:.3g} (torch {r.torch_error:.3g})"
                f"{'' if r.nonfinite_match else ' NaN/Inf mismatch'}" for r in results if not r.ok]
    assert not failures, failures
    expected = {"y", "dx"} | ({"h"} if case.prenorm else set()) | ({"dresidual"} if case.has_residual else set())
    assert expected <= {r.output for r in results}


@pytest.mark.parametrize("op,options", GRADCHECK_CASES, ids=[f"{o}-{v}" for o, v in GRADCHECK_CASES])
def test_gradcheck_float64(op, options):
    assert gradcheck_op(op, options, "torch")


def test_float64_statistics_are_float64():
    x = torch.randn(3, 8, dtype=torch.float64)
    _, _, mean, rstd = torch.ops.fusednorm.fwd(x, None, None, None, None, 1.0, 1e-5, 0.0, None, False, False,
                                               torch.float64, "torch")
    assert mean.dtype == rstd.dtype == torch.float64
    x16 = torch.randn(3, 8, dtype=torch.bfloat16)
    _, _, mean, rstd = torch.ops.fusednorm.fwd(x16, None, None, None, None, 1.0, 1e-5, 0.0, None, False, False,
                                               torch.bfloat16, "torch")
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (3,)


def test_statistics_do_not_cancel_with_large_mean():
    """A one-pass E[h^2] - E[h]^2 in float32 loses all precision when |mean| >> std."""
    x = (1e4 + torch.randn(4, 512, dtype=torch.float64)).float()
    y = fusednorm.layer_norm(x)
    ref = torch.nn.functional.layer_norm(x.double(), (512,))
    assert (y.double() - ref).abs().max() < 1e-2


def test_stored_h_statistics_match_rounded_h_for_tiny_rows():
    """N = 1 in bf16 with a residual: the backward reads the rounded h, so the forward must have used it."""
    x = torch.tensor([[1.0], [3.0]], dtype=torch.bfloat16, requires_grad=True)
    r = torch.tensor([[1e-3], [256.0]], dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(1, dtype=torch.bfloat16, requires_grad=True)
    y = fusednorm.add_layer_norm(x, r, w, None)
    y.backward(torch.ones_like(y))
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e-2
