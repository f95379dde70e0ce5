"""admin_init (profiling rule and closed form) and the DeepNorm helpers, checked against independent computations.

The reference: Transformer-Clinic's adaptive-profiling, omega_i = ratio; ratio = sqrt(Var[residual_i * omega_i]
+ Var[f_i]) with ratio = 1 at the start and Var the population variance of all elements (np.var). Here the
variances are recorded independently by a hand-written forward pass that uses numpy's var, not fusednorm.admin.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _gloo import run_on_ranks
from torch import nn

import fusednorm
from fusednorm.admin import AdminRecord, admin_closed_form, deepnorm_constants, learned_scale_modules
from fusednorm.models import Encoder


def np_var(t: torch.Tensor) -> float:
    return float(np.var(t.detach().double().numpy()))


def manual_admin(model: Encoder, batches: list[torch.Tensor]) -> tuple[list[tuple[str, float, float, float]], list]:
    """Walk the Post-LN encoder by hand on one batch per (simulated) rank, in lockstep, with unfused torch ops.

    At each sublayer: omega = ratio; Var[residual*omega] and Var[f] by numpy, averaged over the batches
    (ranks); ratio = sqrt(sum). Returns the records and the final outputs per batch.
    """
    ratio = 1.0
    records = []
    xs = list(batches)
    for i, layer in enumerate(model.layers):
        sublayers = (("attn_norm", layer.attn, layer.attn_norm), ("ffn_norm", layer.ffn, layer.ffn_norm))
        for sub, branch_fn, norm in sublayers:
            omega = ratio
            omega32 = torch.tensor(omega, dtype=torch.float32)  # the Parameter holds omega in float32
            branches = [branch_fn(x) for x in xs]
            vr = statistics_mean([np_var(x.double() * omega32.double()) for x in xs])
            vf = statistics_mean([np_var(b) for b in branches])
            ratio = math.sqrt(vr + vf)
            records.append((f"layers.{i}.{sub}", vr, vf, omega))
            xs = [F.layer_norm(x * omega32 + b, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
                  for x, b in zip(xs, branches, strict=True)]
    return records, xs


def statistics_mean(v: list[float]) -> float:
    return sum(v) / len(v)


def make_encoder(depth=3, width=32, seed=0, variant="admin", norm="layer"):
    torch.manual_seed(seed)
    return Encoder(depth, width, 4, 2 * width, variant, norm=norm)


def assert_records(got: list[AdminRecord], want, rtol=1e-5):
    assert [r.name for r in got] == [w[0] for w in want]
    for r, (name, vr, vf, omega) in zip(got, want, strict=True):
        assert r.var_residual == pytest.approx(vr, rel=rtol), name
        assert r.var_branch == pytest.approx(vf, rel=rtol), name
        assert r.omega == pytest.approx(omega, rel=rtol), name


def test_admin_init_matches_independent_recording():
    model = make_encoder()
    x = torch.randn(4, 8, 32) * 2 + 0.5
    reference = copy.deepcopy(model)
    records = fusednorm.admin_init(model, lambda: model(x))
    with torch.no_grad():
        want, (out_ref,) = manual_admin(reference, [x])
    assert_records(records, want)
    # Every module ends with the omega of its (only) call, and the profiled model computes the hand-walked output.
    omegas = {name: float(m.residual_scale.detach()[0]) for name, m in learned_scale_modules(model)}
    for name, _, _, omega in want:
        assert omegas[name] == pytest.approx(omega, rel=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_ref, rtol=1e-5, atol=1e-5)
    # omega grows: the running ratio accumulates the branch variances (Post-LN stream has Var ~ 1).
    assert all(b.omega > a.omega for a, b in zip(records, records[1:], strict=False))
    assert records[0].omega == 1.0


def test_admin_init_keeps_parameters_modes_and_hooks():
    model = make_encoder(depth=2)
    model.train()
    model.layers[1].ffn.eval()  # a submodule's own flag must come back as it was
    params = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(2, 4, 32)
    fusednorm.admin_init(model, lambda: model(x))
    assert {name: p for name, p in model.named_parameters()} == params  # same objects
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], model.parameters(), strict=True))
    assert model.training and model.layers[0].training and not model.layers[1].ffn.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())

    def boom():
        model(x)
        raise RuntimeError("user error")

    with pytest.raises(RuntimeError, match="user error"):
        fusednorm.admin_init(model, boom)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert model.training and not model.layers[1].ffn.training


def test_profiling_runs_in_eval_mode_without_dropout():
    torch.manual_seed(0)
    model = Encoder(2, 32, 4, 64, "admin", dropout=0.5, attn_dropout=0.5)
    x = torch.randn(2, 4, 32)
    a = fusednorm.admin_init(model, lambda: model(x))
    b = fusednorm.admin_init(model, lambda: model(x))  # deterministic: no dropout during profiling
    assert [r.var_branch for r in a] == [r.var_branch for r in b]


def test_closed_form():
    # admin-torch calculate_init('O(logn)'): sqrt((N + 1) / ln(N + 1) - 1); e.g. N = 12: 13 / ln 13 - 1 = 4.06833
    assert admin_closed_form(12) == pytest.approx(2.0170092, rel=1e-6)
    assert admin_closed_form(1) == pytest.approx(math.sqrt(2 / math.log(2) - 1))
    model = make_encoder(depth=6)
    records = fusednorm.admin_init(model)
    assert len(records) == 12 and all(math.isnan(r.var_residual) and math.isnan(r.var_branch) for r in records)
    name, var_residual, var_f, omega = records[0]  # a record is a named tuple: it unpacks and indexes too
    assert name == records[0].name and omega == records[0][3] == records[0].omega and math.isnan(records[0].var_f)
    for _, m in learned_scale_modules(model):
        torch.testing.assert_close(m.residual_scale.detach(), torch.full((32,), 2.0170092), rtol=1e-6, atol=0)
    fusednorm.admin_init(model, num_residual_layers=36)
    assert float(model.layers[0].attn_norm.residual_scale.detach()[0]) == pytest.approx(admin_closed_form(36), rel=1e-6)
    with pytest.raises(ValueError):
        admin_closed_form(0)


class TwiceUsed(nn.Module):
    """One learned-scale AddRMSNorm (scalar omega) shared by two sublayers, and a plain one in between."""

    def __init__(self, n=16):
        super().__init__()
        self.f1, self.f2 = nn.Linear(n, n), nn.Linear(n, n)
        self.shared = fusednorm.AddRMSNorm(n, eps=1e-6, residual_scale="scalar")
        self.plain = fusednorm.AddLayerNorm(n)

    def forward(self, x):
        x = self.shared(self.f1(x), x)
        x = self.plain(torch.tanh(x), x)
        return self.shared(self.f2(x), x)


def test_module_used_twice_records_twice():
    torch.manual_seed(1)
    m = TwiceUsed()
    x = torch.randn(3, 5, 16) * 3
    records = fusednorm.admin_init(m, lambda: m(x))
    assert [r.name for r in records] == ["shared", "shared"]
    with torch.no_grad():
        rms = lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * m.shared.weight
        b1 = m.f1(x)
        vr1, vf1 = np_var(x), np_var(b1)
        omega2 = math.sqrt(vr1 + vf1)
        h = rms(x + b1)
        h = m.plain(torch.tanh(h), h)
        b2 = m.f2(h)
        o2 = torch.tensor(omega2, dtype=torch.float32)
        vr2, vf2 = np_var(h.double() * o2.double()), np_var(b2)
    assert_records(records, [("shared", vr1, vf1, 1.0), ("shared", vr2, vf2, omega2)])
    omega = m.shared.residual_scale.detach()
    assert omega.shape == () and float(omega) == pytest.approx(omega2, rel=1e-6)


def test_groups_keep_separate_running_ratios():
    model = make_encoder(depth=4)
    x = torch.randn(2, 4, 32)
    records = fusednorm.admin_init(model, lambda: model(x), group=lambda name: int(name.split(".")[1]) >= 2)
    assert records[0].omega == 1.0 and records[4].omega == 1.0 and records[5].omega > 1.0


def test_no_learned_scale_modules():
    model = make_encoder(depth=2, variant="post")
    assert fusednorm.admin_init(model, lambda: model(torch.randn(1, 2, 32))) == []
    assert fusednorm.admin_init(model) == []


def _admin_init_on_rank(rank: int, batches_path: str) -> list:
    """One rank of the DDP test: the same weights on every rank (same seed), this rank's own batch."""
    torch.manual_seed(0)
    model = Encoder(3, 32, 4, 64, "admin")
    x = torch.load(batches_path)[rank]
    return [[r.name, r.var_residual, r.var_branch, r.omega] for r in fusednorm.admin_init(model, lambda: model(x))]


