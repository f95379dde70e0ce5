"""replace_norms on whole torch models (torch.nn.TransformerEncoder, Post-LN and Pre-LN), what it leaves
alone and what it reports; the warnings of admin_init / deepnorm_init_ when they find nothing to act on.

The replaced model must give the original model's outputs and gradients within the DESIGN section-6
bound: against a float64 copy of the model, its error is at most twice the original float32 model's
error plus a small atol. And it must really run fusednorm (torch's encoder has a fused "fast path"
that bypasses the norm modules in inference: replace_norms disables it for the layers it touched).
"""

from __future__ import annotations

import collections
import copy
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusednorm
from fusednorm import testing
from fusednorm.integrations.report import PatchReport

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


class OpCounter(TorchDispatchMode):
    """Counts the aten / fusednorm ops that run (by name), and aten.add on tensors of one given shape."""

    def __init__(self, add_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.adds = 0
        self.add_shape = add_shape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[str(func)] += 1
        if func is torch.ops.aten.add.Tensor and isinstance(out, torch.Tensor) and tuple(out.shape) == self.add_shape:
            self.adds += 1
        return out

    @property
    def norm_calls(self) -> int:
        return self.ops["fusednorm.fwd.default"]


@pytest.mark.usefixtures("torch_function_path")  # the Function path (see tests/conftest.py)
def test_encoder_fast_path_is_disabled_for_swapped_layers():
    """A batch_first encoder in eval under no_grad takes torch's fused fast path, which reads the norms'
    weights and never calls the norm modules; after replace_norms fusednorm's kernels run instead (no hooks
    here: a hook alone would disable the fast path), with the same outputs, and the report says so."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    original = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    replaced = copy.deepcopy(original)
    report = PatchReport()
    fusednorm.replace_norms(replaced, report=report)
    assert [r.name for r in report.of("changed")] == ["layers.0", "layers.1"]
    x = torch.randn(2, 5, D_MODEL, generator=torch.Generator().manual_seed(1)) + 1.0
    with torch.no_grad(), OpCounter() as theirs:
        y_theirs = original(x)
    with torch.no_grad(), OpCounter() as ours:
        y_ours = replaced(x)
    assert theirs.ops["aten._transformer_encoder_layer_fwd.default"] == 2  # the control: the fast path ran
    assert ours.ops["aten._transformer_encoder_layer_fwd.default"] == 0 and ours.norm_calls == 4
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ what replace_norms leaves alone

class UserRMSNorm(nn.Module):
    """A user's own class named *RMSNorm, written as HF writes LlamaRMSNorm, plus a clamp the probe cannot see."""

    def __init__(self, n: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h.to(dtype)).clamp(-50, 50)


def test_a_user_class_is_never_swapped_whatever_its_name(caplog):
    model = nn.Sequential(UserRMSNorm(8), nn.LayerNorm(8))
    report = PatchReport()
    with caplog.at_level(logging.INFO, logger="fusednorm"):
        fusednorm.replace_norms(model, report=report)
    assert type(model[0]) is UserRMSNorm and isinstance(model[1], fusednorm.LayerNorm)
    assert [(r.name, r.action) for r in report.records] == [("0", "left"), ("1", "swapped")]
    assert "a class of your own" in report.left[0].detail
    (line,) = [r for r in caplog.records if r.name == "fusednorm"]
    assert line.levelno == logging.INFO and "swapped 1 (1 LayerNorm)" in line.getMessage()
    assert "left 1 (1 UserRMSNorm)" in line.getMessage()


def test_replace_norms_warns_when_it_finds_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="fusednorm"):
        fusednorm.replace_norms(nn.Sequential(nn.Linear(4, 4)))
    (line,) = [r for r in caplog.records if r.name == "fusednorm"]
    assert line.levelno == logging.WARNING and "nothing found" in line.getMessage()


def test_torchscript_modules_are_left_and_reported():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))
    model = nn.Sequential(scripted, nn.LayerNorm(8))
    report = PatchReport()
    fusednorm.replace_norms(model, report=report)
    assert isinstance(model[1], fusednorm.LayerNorm)
    assert [(r.name, r.action, r.detail) for r in report.left] == [("0.1", "left", "inside a TorchScript module")]
    model(torch.randn(2, 8))  # the scripted part still runs


def test_replace_norms_swaps_meta_norms_keeping_the_meta_parameters():
    """Built on the meta device (before weights exist): swapped; the weights are loaded afterwards."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.RMSNorm(8))
    fusednorm.replace_norms(model)
    assert isinstance(model[1], fusednorm.LayerNorm) and isinstance(model[2], fusednorm.RMSNorm)
    assert model[1].weight.is_meta
    reference = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.RMSNorm(8))
    model.load_state_dict(reference.state_dict(), assign=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- warnings when there is nothing to do

def test_admin_init_warns_when_there_is_no_learned_scale():
    model = nn.Sequential(nn.Linear(4, 4), fusednorm.AddLayerNorm(4))  # residual_scale=None: nothing to set
    with pytest.warns(UserWarning, match="admin_init found no"):
        assert fusednorm.admin_init(model) == []
    with pytest.warns(UserWarning, match="admin_init found no"):
        assert fusednorm.admin_init(model, lambda: None) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model with a learned scale: no warning
        fusednorm.admin_init(nn.Sequential(fusednorm.AddLayerNorm(4, residual_scale="vector")))


def test_deepnorm_init_warns_when_there_is_no_layer():
    with pytest.warns(UserWarning, match="deepnorm_init_ found no"):
        assert fusednorm.deepnorm_init_(nn.Sequential(nn.Linear(4, 4)), beta=0.5) == []
