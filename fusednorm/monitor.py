"""Training-stability telemetry from the fused kernels (DESIGN section 7): ``fusednorm.monitor(model)``.

Every AddLayerNorm / AddRMSNorm call already reads the branch f (its ``x``, after dropout) and the residual
stream, and reduces h = residual * s + f over each row. While a monitor is active, those calls ask the
forward kernels for eight float32 values per row (``backends.contract.STATS_COLUMNS``: mean and M2 of f, of
residual * s and of h, max|h|, the count of non-finite h values), no extra pass over (M, N), and the monitor
merges the rows of each call on the device, in float64 with Chan's formula, into population statistics over
all elements of the call (the variances admin_init measures, ``np.var`` of the whole tensor):

    beta         Var[f] / Var[h]: how much the call's output depends on its own branch (Admin's
                 dependency ratio; Post-LN ~1 at every layer, Admin and Pre-LN ~1/i at layer i)
    rms_stream   sqrt(E[(residual * s)^2]), rms_branch sqrt(E[f^2])
    max_abs_h    max |h| (NaN ignored)
    nonfinite_rows  rows of h holding a NaN or an Inf

    with fusednorm.monitor(model) as mon:
        for batch in loader:
            loss = model(batch) ...
            skip = mon.nonfinite()       # 0-d bool on the device: no host sync
            ...
            mon.step()                   # the next calls belong to the next step
    mon.records()                        # one Record per call, in execution order (reading syncs)
    mon.write_csv("telemetry.csv"); mon.plot_beta("beta.png")   # or fusednorm.monitor's plot_beta(records)

Nothing is read back to the host until ``records()``: the per-call statistics stay device tensors. Without
an active monitor the kernels are the ones without the flag (the functional layer reads one context
variable per call). Calls inside torch.compile'd code are not monitored (they run without the flag).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .backends.contract import STATS_COLUMNS
from .functional import stats_sink
from .modules import AddLayerNorm, AddRMSNorm

__all__ = ["CALL_FIELDS", "Monitor", "Record", "call_statistics", "monitor", "plot_beta"]

# The per-call values, in the order of ``call_statistics``' result.
CALL_FIELDS = ("beta", "rms_stream", "rms_branch", "max_abs_h", "nonfinite_rows", "var_stream", "var_branch",
               "var_h", "rows")
# call_statistics slices the row statistics by position: means at 0, 2, 4 and M2s at 1, 3, 5.
assert STATS_COLUMNS[:6] == ("mean_branch", "m2_branch", "mean_stream", "m2_stream", "mean_h", "m2_h")
_MAX_ABS_H, _NONFINITE_H = STATS_COLUMNS.index("max_abs_h"), STATS_COLUMNS.index("nonfinite_h")


class Record(NamedTuple):
    """One monitored Add*Norm call: the step it belongs to, the module's qualified name, then CALL_FIELDS.

    Population statistics over all elements of the call (rows x N), f the branch after dropout, s the
    residual scale: beta = Var[f] / Var[h], rms_stream = sqrt(E[(residual * s)^2]), rms_branch =
    sqrt(E[f^2]), max_abs_h = max |h| (NaN ignored), nonfinite_rows = rows of h with a NaN/Inf,
    var_stream = Var[residual * s] (0 without a residual), var_branch = Var[f], var_h = Var[h], rows = M.
    """

    step: int
    name: str
    beta: float
    rms_stream: float
    rms_branch: float
    max_abs_h: float
    nonfinite_rows: int
    var_stream: float
    var_branch: float
    var_h: float
    rows: int


def call_statistics(stats: Tensor, cols: int) -> Tensor:
    """The CALL_FIELDS of one call from its (M, 8) float32 row statistics (rows of ``cols`` values).

    Rows are merged in float64 with Chan's formula for equal counts: mean = mean of the row means,
    M2 = sum of the row M2s + cols * sum((row mean - mean)^2); Var = M2 / (M * cols). Device ops only (no
    host sync); returns a (len(CALL_FIELDS),) float64 tensor on stats' device (NaN statistics for M = 0).
    """
    s = stats.detach().to(torch.float64)
    rows = s.shape[0]
    if rows == 0:
        values = torch.full((len(CALL_FIELDS),), math.nan, dtype=torch.float64, device=s.device)
        values[CALL_FIELDS.index("nonfinite_rows")] = 0.0
        values[CALL_FIELDS.index("rows")] = 0.0
        return values
    means, m2 = s[:, 0:6:2], s[:, 1:6:2]  # (M, 3) each: branch, stream, h
    grand_mean = means.mean(0)
    var = (m2.sum(0) + cols * (means - grand_mean).square().sum(0)) / (rows * cols)
    var_branch, var_stream, var_h = var.unbind()
    mean_branch, mean_stream, _ = grand_mean.unbind()
    return torch.stack([
        var_branch / var_h,
        (var_stream + mean_stream.square()).sqrt(),
        (var_branch + mean_branch.square()).sqrt(),
        s[:, _MAX_ABS_H].amax(),
        (s[:, _NONFINITE_H] > 0).sum().to(torch.float64),
        var_stream, var_branch, var_h,
        torch.full((), float(rows), dtype=torch.float64, device=s.device),  # a fill, not a host-to-device copy
    ])


class Monitor:
    """Collects the telemetry of every AddLayerNorm/AddRMSNorm call inside ``model`` while active (``with``).

    ``modules``: (name, module) pairs to watch instead of every Add*Norm of the model (names as in
    ``model.named_modules()``). A module called twice per step gives two records.
    """

    def __init__(self, model: nn.Module, modules: Iterable[tuple[str, nn.Module]] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if modules is None:
            modules = [(name, m) for name, m in model.named_modules() if isinstance(m, (AddLayerNorm, AddRMSNorm))]
        self._modules = list(modules)
        if not self._modules:
            raise ValueError("model has no fusednorm AddLayerNorm / AddRMSNorm module to monitor")
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._step = 0
        self._calls: list[tuple[int, str, Tensor]] = []  # (step, name, CALL_FIELDS values on the device)
        self._first_of_step = 0  # index in _calls of the current step's first call
        self._handles: list = []
        self._tokens: list = []

    # -- activation ----------------------------------------------------------------------------

    def __enter__(self) -> Monitor:
        if self._handles:
            raise RuntimeError("this monitor is already active")
        for name, module in self._modules:
            sink = partial(self._collect, name)
            self._handles.append(module.register_forward_pre_hook(partial(self._ask, sink)))
            self._handles.append(module.register_forward_hook(self._stop, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._tokens:
            stats_sink.reset(self._tokens.pop())

    def _ask(self, sink, module, args) -> None:
        self._tokens.append(stats_sink.set(sink))

    def _stop(self, module, args, output) -> None:
        if self._tokens:
            stats_sink.reset(self._tokens.pop())

    def _collect(self, name: str, stats: Tensor, cols: int) -> None:
        if hasattr(stats, "to_local"):  # a DTensor: this rank's rows
            stats = stats.to_local()
        self._calls.append((self._step, name, call_statistics(stats, cols)))

    # -- steps and results -----------------------------------------------------------------------

    def step(self) -> None:
        """Closes the current step: the following calls belong to the next one (``nonfinite`` restarts)."""
        self._step += 1
        self._first_of_step = len(self._calls)

    def nonfinite(self) -> Tensor:
        """0-d bool tensor on the model's device: did a monitored call of the current step see a NaN or Inf
        in h? No host sync (see the README's skip-step recipe)."""
        current = [values for _, _, values in self._calls[self._first_of_step:]]
        if not current:
            return torch.zeros((), dtype=torch.bool, device=self._device)
        counts = torch.stack(current)[:, CALL_FIELDS.index("nonfinite_rows")]
        return (counts > 0).any().to(self._device)

    def latest(self) -> Tensor:
        """The CALL_FIELDS of the last monitored call, as a device tensor (no sync)."""
        if not self._calls:
            raise RuntimeError("no monitored call yet")
        return self._calls[-1][2]

    def records(self) -> list[Record]:
        """One Record per monitored call so far, in execution order (one host sync)."""
        if not self._calls:
            return []
        device = self._calls[0][2].device
        values = torch.stack([v.to(device) for _, _, v in self._calls]).cpu().tolist()  # one copy to the host
        out = []
        for (step, name, _), row in zip(self._calls, values, strict=True):
            fields = dict(zip(CALL_FIELDS, row, strict=True))
            fields["nonfinite_rows"], fields["rows"] = int(fields["nonfinite_rows"]), int(fields["rows"])
            out.append(Record(step=step, name=name, **fields))
        return out

    def clear(self) -> None:
        """Forgets the calls recorded so far (the step counter keeps counting)."""
        self._calls.clear()
        self._first_of_step = 0

    def write_csv(self, path: str | Path) -> None:
        """The records as CSV rows (header: Record's fields)."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(Record._fields)
            writer.writerows(self.records())

    def plot_beta(self, path: str | Path | None = None, ax=None, title: str | None = None):
        """``plot_beta`` of this monitor's records (beta per call over steps); returns the Axes."""
        return plot_beta(self.records(), path, ax, title)


def monitor(model: nn.Module, modules: Iterable[tuple[str, nn.Module]] | None = None) -> Monitor:
    """A ``Monitor`` of ``model``'s Add*Norm calls; use it as a context manager (see the module docstring)."""
    return Monitor(model, modules)


def plot_beta(records: list[Record], path: str | Path | None = None, ax=None, title: str | None = None):
    """beta per call over steps: one line per (module, call in its step), coloured by execution order.

    records: ``Monitor.records()`` (or Records read back from a CSV). Draws on ``ax`` (a matplotlib Axes) or a
    new figure, saved to ``path`` if given. Returns the Axes. Needs matplotlib.
    """
    import matplotlib
    from matplotlib.figure import Figure

    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    seen: dict[tuple[int, str], int] = {}
    for r in records:
        k = seen[r.step, r.name] = seen.get((r.step, r.name), -1) + 1
        series.setdefault((r.name, k), []).append((r.step, r.beta))
    own_figure = ax is None
    if own_figure:
        ax = Figure(figsize=(7, 4.3)).subplots()  # no pyplot: no GUI backend involved
    colors = matplotlib.colormaps["viridis"]
    for i, ((name, _), points) in enumerate(series.items()):
        steps, betas = zip(*points, strict=True)
        ax.plot(steps, betas, color=colors(i / max(1, len(series) - 1)), lw=1.2,
                label=name if i in (0, len(series) - 1) else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("beta = Var[f] / Var[h]")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(title="first / last call", fontsize=8)
    if title:
        ax.set_title(title)
    if own_figure and path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax
