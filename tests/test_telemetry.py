"""Telemetry (DESIGN section 7): the forward's row statistics on every backend, and fusednorm.monitor.

- The flag: Variant.store_stats is bit 10 of the flag word and changes no other fact of the variant.
- Row statistics: every backend here (torch, triton in the interpreter, in one pass and in chunks, the CUDA
  kernels in the CPU emulation) writes, per row, the mean and M2 of f = dropout(x), of residual * s and of
  h, max|h| and the number of non-finite h values; each is checked against a float64 recomputation from
  the inputs (DESIGN section 6's bound: twice the error of the same statistic computed by torch in
  float32, plus a small atol), with NaN and Inf rows; y, h, mean and rstd keep their bits with the flag on.
- The monitor: each record of an Add*Norm call (beta, rms of stream and branch, max|h|, non-finite rows,
  variances) against float64 statistics of the module's inputs over all elements, on every backend; no
  host synchronization inside a monitored training step; CSV and plot.
"""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch
from _cuda_emulation import install_as_cuda
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusednorm
from fusednorm import backends
from fusednorm.backends.contract import STATS_COLUMNS, ForwardArgs
from fusednorm.dropout import dropout_keep_mask
from fusednorm.monitor import CALL_FIELDS, Monitor, Record, call_statistics, plot_beta
from fusednorm.variant import FLAG_BITS, ScaleKind, Variant, all_variants

BACKENDS = ["torch", "triton", "triton-chunked", "cuda-emulated"]


@pytest.fixture
def backend(request, monkeypatch):
    """A backend name for the public API, and its module for the contract's forward."""
    name = request.param
    if name == "cuda-emulated":
        install_as_cuda(monkeypatch)
        return "cuda"
    if name.startswith("triton"):
        pytest.importorskip("triton")
        if name == "triton-chunked":
            from fusednorm.triton import heuristics

            monkeypatch.setattr(heuristics, "MAX_BLOCK_N", 16)  # rows of > 16 columns go in chunks
        return "triton"
    return name


# ---- the flag ------------------------------------------------------------------------------------------

def test_store_stats_is_bit_10_and_changes_nothing_else():
    assert FLAG_BITS["store_stats"] == 10
    for v in all_variants():
        on = dataclasses.replace(v, store_stats=True)
        assert on.flags == v.flags | 1 << 10 and Variant.from_flags(on.flags) == on
        assert on.name == (v.name[:-1] + ",stats]" if v.name.endswith("]") else v.name + "[stats]")
        assert (on.saved, on.store_h, on.store_dresidual, on.dresidual_is_dx) == (
            v.saved, v.store_h, v.store_dresidual, v.dresidual_is_dx)
        for direction in ("fwd", "bwd"):
            assert on.row_tensors(direction) == v.row_tensors(direction)
            assert on.bytes_per_element(direction) == v.bytes_per_element(direction)
        assert on.triton_backward_flags(True) == v.triton_backward_flags(True)  # the same backward kernel
        assert on.triton_forward_flags() == dict(v.triton_forward_flags(), STORE_STATS=True)
        assert not v.store_stats and not v.triton_forward_flags()["STORE_STATS"]


