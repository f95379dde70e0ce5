"""The benchmarked ops and the implementations compared side by side.

An implementation turns one op variant (a ``Spec``) into a callable

    fn(x, residual, residual_scale) -> y            (Post-LN and plain norms)
                                    -> (y, h)       (Pre-LN: h = x + residual is returned too)

x, residual: (M, N) in the benchmark dtype, leaves that require grad (residual None for plain
norms); residual_scale: (N,) learned scale (requires grad) or None. The implementation owns its
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

from .floor import CASES

EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One op variant: ``op`` in {layer_norm, rms_norm, add_layer_norm, add_rms_norm}, ``case`` one of
    floor.CASES ("plain" for the two plain norms)."""

    op: str
    case: str

    def __post_init__(self):
        if self.case not in CASES:
            raise ValueError(f"case must be one of {CASES}, got {self.case!r}")
        if (self.case == "plain") != (not self.op.startswith("add_")):
            raise ValueError(f"{self.op} does not go with case {self.case!r}")

    @property
    def name(self) -> str:
        return self.op if self.case == "plain" else f"{self.op}/{self.case}"

    @property
    def is_rms(self) -> bool:
        return self.op.endswith("rms_norm")

    @property
    def norm(self) -> str:
        return "rms_norm" if self.is_rms else "layer_norm"

    @property
    def has_residual(self) -> bool:
        return self.case != "plain"

    @property
    def learned_scale(self) -> bool:
        return self.case == "postln_scale"

    @property
    def prenorm(self) -> bool:
        return self.case == "preln"

    @property
    def eps(self) -> float:
        return EPS[self.norm]


SPECS: tuple[Spec, ...] = (
    Spec("layer_norm", "plain"), Spec("rms_norm", "plain"),
    Spec("add_layer_norm", "postln"), Spec("add_layer_norm", "postln_scale"), Spec("add_layer_norm", "preln"),
    Spec("add_rms_norm", "postln"), Spec("add_rms_norm", "postln_scale"), Spec("add_rms_norm", "preln"),
)


def spec_by_name(name: str) -> Spec:
    for spec in SPECS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown op {name!r}; one of {[s.name for s in SPECS]}")


@dataclasses.dataclass
class Built:
    """What an implementation made for one (spec, N, dtype): the callable, its parameters, a note."""

    fn: Callable
    params: list[torch.Tensor]
    note: str = ""


