"""Modules: torch.nn's constructor signatures and state_dict keys, outputs, and replace_norms."""

import pytest
import torch
from torch import nn

import fusednorm
from fusednorm.testing import ATOL


def _close(a, b, dtype=torch.float32):
    tol = ATOL[dtype] * 10 if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("kwargs", [dict(), dict(elementwise_affine=False), dict(bias=False), dict(eps=1e-3)])
def test_layer_norm_is_a_drop_in(kwargs):
    ref = nn.LayerNorm((4, 6), **kwargs)
    ours = fusednorm.LayerNorm((4, 6), **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 6) + 2
    _close(ours(x), ref(x))
    ref.load_state_dict(ours.state_dict())  # and back


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_a_drop_in(eps, dtype):
    ref = nn.RMSNorm(16, eps=eps, dtype=dtype)
    ours = fusednorm.RMSNorm(16, eps=eps, dtype=dtype)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(5, 16) * 1e-3).to(dtype)  # small values make eps matter
    _close(ours(x).float(), ref(x).float(), dtype)


def test_add_norm_modules_keys_and_scale_kinds():
    assert list(fusednorm.AddLayerNorm(8).state_dict()) == ["weight", "bias"]
    assert list(fusednorm.AddRMSNorm(8).state_dict()) == ["weight"]
    vec = fusednorm.AddLayerNorm(8, residual_scale="vector")
    assert list(vec.state_dict()) == ["weight", "bias", "residual_scale"]
    assert vec.residual_scale.shape == (8,) and torch.equal(vec.residual_scale.detach(), torch.ones(8))
    assert fusednorm.AddRMSNorm(8, residual_scale="scalar").residual_scale.shape == ()
    deepnorm = fusednorm.AddLayerNorm(8, residual_scale=2.5)
    assert deepnorm.residual_scale is None and deepnorm.scale_constant == 2.5
    with pytest.raises(ValueError, match="residual_scale must be None, a float, 'scalar' or 'vector'"):
        fusednorm.AddLayerNorm(8, residual_scale="matrix")


def test_add_layer_norm_module_math_and_grads():
    m = fusednorm.AddLayerNorm(8, residual_scale="vector")
    with torch.no_grad():
        m.residual_scale.uniform_(0.5, 2.0)
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    y = m(x, r)
    ref = nn.functional.layer_norm(r * m.residual_scale + x, (8,), m.weight, m.bias)
    _close(y, ref)
    y.square().sum().backward()
    ref_scale = m.residual_scale.detach().clone().requires_grad_(True)
    nn.functional.layer_norm(r * ref_scale + x, (8,), m.weight.detach(), m.bias.detach()).square().sum().backward()
    _close(m.residual_scale.grad, ref_scale.grad)


def test_add_module_dropout_only_in_training():
    m = fusednorm.AddRMSNorm(32, dropout_p=0.5, prenorm=True)
    x, r = torch.randn(4, 32), torch.zeros(4, 32)
    _, h_train = m(x, r)
    assert (h_train == 0).any()
    m.eval()
    _, h_eval = m(x, r)
    assert torch.equal(h_eval, x)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8, eps=None))
        self.shared = self.ln

    def forward(self, x):
        return self.inner(self.ln(x))


def test_replace_norms_keeps_parameters_keys_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), nn.LayerNorm(8, bias=False))
    model.eval()
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 8)
    y_before = model[0].inner(model[0].ln(x))
    assert fusednorm.replace_norms(model) is model
    assert isinstance(model[0].ln, fusednorm.LayerNorm) and isinstance(model[1], fusednorm.LayerNorm)
    assert isinstance(model[0].inner[1], fusednorm.RMSNorm) and model[0].inner[1].eps is None
    assert model[0].shared is model[0].ln
    assert list(model.state_dict()) == keys_before
    for name, p in model.named_parameters():
        assert p is params_before[name]
    assert not model[0].ln.training
    _close(model[0].inner(model[0].ln(x)), y_before)
    model(x).sum().backward()
    opt.step()  # the optimizer built before the swap still drives the parameters


def test_replace_norms_on_a_bare_norm_returns_the_twin():
    ln = nn.LayerNorm(4, dtype=torch.float64)
    twin = fusednorm.replace_norms(ln)
    assert isinstance(twin, fusednorm.LayerNorm) and twin.weight is ln.weight and twin.weight.dtype == torch.float64


def test_replace_norms_leaves_subclasses_and_lookalikes_alone():
    """Only the exact torch.nn classes (and HF's RMSNorm classes) are swapped: a subclass may override
    forward, and a user's module that computes an RMS norm on the probe may do more (here: a clamp)."""

    class DoubledLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    class ClampedNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))
            self.eps = 1e-6

        def forward(self, x):
            return (self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).clamp(-50, 50)

    model = nn.Sequential(DoubledLayerNorm(8), ClampedNorm(8))
    fusednorm.replace_norms(model)
    assert [type(m) for m in model] == [DoubledLayerNorm, ClampedNorm]


def test_replace_norms_keeps_hooks():
    ln = nn.LayerNorm(8)
    calls = []
    ln.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    handle = ln.register_forward_hook(lambda m, args, out: calls.append("post"))
    model = nn.Sequential(ln)
    fusednorm.replace_norms(model)
    assert isinstance(model[0], fusednorm.LayerNorm)
    model(torch.randn(2, 8))
    assert calls == ["pre", "post"]
    handle.remove()  # a handle taken before the swap still removes the hook from the drop-in
    model(torch.randn(2, 8))
    assert calls == ["pre", "post", "pre"]


ATOL_PAIR = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
             torch.float64: dict(rtol=1e-6, atol=1e-6)}


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float16), (torch.float64, torch.float32)])
def test_rms_norm_module_accepts_the_weight_dtypes_torch_accepts(x_dtype, w_dtype):
    """torch.nn.RMSNorm runs with any weight dtype and returns x's dtype; so does the drop-in."""
    torch.manual_seed(0)
    ours, theirs = fusednorm.RMSNorm(8, dtype=w_dtype), nn.RMSNorm(8, dtype=w_dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 8, dtype=x_dtype) + 1
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype == x_dtype
    torch.testing.assert_close(y_ours, y_theirs, **ATOL_PAIR[x_dtype])
    y_ours.float().sum().backward()
    y_theirs.float().sum().backward()
    assert ours.weight.grad.dtype == w_dtype
    torch.testing.assert_close(ours.weight.grad.float(), theirs.weight.grad.float(), rtol=2e-2, atol=2e-2)


def test_modules_reject_bad_input_and_options():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fusednorm.LayerNorm(8)([1.0] * 8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fusednorm.RMSNorm(8)([1.0] * 8)
    with pytest.raises(ValueError, match="dropout_p"):  # at construction, as nn.Dropout(1.5) does
        fusednorm.AddLayerNorm(8, dropout_p=1.5)
    with pytest.raises(TypeError, match="prenorm"):
        fusednorm.AddRMSNorm(8, prenorm="yes")
    with pytest.raises(ValueError, match="eps"):
        fusednorm.AddLayerNorm(8, eps=-1.0)


def test_module_outputs_are_not_autograd_views():
    """As torch.nn's: FSDP2 warns on a module output that is a view (in-place ops on it skip its hooks)."""
    x, r = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    for module in (fusednorm.LayerNorm(8), fusednorm.RMSNorm(8)):
        assert not module(x)._is_view()
    for module in (fusednorm.AddLayerNorm(8, prenorm=True), fusednorm.AddRMSNorm(8, prenorm=True)):
        assert not any(t._is_view() for t in module(x, r))