# ---- row statistics against float64 ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StatsCase:
    op: str  # "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"
    shape: tuple[int, int]
    dtype: torch.dtype
    scale: str | float | None = None  # None, a float, "scalar", "vector"
    prenorm: bool = False
    residual_f32: bool = False
    dropout_p: float = 0.0
    poison: bool = False  # a NaN in one row of x and an Inf in another

    def variant(self) -> Variant:
        residual = self.op.startswith("add_")
        kind = {None: ScaleKind.NONE, "scalar": ScaleKind.SCALAR, "vector": ScaleKind.VECTOR}.get(
            self.scale, ScaleKind.CONSTANT)
        return Variant.from_call(
            is_rms="rms" in self.op, x_dtype=self.dtype,
            residual_dtype=(torch.float32 if self.residual_f32 else self.dtype) if residual else None,
            scale_kind=kind, dropout_p=self.dropout_p, prenorm=self.prenorm, residual_in_fp32=self.residual_f32,
            has_weight=True, has_bias="layer" in self.op, store_stats=True)

    def args(self, seed: int) -> ForwardArgs:
        gen = torch.Generator().manual_seed(seed)
        m, n = self.shape
        v = self.variant()
        # A per-row offset far from 0 against the spread (DESIGN section 6: E[v^2] - E[v]^2 would cancel), and a
        # stream larger than the branch, as in a deep Post-LN.
        x = (torch.randn(m, n, generator=gen) + 20 + torch.randn(m, 1, generator=gen) * 10).to(self.dtype)
        if self.poison:
            x[1, n // 2] = float("nan")
            x[m - 1, 0] = float("inf")
        residual = None
        if v.has_residual:
            residual = (torch.randn(m, n, generator=gen) * 4 - 2).to(v.residual_dtype(self.dtype))
        scale_tensor = None
        if self.scale == "vector":
            scale_tensor = (torch.rand(n, generator=gen) + 0.5).to(self.dtype)
        elif self.scale == "scalar":
            scale_tensor = torch.tensor(1.7, dtype=torch.float32)
        return ForwardArgs(
            x=x, residual=residual, weight=torch.randn(n, generator=gen).to(self.dtype),
            bias=torch.randn(n, generator=gen).to(self.dtype) if v.has_bias else None, residual_scale=scale_tensor,
            seed=torch.tensor([1234 + seed]) if v.has_dropout else None,
            scale_value=float(self.scale) if v.scale_kind == ScaleKind.CONSTANT else 1.0, dropout_p=self.dropout_p)


def _row_stats(branch: torch.Tensor, stream: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The eight columns computed plainly in the dtype of the arguments (float64: the reference)."""
    def moments(v):
        mean = v.mean(-1)
        return mean, (v - mean[:, None]).square().sum(-1)

    magnitude = h.abs()
    largest = torch.where(torch.isnan(magnitude), 0.0, magnitude).amax(-1)
    return torch.stack([*moments(branch), *moments(stream), *moments(h), largest,
                        (~torch.isfinite(h)).sum(-1).to(h.dtype)], -1)


def _reference(case: StatsCase, args: ForwardArgs, dtype: torch.dtype) -> torch.Tensor:
    """The row statistics from the inputs, computed in ``dtype`` (float64: the reference; float32: torch's
    own low-precision computation). h is rounded to its stored dtype when the variant stores it."""
    v = case.variant()
    m, n = args.x.shape
    branch = args.x.to(dtype)
    if v.has_dropout:
        keep = dropout_keep_mask(args.seed, m, n, args.dropout_p)
        branch = branch * keep.to(dtype) / (1.0 - args.dropout_p)
    stream = torch.zeros_like(branch)
    if v.has_residual:
        s = args.residual_scale.to(dtype) if args.residual_scale is not None else args.scale_value
        stream = args.residual.to(dtype) * s
    h = stream + branch
    if v.store_h:
        h = h.to(torch.float32).to(v.h_dtype(case.dtype)).to(dtype)
    return _row_stats(branch, stream, h)


def _assert_stats_close(case: StatsCase, got: torch.Tensor, args: ForwardArgs) -> None:
    """DESIGN section 6 per entry: |got - ref| <= 2 |torch32 - ref| + atol, non-finite exactly where the
    reference is; the non-finite counts exactly."""
    ref = _reference(case, args, torch.float64)
    torch32 = _reference(case, args, torch.float32).double()
    got = got.double()
    assert got.shape == ref.shape == (case.shape[0], len(STATS_COLUMNS))
    n = case.shape[1]
    # atol: 1e-6 of the values' magnitude (means, max|h|), 1e-5 of M2 itself (not of the sum of squares, which
    # would let a one-pass E[v^2] - E[v]^2 through).
    typical = torch.stack([(ref[:, 2 * k + 1] / n + ref[:, 2 * k].square()).sqrt() for k in range(3)], -1)
    atol = torch.stack([1e-6 * typical[:, 0], 1e-5 * ref[:, 1], 1e-6 * typical[:, 1], 1e-5 * ref[:, 3],
                        1e-6 * typical[:, 2], 1e-5 * ref[:, 5], 1e-6 * ref[:, 6], torch.zeros_like(ref[:, 6])],
                       -1).nan_to_num(0.0, 0.0, 0.0)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), finite), (got, ref)
    err = (got - ref).abs().where(finite, 0.0)
    bound = 2 * (torch32 - ref).abs().where(finite, 0.0) + atol
    bad = err > bound
    assert not bad.any(), [(STATS_COLUMNS[c], r, float(got[r, c]), float(ref[r, c]), float(bound[r, c]))
                           for r, c in bad.nonzero().tolist()]
    assert torch.equal(got[:, 7], ref[:, 7])  # counts: exact


CASES = [
    StatsCase("add_layer_norm", (6, 64), torch.bfloat16, "vector"),  # Admin, Post-LN: h not stored
    StatsCase("add_rms_norm", (5, 40), torch.float16, None, poison=True),  # stored, rounded h; NaN and Inf rows
    StatsCase("add_layer_norm", (4, 37), torch.float32, 1.5, prenorm=True, dropout_p=0.25),  # DeepNorm, dropout
    StatsCase("add_layer_norm", (4, 48), torch.bfloat16, "scalar", prenorm=True, residual_f32=True),  # f32 stream
    StatsCase("layer_norm", (3, 33), torch.float32),  # no residual: the stream columns are 0
    StatsCase("rms_norm", (3, 1), torch.float64),  # N = 1, float64 x (float32 statistics)
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.variant().name}-{str(c.dtype)[6:]}-{c.shape[1]}")
def test_row_statistics_match_float64_and_change_no_other_output(case, backend):
    args = case.args(seed=CASES.index(case))
    impl = backends.implementation(backend)
    on = impl.forward(case.variant(), args)
    _assert_stats_close(case, on.stats, args)
    off = impl.forward(dataclasses.replace(case.variant(), store_stats=False), args)
    assert off.stats.shape == (0,)
    for name in ("y", "h", "mean", "rstd"):
        a, b = getattr(on, name), getattr(off, name)
        assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), name


@pytest.mark.parametrize("backend", ["torch", "cuda-emulated"], indirect=True)
def test_row_statistics_of_rows_wider_than_the_registers(backend):
    """The CUDA kernels walk float32 rows of more than 8192 columns in chunks (triton-chunked covers Triton)."""
    case = StatsCase("add_layer_norm", (2, 9000), torch.float32, "vector", prenorm=True, dropout_p=0.25)
    args = case.args(seed=7)
    _assert_stats_close(case, backends.implementation(backend).forward(case.variant(), args).stats, args)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_no_rows(backend):
    case = StatsCase("add_layer_norm", (0, 16), torch.float32, "vector")
    v = case.variant()
    x = torch.empty(0, 16)
    out = backends.implementation(backend).forward(v, ForwardArgs(x=x, residual=x, weight=torch.ones(16),
                                                         bias=torch.zeros(16), residual_scale=torch.ones(16)))
    assert out.stats.shape == (0, len(STATS_COLUMNS))
    values = call_statistics(out.stats, 16)
    assert values[CALL_FIELDS.index("rows")] == 0 and values[CALL_FIELDS.index("nonfinite_rows")] == 0


def test_call_statistics_merge_rows_exactly():
    """Chan's merge of per-row (mean, M2) equals the population statistics of the whole call, even for rows
    whose means differ by far more than their spread (where E[v^2] - E[v]^2 would cancel)."""
    gen = torch.Generator().manual_seed(0)
    m, n = 7, 50
    branch = torch.randn(m, n, generator=gen, dtype=torch.float64) * 1e-2 + torch.arange(m)[:, None] * 1e3
    stream = torch.randn(m, n, generator=gen, dtype=torch.float64) * 3 - 1
    h = branch + stream
    h[2, 5] = float("inf")
    values = dict(zip(CALL_FIELDS, call_statistics(_row_stats(branch, stream, h), n).tolist(), strict=True))
    finite = h[torch.isfinite(h).all(-1)]
    assert values["var_branch"] == pytest.approx(branch.var(correction=0).item(), rel=1e-12)
    assert values["var_stream"] == pytest.approx(stream.var(correction=0).item(), rel=1e-12)
    assert math.isnan(values["var_h"]) and finite.shape[0] == m - 1  # the Inf row makes Var[h] non-finite
    assert values["rms_branch"] == pytest.approx(branch.square().mean().sqrt().item(), rel=1e-12)
    assert values["rms_stream"] == pytest.approx(stream.square().mean().sqrt().item(), rel=1e-12)
    assert values["max_abs_h"] == math.inf and values["nonfinite_rows"] == 1 and values["rows"] == m


# ---- the monitor ---------------------------------------------------------------------------------------

class Net(nn.Module):
    """Three kinds of Add*Norm call: Admin's learned vector scale, a Pre-LN RMSNorm whose first call has
    no residual, and one module called twice (a DeepNorm-like constant scale)."""

    def __init__(self, n: int = 32):
        super().__init__()
        self.f1, self.f2, self.f3 = nn.Linear(n, n), nn.Linear(n, n), nn.Linear(n, n)
        self.admin = fusednorm.AddLayerNorm(n, residual_scale="vector")
        self.pre = fusednorm.AddRMSNorm(n, prenorm=True)
        self.shared = fusednorm.AddLayerNorm(n, residual_scale=1.3)
        with torch.no_grad():
            self.admin.residual_scale.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.admin(self.f1(x), x)
        y, h = self.pre(self.f2(x), None)
        y, h = self.pre(torch.tanh(y), h)
        x = self.shared(self.f3(y), h)
        return self.shared(torch.relu(x), x)


def _inputs_of_each_call(model: nn.Module) -> list:
    """Hooks that record (name, x, residual, s) of every Add*Norm call, in order."""
    calls = []
    for name, m in model.named_modules():
        if isinstance(m, (fusednorm.AddLayerNorm, fusednorm.AddRMSNorm)):
            def hook(module, args, name=name):
                scale = module.residual_scale if module.residual_scale is not None else module.scale_constant
                calls.append((name, args[0].detach().clone(), None if args[1] is None else args[1].detach().clone(),
                              1.0 if scale is None else scale.detach().clone() if torch.is_tensor(scale) else scale))
            m.register_forward_pre_hook(hook)
    return calls


def _expected(x: torch.Tensor, residual: torch.Tensor | None, scale) -> dict:
    """Float64 population statistics over all elements of one call (np.var of the whole tensors)."""
    f = x.double()
    stream = residual.double() * (scale.double() if torch.is_tensor(scale) else scale) if residual is not None \
        else torch.zeros_like(f)
    h = stream + f
    rows = h.reshape(-1, h.shape[-1])
    var = {name: t.var(correction=0).item() for name, t in (("stream", stream), ("branch", f), ("h", h))}
    return dict(beta=var["branch"] / var["h"], rms_stream=stream.square().mean().sqrt().item(),
                rms_branch=f.square().mean().sqrt().item(), max_abs_h=h.abs().nan_to_num(0.0, math.inf).max().item(),
                nonfinite_rows=int((~torch.isfinite(rows)).any(-1).sum()), var_stream=var["stream"],
                var_branch=var["branch"], var_h=var["h"], rows=rows.shape[0])


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda-emulated"], indirect=True)
def test_monitor_records_match_float64_statistics_of_the_module_inputs(backend):
    torch.manual_seed(0)
    model = Net().eval()
    fusednorm.set_backend(backend)
    calls = _inputs_of_each_call(model)
    x = torch.randn(3, 5, 32) * 2 + 1
    bad = x.clone()
    bad[1, 2, 7] = float("nan")  # a NaN in one row: every call downstream sees it in that row only
    with fusednorm.monitor(model) as mon, torch.no_grad():
        model(x)
        assert not mon.nonfinite()
        mon.step()
        model(bad)
        assert mon.nonfinite()
    records = mon.records()
    assert [(r.step, r.name) for r in records] == [(s, c[0]) for s in (0, 1) for c in calls[:5]]
    assert len(calls) == 10
    for record, (name, xs, residual, scale) in zip(records, calls, strict=True):
        want = _expected(xs, residual, scale)
        for field in CALL_FIELDS:
            got = getattr(record, field)
            if field in ("nonfinite_rows", "rows"):
                assert got == want[field], (name, field)
            elif math.isfinite(want[field]) or record.step == 0:
                assert got == pytest.approx(want[field], rel=2e-5, abs=1e-6), (record.step, name, field)
            else:
                assert not math.isfinite(got), (name, field)
    assert [r.nonfinite_rows for r in records[5:]] == [1, 1, 1, 1, 1]
    assert records[1].rms_stream == 0.0 and records[1].beta == pytest.approx(1.0)  # Pre-LN's first call: h = f


def test_monitor_cost_is_nothing_when_inactive_and_hooks_are_removed(torch_function_path):
    # torch_function_path: every call through fusednorm::fwd, whose flags the mode reads (the CPU path's
    # unmonitored calls would run ATen's ops instead)
    model = Net()
    seen = []

    class Flags(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.fusednorm.fwd.default:
                seen.append(args[6])
            return func(*args, **(kwargs or {}))

    with Flags():
        model(torch.randn(2, 32))
        with fusednorm.monitor(model):
            model(torch.randn(2, 32))
        model(torch.randn(2, 32))
    stats_bit = 1 << FLAG_BITS["store_stats"]
    assert [bool(w & stats_bit) for w in seen] == [False] * 5 + [True] * 5 + [False] * 5
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no fusednorm AddLayerNorm"):
        fusednorm.monitor(nn.Linear(2, 2))


SYNCING_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.nonzero.default}


class SyncSpy(TorchDispatchMode):
    """Records the aten ops that make the host wait for the device (item, bool(), nonzero, device copies)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS or (func is torch.ops.aten._to_copy.default and "device" in kwargs):
            self.syncs.append(func)
        return func(*args, **kwargs)


def test_monitored_training_step_never_syncs_with_the_host():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    x, target = torch.randn(4, 6, 32), torch.randn(4, 6, 32)
    with fusednorm.monitor(model) as mon:
        with SyncSpy() as spy:
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.found_inf = (mon.nonfinite() | ~torch.isfinite(loss)).float()
            opt.step()
            del opt.found_inf
            mon.step()
        assert spy.syncs == []
        with SyncSpy() as control:  # the spy itself sees a sync: reading a value
            float(mon.latest()[0])
        assert control.syncs
    assert len(mon.records()) == 5


def test_csv_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model = Net()
    with fusednorm.monitor(model) as mon:
        for _ in range(3):
            model(torch.randn(2, 32))
            mon.step()
    mon.write_csv(tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(Record._fields) and len(rows) == 15
    assert [int(r["step"]) for r in rows] == [s for s in range(3) for _ in range(5)]
    assert float(rows[0]["beta"]) == pytest.approx(mon.records()[0].beta)
    ax = plot_beta(mon.records(), tmp_path / "beta.png")
    assert (tmp_path / "beta.png").stat().st_size > 0 and len(ax.lines) == 5  # one line per call of a step
    assert [list(line.get_ydata()) for line in mon.plot_beta().lines] == [list(line.get_ydata()) for line in ax.lines]
    mon.clear()
    assert mon.records() == [] and not mon.nonfinite()
    assert isinstance(mon, Monitor)