def test_ddp_averages_variances_over_ranks(tmp_path):
    """Two gloo ranks with different batches set the same omegas: those of the rank-averaged variances."""
    torch.manual_seed(0)
    reference = Encoder(3, 32, 4, 64, "admin")  # the workers build the same weights from the same seed
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 6, 32, generator=gen), torch.randn(3, 6, 32, generator=gen) * 3 + 1]
    torch.save(batches, tmp_path / "batches.pt")
    got = run_on_ranks(_admin_init_on_rank, (str(tmp_path / "batches.pt"),), tmp_path)
    assert got[0] == got[1]
    with torch.no_grad():
        want, _ = manual_admin(reference, batches)
    assert_records([AdminRecord(*r) for r in got[0]], want)
    # ... and they differ from what either rank alone would have set.
    with torch.no_grad():
        alone, _ = manual_admin(reference, batches[:1])
    assert abs(alone[-1][3] - want[-1][3]) > 1e-3


def test_deepnorm_constants():
    n, m = 6, 12
    # Wang et al. 2022 (DeepNet), Figure 2 / Table 1.
    assert deepnorm_constants(encoder_layers=n) == {"encoder": pytest.approx((12 ** 0.25, 48 ** -0.25))}
    assert deepnorm_constants(decoder_layers=m) == {"decoder": pytest.approx((24 ** 0.25, 96 ** -0.25))}
    both = deepnorm_constants(n, m)
    assert both["encoder"] == pytest.approx((0.81 * math.exp((4 * math.log(n) + math.log(m)) / 16),
                                             0.87 * math.exp(-(4 * math.log(n) + math.log(m)) / 16)))
    assert both["decoder"] == pytest.approx((36 ** 0.25, 144 ** -0.25))
    assert deepnorm_constants(decoder_layers=100)["decoder"][0] == pytest.approx(200 ** 0.25)  # DESIGN section 3
    with pytest.raises(ValueError):
        deepnorm_constants(0, 0)


