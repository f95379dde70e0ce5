"""The benchmarked ops and the implementations compared side by side.

An implementation turns one benchmarked case (a ``floor.Case``: a named ``fusednorm.variant.Variant``)
into a callable

    fn(x, residual, residual_scale) -> y            (Post-LN, and the norms without residual)
                                    -> (y, h)       (Pre-LN: h = x + residual is returned too)

x, residual: (M, N) in the benchmark dtype, leaves that require grad (residual None for the
"norm" case); residual_scale: (N,) learned scale (requires grad) or None. The implementation owns its
parameters (weight (N,), bias (N,) for LayerNorm) and returns them so that the backward can ask
for their gradients as well. Peers without a fused residual add get ``x + residual * s`` in torch
before their norm, and every row they produce says so ("unfused add").
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .floor import Case


@dataclasses.dataclass
class Built:
    """What an implementation made for one (case, N, dtype): the callable, its parameters, a note."""

    fn: Callable
    params: list[torch.Tensor]
    note: str = ""


def make_params(case: Case, cols: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """[weight] (N,) near 1 and, with the variant's bias (LayerNorm), [weight, bias] (N,) near 0: never all
    ones / zeros, so that a kernel that ignores them is caught by the output check. Fresh leaves that
    require grad (the backward asks for their gradients)."""
    gen = torch.Generator(device="cpu").manual_seed(cols)
    params = [1.0 + 0.1 * torch.randn(cols, generator=gen)]
    if case.variant.has_bias:
        params.append(0.1 * torch.randn(cols, generator=gen))
    return [p.to(device=device, dtype=dtype).requires_grad_(True) for p in params]


def with_torch_add(case: Case, norm: Callable) -> Callable:
    """``norm`` (h -> y) behind the residual add h = residual * s + x (DESIGN section 1) in plain torch:
    the torch composition, and peers without a fused add. Returns (y, h) for Pre-LN."""

    def fn(x, residual, residual_scale):
        h = x
        if residual is not None:
            h = x + (residual if residual_scale is None else residual * residual_scale)
        y = norm(h)
        return (y, h) if case.variant.prenorm else y

    return fn


class Impl:
    """One implementation column. Subclasses set ``name`` and ``kind`` and implement ``build``."""

    name = ""
    kind = ""  # "baseline", "fusednorm" or "peer"

    def why_unavailable(self, device: torch.device) -> str | None:
        """None when this implementation can run on ``device`` here, else the reason in words."""
        return None

    def build(self, case: Case, cols: int, dtype: torch.dtype, device) -> Built:
        raise NotImplementedError


class TorchEager(Impl):
    name, kind = "torch", "baseline"

    def build(self, case, cols, dtype, device):
        """What a user writes without fusednorm: the add, then F.layer_norm / F.rms_norm."""
        params = make_params(case, cols, dtype, device)
        torch_norm = F.rms_norm if case.variant.is_rms else F.layer_norm
        return Built(with_torch_add(case, lambda h: torch_norm(h, (cols,), *params, eps=case.eps)), params)


class TorchCompile(Impl):
    """torch.compile of the same composition, compiled afresh for each shape (dynamic=False), so that
    Inductor sees the static row width it needs for a one-pass reduction."""

    name, kind = "torch.compile", "baseline"

    def __init__(self, backend: str = "inductor"):
        self.backend = backend

    def build(self, case, cols, dtype, device):
        import torch._dynamo

        torch._dynamo.reset()  # one compiled graph per (op, dtype, N); no recompile limit to hit
        eager = TorchEager().build(case, cols, dtype, device)
        fn = torch.compile(eager.fn, backend=self.backend, dynamic=False, fullgraph=True)
        note = "" if self.backend == "inductor" else f"backend={self.backend}"
        return Built(fn, eager.params, note)


class FusedNorm(Impl):
    """fusednorm's public functions on one backend ("triton", "cuda" or "torch")."""

    kind = "fusednorm"

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"fusednorm-{backend}"

    def why_unavailable(self, device):
        try:
            from fusednorm import backends
        except Exception as exc:  # noqa: BLE001  (any import failure is the reason)
            return f"fusednorm does not import: {type(exc).__name__}: {exc}"
        try:
            backends.resolve(self.backend, device)  # built? right device? (BackendUnavailableError says why)
            backends.implementation(self.backend)  # the module itself (fusednorm/triton may not exist yet)
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"
        return None

    def build(self, case, cols, dtype, device):
        """The public function of the case's variant (``Variant.op``) with its arguments."""
        import fusednorm

        params = make_params(case, cols, dtype, device)
        variant, function, backend = case.variant, getattr(fusednorm, case.op), self.backend

        def fn(x, residual, residual_scale):
            if not variant.has_residual:
                return function(x, *params, case.eps, backend=backend)
            return function(x, residual, *params, case.eps, residual_scale=residual_scale, prenorm=variant.prenorm,
                            backend=backend)

        return Built(fn, params)


