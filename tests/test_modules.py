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


# ------------------------------------------------------------------------------------------- weight_offset

OFFSET_MODULES = {
    "LayerNorm": lambda **kw: fusednorm.LayerNorm(8, **kw),
    "RMSNorm": lambda **kw: fusednorm.RMSNorm(8, eps=1e-6, **kw),
    "AddLayerNorm": lambda **kw: fusednorm.AddLayerNorm(8, **kw),
    "AddRMSNorm": lambda **kw: fusednorm.AddRMSNorm(8, eps=1e-6, **kw),
}


def _torch_twin(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
    """The same computation in float64 torch, with the affine weight given (weight + offset)."""
    def run(x, r=None):
        h = x.double() if r is None else x.double() + r.double()
        w = weight.double()
        if "Layer" in name:
            return nn.functional.layer_norm(h, (8,), w, bias.double(), 1e-5)
        return nn.functional.rms_norm(h, (8,), w, 1e-6)
    return run


@pytest.mark.parametrize("name", list(OFFSET_MODULES))
def test_every_module_takes_a_weight_offset(name):
    """y = xhat * (weight + weight_offset) (+ bias); the weight starts at 1 - offset, so the affine weight
    starts at 1; the state_dict keys are torch's; the gradient reaches the stored weight."""
    module = OFFSET_MODULES[name](weight_offset=1.0)
    plain = OFFSET_MODULES[name]()
    assert module.weight_offset == 1.0 and plain.weight_offset == 0.0
    assert torch.equal(module.weight.detach(), torch.zeros(8)) and list(module.state_dict()) == list(plain.state_dict())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.weight.copy_(0.3 * torch.randn(8, generator=gen))
    x, r = torch.randn(4, 8, generator=gen) + 1, torch.randn(4, 8, generator=gen)
    args = (x,) if "Add" not in name else (x, r)
    y = module(*args)
    bias = getattr(module, "bias", None)
    reference = _torch_twin(name, module.weight.detach() + 1.0, bias.detach() if bias is not None else None)(*args)
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    w = (module.weight.detach().double() + 1.0).requires_grad_(True)
    _torch_twin(name, w, bias.detach() if bias is not None else None)(*args).square().sum().backward()
    torch.testing.assert_close(module.weight.grad.double(), w.grad, rtol=1e-5, atol=1e-5)


def test_weight_offset_is_keyword_only_and_checked():
    with pytest.raises(TypeError):
        fusednorm.LayerNorm(8, 1e-5, True, True, None, None, 1.0)  # positional: refused
    with pytest.raises(ValueError, match="weight_offset was given but weight is None"):
        fusednorm.RMSNorm(8, elementwise_affine=False, weight_offset=1.0)
    with pytest.raises(TypeError, match="weight_offset must be a Python float"):
        fusednorm.AddRMSNorm(8, weight_offset="one")
    norm = fusednorm.LayerNorm(8, weight_offset=1.0)
    with torch.no_grad():
        norm.weight.fill_(3.0)
    norm.reset_parameters()  # back to an affine weight of 1
    assert torch.equal(norm.weight.detach(), torch.zeros(8)) and "weight_offset=1.0" in repr(norm)


# ------------------------------------------------------------------------------------------------ autocast

@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_drop_ins_follow_torch_under_cpu_autocast(x_dtype):
    """CPU autocast leaves layer_norm / rms_norm alone: the output has the input's dtype, as torch's."""
    x = (torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) + 1).to(x_dtype)
    for ours, theirs in ((fusednorm.LayerNorm(8), nn.LayerNorm(8)), (fusednorm.RMSNorm(8), nn.RMSNorm(8))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ours, y_theirs = ours(x), theirs(x)
        assert y_ours.dtype == y_theirs.dtype == x_dtype
        torch.testing.assert_close(y_ours.float(), y_theirs.float(), **ATOL_PAIR[x_dtype])


def test_add_modules_do_not_cast_under_autocast():
    """Documented: y in x's dtype, h in the residual's, also under autocast."""
    x, r = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = fusednorm.AddRMSNorm(8, prenorm=True)(x, r)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32


def test_drop_ins_compute_in_float32_where_autocast_says_so(monkeypatch):
    """The CUDA rule (layer_norm / rms_norm on autocast's fp32 list), exercised on the CPU by declaring the
    CPU such a device: a 16-bit input is normalised in float32 and the output is float32."""
    monkeypatch.setattr(fusednorm.modules, "AUTOCAST_FP32_NORM_DEVICES", ("cpu",))
    x = (torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(torch.bfloat16)
    for ours, functional in ((fusednorm.LayerNorm(8, dtype=torch.bfloat16), nn.functional.layer_norm),
                             (fusednorm.RMSNorm(8, dtype=torch.bfloat16), nn.functional.rms_norm)):
        with torch.no_grad():
            ours.weight.normal_(1.0, 0.2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours(x)
        assert y.dtype == torch.float32
        params = [p.float() for p in ours.parameters()]
        torch.testing.assert_close(y, functional(x.float(), (8,), *params), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", enabled=False):
        assert fusednorm.LayerNorm(8, dtype=torch.bfloat16)(x).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_drop_ins_follow_torch_under_cuda_autocast(x_dtype):
    """On CUDA, torch.nn.LayerNorm / RMSNorm return float32 under autocast; so do the drop-ins."""
    x = (torch.randn(16, 64, device="cuda") + 1).to(x_dtype)
    for ours, theirs in ((fusednorm.LayerNorm(64), nn.LayerNorm(64)), (fusednorm.RMSNorm(64), nn.RMSNorm(64))):
        ours, theirs = ours.cuda(), theirs.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y_ours, y_theirs = ours(x), theirs(x)
        assert y_ours.dtype == y_theirs.dtype == torch.float32
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