def test_deepnorm_encoder_uses_alpha_and_beta():
    torch.manual_seed(0)
    depth, d = 8, 256
    model = Encoder(depth, d, 4, d, "deepnorm")
    alpha, beta = deepnorm_constants(encoder_layers=depth)["encoder"]
    xavier = math.sqrt(2.0 / (d + d))
    for layer in model.layers:
        assert layer.attn_norm.scale_constant == pytest.approx(alpha)
        assert layer.ffn_norm.scale_constant == pytest.approx(alpha)
        assert layer.attn_norm.residual_scale is None
        for lin in (layer.attn.v_proj, layer.attn.out_proj, layer.ffn.fc1, layer.ffn.fc2):
            assert float(lin.weight.detach().std()) == pytest.approx(beta * xavier, rel=0.05)
            assert float(lin.bias.detach().abs().max()) == 0.0
        for lin in (layer.attn.q_proj, layer.attn.k_proj):
            assert float(lin.weight.detach().std()) == pytest.approx(xavier, rel=0.05)
    # The layer computes LN(alpha * x + f(x)).
    layer = model.layers[0]
    x = torch.randn(2, 3, d)
    with torch.no_grad():
        h = F.layer_norm(alpha * x + layer.attn(x), (d,), layer.attn_norm.weight, layer.attn_norm.bias, 1e-5)
        want = F.layer_norm(alpha * h + layer.ffn(h), (d,), layer.ffn_norm.weight, layer.ffn_norm.bias, 1e-5)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
