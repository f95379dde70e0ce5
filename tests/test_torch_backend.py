"""The "torch" backend's own guarantees (its section-6 correctness over the variant matrix is in
tests/test_correctness.py): float64 statistics in float64, no one-pass variance cancellation, and the
statistics of the stored (rounded) h."""

import torch

import fusednorm
from fusednorm import ops
from fusednorm.backends.contract import ForwardArgs
from fusednorm.testing import variant


def test_float64_statistics_are_float64():
    plain = variant("layer_norm[no_weight,no_bias]")
    _, _, mean, rstd = ops.forward(plain, ForwardArgs(torch.randn(3, 8, dtype=torch.float64)), "torch")
    assert mean.dtype == rstd.dtype == torch.float64
    _, _, mean, rstd = ops.forward(plain, ForwardArgs(torch.randn(3, 8, dtype=torch.bfloat16)), "torch")
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
