"""replace_norms on whole torch models: torch.nn.TransformerEncoder, Post-LN and Pre-LN.

The replaced model must give the original model's outputs and gradients within the DESIGN section-6
bound: against a float64 copy of the model, its error is at most twice the original float32 model's
error plus a small atol. And it must really run fusednorm (torch's encoder has a fused "fast path"
that bypasses the norm modules in inference; a hook on every replaced norm proves they ran).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusednorm
from fusednorm import testing

D_MODEL = 16


def assert_within_section6(name: str, fused: torch.Tensor, reference: torch.Tensor, torch_own: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> None:
    """DESIGN section 6 for one model output or gradient (testing.compare needs a Case only for its dtype)."""
    case = testing.Case("layer_norm", tuple(reference.shape) or (1,), dtype)
    c = testing.compare(case, name, fused, reference, torch_own)
    assert c.ok, f"{name}: error {c.error:.3g} > bound {c.bound:.3g} (torch's own error {c.torch_error:.3g})"


def outputs_and_grads(model: nn.Module, *inputs, out=lambda o: o) -> dict[str, torch.Tensor]:
    """{'out': output, 'd<param name>': gradient} for loss = <output, fixed random cotangent>."""
    model.zero_grad(set_to_none=True)
    y = out(model(*inputs))
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (y.double() * cotangent).sum().backward()
    result = {"out": y.detach()}
    for name, p in model.named_parameters():
        if p.grad is not None:
            result["d" + name] = p.grad.detach().clone()
    return result


def assert_model_matches(fused: dict, reference: dict, torch_own: dict) -> None:
    assert fused.keys() == reference.keys() == torch_own.keys()
    for k in reference:
        assert_within_section6(k, fused[k], reference[k], torch_own[k])


def count_calls(model: nn.Module, types) -> dict:
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    for m in model.modules():
        if isinstance(m, types):
            m.register_forward_hook(hook)
    return calls


def encoder(norm_first: bool) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, nhead=2, dim_feedforward=32, dropout=0.0, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(D_MODEL), enable_nested_tensor=False)
    with torch.no_grad():  # non-trivial norm parameters, so that a wrong weight or bias gradient shows
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_replaced_transformer_encoder_matches_original(norm_first):
    original = encoder(norm_first)
    reference = copy.deepcopy(original).double()
    replaced = copy.deepcopy(original)
    keys = list(replaced.state_dict())
    params = dict(replaced.named_parameters())
    assert fusednorm.replace_norms(replaced) is replaced
    # 2 layers x 2 norms + the final norm; same Parameter objects, same keys.
    assert sum(isinstance(m, fusednorm.LayerNorm) for m in replaced.modules()) == 5
    assert not any(type(m) is nn.LayerNorm for m in replaced.modules())
    assert list(replaced.state_dict()) == keys
    assert all(p is params[n] for n, p in replaced.named_parameters())
    calls = count_calls(replaced, fusednorm.LayerNorm)

    x = torch.randn(5, 3, D_MODEL, generator=torch.Generator().manual_seed(1)) + 1.0  # (S, B, E)
    # Eval: outputs (the fast path is taken only without grad; check that our norms ran anyway).
    for model in (original, reference, replaced):
        model.eval()
    with torch.no_grad():
        y_fused, y_ref, y_own = replaced(x), reference(x.double()), original(x)
    assert calls["n"] == 5
    assert_within_section6("eval output", y_fused, y_ref, y_own)
    # Gradients (dropout is 0): every parameter.
    fused = outputs_and_grads(replaced, x)
    assert_model_matches(fused, outputs_and_grads(reference, x.double()), outputs_and_grads(original, x))


def test_replaced_encoder_trains_with_an_optimizer_built_before():
    """An optimizer built before replace_norms still updates the norms' parameters (same objects)."""
    model = encoder(norm_first=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fusednorm.replace_norms(model)
    norm = model.norm
    before = norm.weight.detach().clone()
    model(torch.randn(4, 2, D_MODEL)).square().mean().backward()
    opt.step()
    assert not torch.equal(norm.weight, before)


# ------------------------------------------------------------- HF-style RMSNorm classes, matched by behaviour

class _LlamaStyleRMSNorm(nn.Module):
    """The three output-dtype conventions of HF's RMSNorm classes, written out as HF writes them (so that
    these tests need no transformers): "promote" (LlamaRMSNorm), "input" (Olmo2RMSNorm), "weight"
    (T5LayerNorm)."""

    def __init__(self, n: int, rule: str, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps
        self.rule = rule

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.rule == "promote":
            return self.weight * h.to(dtype)
        if self.rule == "input":
            return (self.weight * h).to(dtype)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("rule", ["promote", "input", "weight"])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_hf_style_rmsnorm_replaced_with_its_dtype_rule(rule, w_dtype):
    norm = _LlamaStyleRMSNorm(40, rule).to(w_dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    model = nn.Sequential(norm)
    fusednorm.replace_norms(model)
    twin = model[0]
    assert isinstance(twin, fusednorm.modules.HFRMSNorm) and twin.out_dtype_rule == rule
    assert twin.weight is norm.weight and list(model.state_dict()) == ["0.weight"]
    for x_dtype in DTYPES:
        x = (torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(x_dtype)
        ours, theirs = twin(x), norm(x)
        assert ours.dtype == theirs.dtype, (x_dtype, ours.dtype, theirs.dtype)
        x64, w64 = x.double(), norm.weight.detach().double()
        reference = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
        assert_within_section6(f"y {x_dtype}", ours, reference, theirs, dtype=theirs.dtype)
        g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
        xs = [x.clone().requires_grad_(True) for _ in range(3)]
        ours = twin(xs[0])
        grads = [torch.autograd.grad((o.double() * g).sum(), xi)[0] for o, xi in
                 ((ours, xs[0]), (norm(xs[1]), xs[1]), (ExactRMS(norm)(xs[2].double()), xs[2]))]
        assert_within_section6(f"dx {x_dtype}", grads[0], grads[2], grads[1], dtype=x_dtype)


class ExactRMS(nn.Module):
    """w * x * rsqrt(mean(x^2) + eps) in x's dtype (the float64 reference)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        w = self.norm.weight.detach().to(x.dtype)
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm.variance_epsilon)


def test_replace_norms_leaves_non_norms_and_meta_modules_alone():
    model = nn.Sequential(nn.Linear(8, 8), _LlamaStyleRMSNorm(8, "promote").to("meta"), nn.Embedding(4, 8))
    fusednorm.replace_norms(model)
    assert [type(m) for m in model] == [nn.Linear, _LlamaStyleRMSNorm, nn.Embedding]
