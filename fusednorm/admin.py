"""Admin initialization (Liu et al. 2020, arXiv 2004.08249) and DeepNorm constants (Wang et al. 2022).

Admin: a Post-LN sublayer computes ``x_i = LN(x_{i-1} * omega_i + f_i(x_{i-1}))``. With omega = 1 (plain
Post-LN) every layer depends on its own branch about as much as on everything below it, so a small
change of the weights changes the output by O(L) and deep Post-LN Transformers diverge early in
training without warmup. Admin sets omega_i so that layer i's dependence on its own branch is ~1/i.

The rule, as the reference code implements it (Transformer-Clinic, ``--init-type adaptive-profiling``,
``fairseq/modules/transformer_layer.py``; checked against that source): one forward pass on a real
batch, in execution order, with a running ``ratio`` that starts at 1::

    omega_i = ratio                                   # set first: used for this very call
    ratio   = sqrt(Var[residual_i * omega_i] + Var[f_i])

where ``residual_i`` is the stream entering sublayer i (the residual argument of the Add*Norm module),
``f_i`` its branch output (the ``x`` argument), and ``Var`` is the *population variance of all elements
of the tensor* (the reference flattens the whole (T, B, C) tensor and calls ``np.var``, ddof = 0): one
number per tensor, not a per-feature variance. omega is then written into every entry of the
learned ``residual_scale`` (a vector in the reference: one value filled into all features).

The variances come from the fused kernels themselves, through ``fusednorm.monitor``: the profiled calls
run with the telemetry flag and their per-row (mean, M2) of residual * omega and of f, computed in
float32, are merged over the call in float64 (one code path for Admin's numbers and the monitor's beta).

Since the stream is a LayerNorm output, Var[residual_i] ~ 1 after the first sublayer, so ``ratio**2``
accumulates ``sum_{j<=i} Var[f_j]`` plus the stream's own variance: the paper's
``omega_i = sqrt(sum_{j<i} Var[f_j])`` up to that measured stream term.

Where fusednorm differs from the reference (deliberately, documented):

- The profiling pass runs with the model in eval mode (no dropout), so Var[f] is the variance of the
  branch itself; the reference profiles in training mode, where dropout inflates Var[f] by about
  1/(1-p). Each module's training flag is restored afterwards.
- The reference keeps one running ratio for the encoder and a separate one for the decoder;
  ``group`` (a function of the module's qualified name) gives that behaviour; by default all
  learned-scale modules share one running ratio in execution order.
- Under torch.distributed (DDP), each rank measures its own batch and the two variances are averaged
  over ranks (all_reduce) before omega is set, so every rank sets the same omega. The reference
  profiles on one GPU only.

Without a batch (``run_forward=None``) the closed form of admin-torch (``calculate_init``,
'O(logn)' output change) is used: ``omega = sqrt((N + 1) / ln(N + 1) - 1)`` for N residual branches
(a typical L-layer encoder has N = 2L), the same value for every module.

DeepNorm: ``x_{i} = LN(alpha * x_{i-1} + f_i(x_{i-1}))`` with a constant alpha (an ``AddLayerNorm`` with
``residual_scale=alpha``) and the branch weights (FFN, attention value and output projections; not
queries/keys) initialised with Xavier-normal gain beta. See :func:`deepnorm_constants`; the re-initialisation of
the reference encoder's weights, ``deepnorm_init_``, lives with that encoder in ``fusednorm.models``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .modules import AddLayerNorm, AddRMSNorm
from .monitor import CALL_FIELDS, Monitor

__all__ = ["AdminRecord", "admin_closed_form", "admin_init", "deepnorm_constants", "learned_scale_modules"]


class AdminRecord(NamedTuple):
    """One Add*Norm call seen by :func:`admin_init`; a named tuple ``(name, var_residual, var_branch, omega)``.

    name: qualified module name in ``model.named_modules()``; var_residual: Var[residual * omega] (population
    variance of all elements, float); var_branch: Var[f] (the module's ``x`` argument); omega: the value
    written into ``residual_scale`` before this call. The variances are NaN for the closed form.
    """

    name: str
    var_residual: float
    var_branch: float
    omega: float

    @property
    def var_f(self) -> float:
        """Var[f], DESIGN section 3's name for ``var_branch``."""
        return self.var_branch


def learned_scale_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every AddLayerNorm/AddRMSNorm in ``model`` with a learned residual_scale."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (AddLayerNorm, AddRMSNorm)) and isinstance(m.residual_scale, nn.Parameter)]


def admin_closed_form(num_residual_layers: int) -> float:
    """admin-torch's omega for an O(log N) output change: sqrt((N + 1) / ln(N + 1) - 1), N >= 1 branches."""
    n = int(num_residual_layers)
    if n < 1:
        raise ValueError(f"num_residual_layers must be >= 1, got {num_residual_layers}")
    return math.sqrt((n + 1) / math.log(n + 1) - 1.0)


_VARIANCES = [CALL_FIELDS.index("var_stream"), CALL_FIELDS.index("var_branch")]


def _averaged_over_ranks(values: Tensor) -> Tensor:
    """Mean over torch.distributed ranks of a small float64 tensor (identity without a process group)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return values
    # NCCL only reduces CUDA tensors; gloo takes CPU ones. The variances live on the activations' device.
    buf = values.clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf / dist.get_world_size()


def admin_init(model: nn.Module, run_forward: Callable[[], object] | None = None, *,
               num_residual_layers: int | None = None,
               group: Callable[[str], Hashable] | None = None) -> list[AdminRecord]:
    """Set Admin's omega for every learned-scale AddLayerNorm/AddRMSNorm of ``model``, in place.

    Args:
        model: any module holding AddLayerNorm/AddRMSNorm modules built with ``residual_scale="vector"``
            or ``"scalar"`` (the learned Parameter ``residual_scale``, of shape (N,) or ()).
        run_forward: a callable that runs one forward pass of ``model`` on a real batch (e.g.
            ``lambda: model(tokens)``). It runs under ``torch.no_grad()`` with the model in eval mode.
            Each learned-scale module's forward pre-hook sets ``omega = ratio`` (the running ratio, start 1)
            before the module computes; after the call ``ratio = sqrt(Var[residual * omega] + Var[x])``
            (population variances over all elements, from the kernels' row statistics as
            ``fusednorm.monitor`` collects them; averaged over ranks under torch.distributed).
            None: the closed form :func:`admin_closed_form` with N = ``num_residual_layers`` (default: the
            number of learned-scale modules) for every module.
        num_residual_layers: N for the closed form (ignored with run_forward).
        group: optional map from a module's qualified name to a key; modules with different keys keep
            separate running ratios (the reference code keeps one for the encoder and one for the decoder).

    Returns:
        One :class:`AdminRecord` per call in execution order (a module called twice records twice and keeps
        the omega of its last call); for the closed form one record per module, variances NaN.

    The Parameter objects are kept (an optimizer built before still holds them); only their values change.
    Training flags are restored and the hooks removed, also when ``run_forward`` raises.
    """
    modules = learned_scale_modules(model)
    if not modules:
        warnings.warn(f"admin_init found no AddLayerNorm/AddRMSNorm with a learned residual_scale in "
                      f"{type(model).__name__}: nothing was set (build them with residual_scale='vector' or "
                      "'scalar', e.g. fuse_model(model, residual_scale='vector'))", stacklevel=2)
        return []
    if run_forward is None:
        n = num_residual_layers if num_residual_layers is not None else len(modules)
        omega = admin_closed_form(n)
        with torch.no_grad():
            for _, m in modules:
                m.residual_scale.fill_(omega)
        return [AdminRecord(name, math.nan, math.nan, omega) for name, _ in modules]

    if not modules:
        return []
    records: list[AdminRecord] = []
    ratios: dict[Hashable, float] = {}
    pending: list[tuple[str, Hashable, float]] = []  # the omega set for a call, until its statistics arrive
    mon = Monitor(model, modules)

    def make_hooks(name: str):
        key = group(name) if group is not None else None

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            if residual is None:
                return None  # no residual stream: nothing to scale (the module rejects a scale anyway)
            omega = ratios.get(key, 1.0)
            # Set omega first: this very call must use it, and Var[residual * omega] sees it.
            with torch.no_grad():
                module.residual_scale.fill_(omega)
            pending.append((name, key, omega))
            return None

        def post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
            if not pending or pending[-1][0] != name:
                return None
            _, _, omega = pending.pop()
            var_r, var_f = (float(v) for v in _averaged_over_ranks(mon.latest()[_VARIANCES]))
            ratios[key] = math.sqrt(var_r + var_f)
            records.append(AdminRecord(name, var_r, var_f, omega))
            return None

        return pre_hook, post_hook

    training = {m: m.training for m in model.modules()}
    handles = []
    for name, m in modules:
        pre_hook, post_hook = make_hooks(name)
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(post_hook, with_kwargs=True))
    try:
        model.eval()
        with torch.no_grad(), mon:
            run_forward()
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    return records


def deepnorm_constants(encoder_layers: int = 0, decoder_layers: int = 0) -> dict[str, tuple[float, float]]:
    """DeepNorm's (alpha, beta) per stack (Wang et al. 2022, "DeepNet", arXiv 2203.00555, Figure 2).

    - encoder only (N layers):  alpha = (2N)^(1/4),            beta = (8N)^(-1/4)
    - decoder only (M layers):  alpha = (2M)^(1/4),            beta = (8M)^(-1/4)
    - encoder-decoder:          encoder alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16)
                                decoder alpha = (3M)^(1/4),          beta = (12M)^(-1/4)

    alpha is the constant residual scale of every sublayer of that stack; beta the Xavier-normal gain of its
    branch weights (FFN, attention value and output projections; queries and keys keep gain 1).
    Returns {"encoder": (alpha, beta)} and/or {"decoder": (alpha, beta)} for the stacks that exist.
    """
    n, m = int(encoder_layers), int(decoder_layers)
    if n < 0 or m < 0 or n + m == 0:
        raise ValueError(f"need encoder_layers >= 0, decoder_layers >= 0, not both 0; got {n}, {m}")
    if n and m:
        return {"encoder": (0.81 * (n ** 4 * m) ** (1 / 16), 0.87 * (n ** 4 * m) ** (-1 / 16)),
                "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25)}
    if n:
        return {"encoder": ((2 * n) ** 0.25, (8 * n) ** -0.25)}
    return {"decoder": ((2 * m) ** 0.25, (8 * m) ** -0.25)}