def make_params(spec: Spec, cols: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """weight (N,) near 1 and, for LayerNorm, bias (N,) near 0: never all ones / zeros, so that a kernel
    that ignores them is caught by the output check."""
    gen = torch.Generator(device="cpu").manual_seed(cols)
    weight = (1.0 + 0.1 * torch.randn(cols, generator=gen)).to(device=device, dtype=dtype)
    bias = None if spec.is_rms else (0.1 * torch.randn(cols, generator=gen)).to(device=device, dtype=dtype)
    return weight, bias


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_(True)


def _residual_sum(x, residual, residual_scale):
    """h = residual * s + x (DESIGN section 1) in plain torch."""
    if residual is None:
        return x
    if residual_scale is None:
        return x + residual
    return x + residual * residual_scale


def torch_composition(spec: Spec, weight, bias) -> Callable:
    """The plain torch composition of ``spec``: what a user writes without fusednorm."""
    cols = weight.shape[0]

    def fn(x, residual, residual_scale):
        h = _residual_sum(x, residual, residual_scale)
        if spec.is_rms:
            y = F.rms_norm(h, (cols,), weight, spec.eps)
        else:
            y = F.layer_norm(h, (cols,), weight, bias, spec.eps)
        return (y, h) if spec.prenorm else y

    return fn


def _with_unfused_add(spec: Spec, norm: Callable) -> Callable:
    """A peer's plain norm behind a torch residual add (for peers without a fused add)."""

    def fn(x, residual, residual_scale):
        h = _residual_sum(x, residual, residual_scale)
        y = norm(h)
        return (y, h) if spec.prenorm else y

    return fn


class Impl:
    """One implementation column. Subclasses set ``name`` and ``kind`` and implement ``build``."""

    name = ""
    kind = ""  # "baseline", "fusednorm" or "peer"

    def why_unavailable(self, device: torch.device) -> str | None:
        """None when this implementation can run on ``device`` here, else the reason in words."""
        return None

    def build(self, spec: Spec, cols: int, dtype: torch.dtype, device) -> Built:
        raise NotImplementedError


class TorchEager(Impl):
    name, kind = "torch", "baseline"

    def build(self, spec, cols, dtype, device):
        weight, bias = (_leaf(p) for p in make_params(spec, cols, dtype, device))
        return Built(torch_composition(spec, weight, bias), [p for p in (weight, bias) if p is not None])


class TorchCompile(Impl):
    """torch.compile of the same composition, compiled afresh for each shape (dynamic=False), so that
    Inductor sees the static row width it needs for a one-pass reduction."""

    name, kind = "torch.compile", "baseline"

    def __init__(self, backend: str = "inductor"):
        self.backend = backend

    def build(self, spec, cols, dtype, device):
        import torch._dynamo

        torch._dynamo.reset()  # one compiled graph per (op, dtype, N); no recompile limit to hit
        eager = TorchEager().build(spec, cols, dtype, device)
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

    def build(self, spec, cols, dtype, device):
        import fusednorm

        weight, bias = (_leaf(p) for p in make_params(spec, cols, dtype, device))
        backend = self.backend
        if spec.op == "layer_norm":
            def fn(x, residual, residual_scale):
                return fusednorm.layer_norm(x, weight, bias, spec.eps, backend=backend)
        elif spec.op == "rms_norm":
            def fn(x, residual, residual_scale):
                return fusednorm.rms_norm(x, weight, spec.eps, backend=backend)
        elif spec.op == "add_layer_norm":
            def fn(x, residual, residual_scale):
                return fusednorm.add_layer_norm(x, residual, weight, bias, spec.eps, residual_scale=residual_scale,
                                                prenorm=spec.prenorm, backend=backend)
        else:
            def fn(x, residual, residual_scale):
                return fusednorm.add_rms_norm(x, residual, weight, spec.eps, residual_scale=residual_scale,
                                              prenorm=spec.prenorm, backend=backend)
        return Built(fn, [p for p in (weight, bias) if p is not None])


def _module_on(module: torch.nn.Module, spec: Spec, cols: int, dtype, device) -> torch.nn.Module:
    """A peer's norm module on ``device``/``dtype`` with our parameter values (not its ones/zeros)."""
    module = module.to(device=device, dtype=dtype)
    weight, bias = make_params(spec, cols, dtype, device)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None and getattr(module, "bias", None) is not None:
            module.bias.copy_(bias)
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

    def build(self, spec, cols, dtype, device):
        mod = self._import()
        if spec.is_rms and spec.has_residual and not spec.learned_scale and hasattr(mod, "LigerFusedAddRMSNorm"):
            norm = _module_on(mod.LigerFusedAddRMSNorm(cols, eps=spec.eps), spec, cols, dtype, device)

            def fn(x, residual, residual_scale):
                y, h = norm(x, residual)
                return (y, h) if spec.prenorm else y

            return Built(fn, list(norm.parameters()), "LigerFusedAddRMSNorm")
        if spec.is_rms:
            norm = _module_on(mod.LigerRMSNorm(cols, eps=spec.eps), spec, cols, dtype, device)
        else:
            norm = _module_on(mod.LigerLayerNorm(cols, eps=spec.eps), spec, cols, dtype, device)
        note = "unfused add: torch add + Liger norm" if spec.has_residual else ""
        return Built(_with_unfused_add(spec, norm), list(norm.parameters()), note)


class FlashAttn(_Peer):
    """flash-attn's Triton layer_norm_fn / rms_norm_fn (residual and prenorm fused; no learned scale)."""

    name, package = "flash-attn", "flash_attn"

    def _import(self):
        return importlib.import_module("flash_attn.ops.triton.layer_norm")

    def build(self, spec, cols, dtype, device):
        mod = self._import()
        weight, bias = (_leaf(p) for p in make_params(spec, cols, dtype, device))
        params = [p for p in (weight, bias) if p is not None]
        if spec.learned_scale:
            def norm(h):
                return mod.layer_norm_fn(h, weight, bias, eps=spec.eps, is_rms_norm=spec.is_rms)

            return Built(_with_unfused_add(spec, norm), params, "unfused add: no residual scale in flash-attn")

        def fn(x, residual, residual_scale):
            return mod.layer_norm_fn(x, weight, bias, residual=residual, eps=spec.eps, prenorm=spec.prenorm,
                                     is_rms_norm=spec.is_rms)

        return Built(fn, params)


class Apex(_Peer):
    """apex.normalization.FusedLayerNorm / FusedRMSNorm (no fused residual add)."""

    name, package = "apex", "apex"

    def _import(self):
        mod = importlib.import_module("apex.normalization")
        importlib.import_module("fused_layer_norm_cuda")  # the compiled part; absent in a Python-only install
        return mod

    def build(self, spec, cols, dtype, device):
        mod = self._import()
        cls = mod.FusedRMSNorm if spec.is_rms else mod.FusedLayerNorm
        norm = _module_on(cls(cols, eps=spec.eps), spec, cols, dtype, device)
        note = "unfused add: torch add + apex norm" if spec.has_residual else ""
        return Built(_with_unfused_add(spec, norm), list(norm.parameters()), note)


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