def _module_on(module: torch.nn.Module, case: Case, cols: int, dtype, device) -> torch.nn.Module:
    """A peer's norm module on ``device``/``dtype`` with our parameter values (not its ones/zeros)."""
    module = module.to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, value in zip(("weight", "bias"), make_params(case, cols, dtype, device), strict=False):
            if getattr(module, name, None) is not None:
                getattr(module, name).copy_(value)
    return module


class _Peer(Impl):
    kind = "peer"
    package = ""  # the import name whose absence makes the peer "missing"

    def why_unavailable(self, device):
        if importlib.util.find_spec(self.package) is None:
            return f"missing: {self.package} is not installed"
        if device.type != "cuda":
            return f"{self.package} is installed but needs a CUDA device"
        try:
            self._import()
        except Exception as exc:  # noqa: BLE001  (a broken install is reported, not raised)
            return f"missing: {self.package} does not import: {type(exc).__name__}: {exc}"
        return None

    def _import(self):
        raise NotImplementedError


class Liger(_Peer):
    """liger-kernel: LigerLayerNorm, LigerRMSNorm, and LigerFusedAddRMSNorm (residual add fused; it returns
    (y, h), the Pre-LN layout) where the installed version has it."""

    name, package = "liger", "liger_kernel"

    def _import(self):
        return importlib.import_module("liger_kernel.transformers")

    def build(self, case, cols, dtype, device):
        mod, v = self._import(), case.variant
        if v.is_rms and v.has_residual and not v.learned_scale and hasattr(mod, "LigerFusedAddRMSNorm"):
            norm = _module_on(mod.LigerFusedAddRMSNorm(cols, eps=case.eps), case, cols, dtype, device)

            def fn(x, residual, residual_scale):
                y, h = norm(x, residual)
                return (y, h) if v.prenorm else y

            return Built(fn, list(norm.parameters()), "LigerFusedAddRMSNorm")
        cls = mod.LigerRMSNorm if v.is_rms else mod.LigerLayerNorm
        norm = _module_on(cls(cols, eps=case.eps), case, cols, dtype, device)
        note = "unfused add: torch add + Liger norm" if v.has_residual else ""
        return Built(with_torch_add(case, norm), list(norm.parameters()), note)


class FlashAttn(_Peer):
    """flash-attn's Triton layer_norm_fn / rms_norm_fn (residual and prenorm fused; no learned scale)."""

    name, package = "flash-attn", "flash_attn"

    def _import(self):
        return importlib.import_module("flash_attn.ops.triton.layer_norm")

    def build(self, case, cols, dtype, device):
        mod, v = self._import(), case.variant
        params = make_params(case, cols, dtype, device)
        weight, bias = (*params, None)[:2]
        if v.learned_scale:
            def norm(h):
                return mod.layer_norm_fn(h, weight, bias, eps=case.eps, is_rms_norm=v.is_rms)

            return Built(with_torch_add(case, norm), params, "unfused add: no residual scale in flash-attn")

        def fn(x, residual, residual_scale):
            return mod.layer_norm_fn(x, weight, bias, residual=residual, eps=case.eps, prenorm=v.prenorm,
                                     is_rms_norm=v.is_rms)

        return Built(fn, params)


class Apex(_Peer):
    """apex.normalization.FusedLayerNorm / FusedRMSNorm (no fused residual add)."""

    name, package = "apex", "apex"

    def _import(self):
        mod = importlib.import_module("apex.normalization")
        importlib.import_module("fused_layer_norm_cuda")  # the compiled part; absent in a Python-only install
        return mod

    def build(self, case, cols, dtype, device):
        mod = self._import()
        cls = mod.FusedRMSNorm if case.variant.is_rms else mod.FusedLayerNorm
        norm = _module_on(cls(cols, eps=case.eps), case, cols, dtype, device)
        note = "unfused add: torch add + apex norm" if case.variant.has_residual else ""
        return Built(with_torch_add(case, norm), list(norm.parameters()), note)


def all_impls(compile_backend: str = "inductor") -> list[Impl]:
    """Every implementation column, in table order."""
    return [TorchEager(), TorchCompile(compile_backend), FusedNorm("triton"), FusedNorm("cuda"),
            FusedNorm("torch"), Liger(), FlashAttn(), Apex()]


def select(impls: Sequence[Impl], names: Sequence[str] | None) -> list[Impl]:
    """The implementations named in ``names`` (all when None); raises ValueError for an unknown name."""
    if names is None:
        return list(impls)
    known = {impl.name: impl for impl in impls}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {list(known)}")
    return [known[n] for n in names]
