"""LLaMA-family decoder layers with both residual adds fused into the norm that follows them.

A Hugging Face LLaMA-family decoder layer computes, with optional branch modules in brackets::

    residual = h;  a = self_attn(in_norm(h));  [a = attn_out(a)];  h = residual + a
    residual = h;  m = mlp(mid_norm(h));       [m = mlp_out(m)];   h = residual + m

(LLaMA, Mistral, Qwen2/3, Mixtral, Starcoder2, ...: no branch modules; Phi-3: dropout on each branch;
Gemma2/3: a norm on each branch, the "sandwich"). The patched layer computes the first add and mid_norm as
one ``add_*_norm(prenorm=True)`` call, and the second add together with the norm that follows it in the
model -- the next layer's in_norm, or the final norm after the last layer -- handing that norm's output
over with h (see ``handoff.py``). Every residual add then lives in a fused call; outputs are those of the
unpatched layer (the same ops, with one rounding less).

Patching is per instance: the layer's class becomes a subclass of its own class (made once per class)
whose forward is :func:`fused_forward`. Being a subclass keeps isinstance (HF's output recording,
``_no_split_modules`` lookups by name: the subclass keeps the name) and HF's gradient checkpointing, which
wraps the forward of every GradientCheckpointingLayer subclass; state_dict keys, Parameters and hooks are
untouched, other models and instances are not changed. A layer is recognised by structure (its children)
and checked by behaviour: its original forward and :func:`fused_forward` run on a probe input with every
child replaced by a distinct stub function, and must give the same output and pass the same arguments to
the attention -- so a family whose forward differs in any way that shows there is left alone. The probe
needs no weights, so models on the meta device are patched too.
"""

from __future__ import annotations

import copy
import inspect
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .handoff import as_consumer, can_fuse, fused_add_norm, offer, weight_is_local
from .norms import is_library_class
from .report import FUSED, LEFT, PatchReport

__all__ = ["DecoderShape", "SHAPES", "fuse_decoders", "fused_forward"]


class DecoderShape(NamedTuple):
    """Names of a decoder layer's children; attn_out / mlp_out: the module applied to a branch, or None."""

    name: str
    in_norm: str
    attn_out: str | None
    mid_norm: str
    mlp_out: str | None

    def children(self) -> set[str]:
        return {"self_attn", "mlp", self.in_norm, self.mid_norm} | {n for n in (self.attn_out, self.mlp_out) if n}


SHAPES = (
    DecoderShape("pre-norm", "input_layernorm", None, "post_attention_layernorm", None),
    DecoderShape("pre-norm, branch dropout", "input_layernorm", "resid_attn_dropout", "post_attention_layernorm",
                 "resid_mlp_dropout"),
    DecoderShape("sandwich norms", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
)


class Plan:
    """What a patched layer needs at call time: its shape, the forward's named parameters (to pass the
    attention exactly what HF's forward passes it) and the norm after its last add (and that norm's owner)."""

    def __init__(self, shape: DecoderShape, forward) -> None:
        self.shape = shape
        params = list(inspect.signature(forward).parameters.values())[2:]  # after self, hidden_states
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.names = [p.name for p in named]
        self.positional = [p.name for p in named if p.kind == p.POSITIONAL_OR_KEYWORD]
        self.defaults = {p.name: p.default for p in named if p.default is not p.empty}
        self.has_var_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
        self.next_norm: nn.Module | None = None
        self.next_owner: nn.Module | None = None

    def attention_kwargs(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self.positional):
            raise TypeError(f"forward() takes {len(self.positional) + 2} positional arguments, got {len(args) + 2}")
        out = dict(self.defaults)
        out.update(zip(self.positional, args, strict=False))
        if "past_key_values" in kwargs and "cache" in self.names and "past_key_values" not in self.names:
            kwargs = dict(kwargs)  # HF 5's deprecate_kwarg("past_key_values", new_name="cache") on the forward
            kwargs.setdefault("cache", kwargs.pop("past_key_values"))
        out.update(kwargs)
        missing = [name for name in self.names if name not in out]
        if missing:
            raise TypeError(f"forward() missing required arguments: {missing}")
        return out


def _unfused_add_norm(norm, x, residual):
    h = residual + x
    return norm(h), h


def _layer_forward(layer: nn.Module, plan: Plan, add_norm, hidden_states: Tensor, args: tuple, kwargs: dict,
                   last_add) -> Tensor:
    """The decoder computation of the module docstring, with the two adds given as functions."""
    shape = plan.shape
    attention_kwargs = plan.attention_kwargs(args, kwargs)
    residual = hidden_states
    x = getattr(layer, shape.in_norm)(hidden_states)
    x, _ = layer.self_attn(hidden_states=x, **attention_kwargs)
    if shape.attn_out is not None:
        x = getattr(layer, shape.attn_out)(x)
    x, residual = add_norm(getattr(layer, shape.mid_norm), x, residual)
    x = layer.mlp(x)
    if shape.mlp_out is not None:
        x = getattr(layer, shape.mlp_out)(x)
    return last_add(x, residual)


def _fused_add_norm_or_ops(norm, x, residual):
    fused = fused_add_norm(norm, x, residual)
    return fused if fused is not None else _unfused_add_norm(norm, x, residual)


def fused_forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    """The patched layer's forward: same arguments and result as the original, both adds fused."""
    plan: Plan = self._fusednorm_plan

    def last_add(x: Tensor, residual: Tensor) -> Tensor:
        norm = plan.next_norm
        if norm is not None and weight_is_local(norm, x, self, plan.next_owner):
            fused = fused_add_norm(norm, x, residual)
            if fused is not None:
                y, h = fused
                offer(h, norm, y)
                return h
        return residual + x

    return _layer_forward(self, plan, _fused_add_norm_or_ops, hidden_states, args, kwargs, last_add)


_FUSED_CLASSES: dict[type, type] = {}


def _reduce_ex(self, protocol):
    """Pickle and copy a fused layer as (its original class, its state): the subclass is made at run time."""
    return _rebuild_fused, (self._fusednorm_original_class,), self.__getstate__()


def _rebuild_fused(original_class: type) -> nn.Module:
    cls = _fused_class(original_class)
    return cls.__new__(cls)


def _fused_class(cls: type) -> type:
    """The subclass of ``cls`` whose forward is fused_forward (HF's GradientCheckpointingLayer wraps it in
    __init_subclass__, as it wraps every layer's forward); same name, so name-based lookups still match."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": fused_forward, "__module__": __name__, "__qualname__": f"Fused.{cls.__qualname__}",
            "_fusednorm_original_class": cls, "__reduce_ex__": _reduce_ex,
        })
    return _FUSED_CLASSES[cls]


def original_class(module: nn.Module) -> type:
    """The class a fused layer was made from (its own class for any other module)."""
    return getattr(type(module), "_fusednorm_original_class", type(module))


# ----------------------------------------------------------------------------------- behaviour probe

class _Stub(nn.Module):
    """A child replaced by a known function of its input; records the keyword arguments it was called with."""

    def __init__(self, fn, calls: list, name: str, returns_tuple: bool = False):
        super().__init__()
        self.fn, self.calls, self.stub_name, self.returns_tuple = fn, calls, name, returns_tuple

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((self.stub_name, kwargs))
        y = self.fn(x)
        return (y, None) if self.returns_tuple else y


def _stubbed(layer: nn.Module, shape: DecoderShape, calls: list) -> nn.Module:
    """A shallow copy of layer (nothing of the original changes) with every child of the shape stubbed:
    distinct non-linear functions, so that any other order or combination changes the output."""
    probe = copy.copy(layer)
    probe._modules = dict(layer._modules)
    probe.__dict__.pop("_fusednorm_plan", None)
    fns = {"self_attn": lambda x: torch.sin(x) * 0.7 + 0.2, "mlp": lambda x: torch.cos(x) * 1.3 - 0.1}
    for i, name in enumerate(sorted(shape.children() - set(fns))):
        fns[name] = (lambda c, d: (lambda x: torch.tanh(x) * c + d))(1.1 + 0.3 * i, 0.05 * (i + 1))
    for name, fn in fns.items():
        probe._modules[name] = _Stub(fn, calls, name, returns_tuple=name == "self_attn")
    probe.training = False
    return probe


def _hidden_size(layer: nn.Module, shape: DecoderShape) -> int | None:
    weight = getattr(getattr(layer, shape.in_norm), "weight", None)
    size = weight.shape[-1] if isinstance(weight, Tensor) and weight.dim() == 1 else getattr(layer, "hidden_size", None)
    return size if isinstance(size, int) and size > 0 else None


def probe_shape(layer: nn.Module, shape: DecoderShape) -> str:
    """"" if the layer's forward computes ``shape`` (checked on stubs), else why not."""
    n = _hidden_size(layer, shape)
    if n is None:
        return "hidden size unknown"
    cls = original_class(layer)
    plan = Plan(shape, cls.forward)
    sentinels = {name: object() for name in plan.names}
    if plan.has_var_kwargs:
        sentinels["fusednorm_probe_kwarg"] = object()
    h = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(0))
    outputs, logs = [], []
    try:
        with torch.no_grad():
            for run in ("original", "patched"):
                calls: list = []
                probe = _stubbed(layer, shape, calls)
                if run == "original":
                    out = cls.forward(probe, h, **sentinels)
                else:
                    out = _layer_forward(probe, plan, _unfused_add_norm, h, (), sentinels, lambda x, r: r + x)
                outputs.append(out)
                logs.append([(name, {k: id(v) for k, v in kw.items()}) for name, kw in calls])
    except Exception as e:  # a forward that cannot run on stubs is not this shape
        return f"forward differs (probe failed: {type(e).__name__})"
    if not all(isinstance(o, Tensor) for o in outputs) or not torch.equal(outputs[0], outputs[1]):
        return "forward differs (other output on the probe)"
    if logs[0] != logs[1]:
        return "forward differs (other calls or arguments on the probe)"
    return ""


# ----------------------------------------------------------------------------------------------- patch

def match_shape(layer: nn.Module) -> tuple[DecoderShape | None, str]:
    """(the shape of a Hugging Face decoder layer, "") or (None, why not)."""
    children = set(layer._modules)
    candidates = [s for s in SHAPES if s.children() == children]
    if not candidates:
        return None, "not a LLaMA-family decoder layer (children)"
    if not is_library_class(original_class(layer)):
        return None, "a class of your own (only transformers' decoder layers are patched)"
    if layer._parameters or layer._buffers:
        return None, "has parameters or buffers of its own"
    why = ""
    for shape in candidates:
        why = probe_shape(layer, shape)
        if not why:
            return shape, ""
    return None, why


def patch_decoder_layer(layer: nn.Module, shape: DecoderShape) -> None:
    """Make ``layer`` a fused layer of ``shape`` (its class, in place), its norms consumers of offers."""
    cls = original_class(layer)
    layer.__dict__["_fusednorm_plan"] = Plan(shape, cls.forward)
    layer.__class__ = _fused_class(cls)
    as_consumer(getattr(layer, shape.in_norm))


def link(layer: nn.Module, next_norm: nn.Module | None, owner: nn.Module | None) -> bool:
    """Fuse ``layer``'s last add with ``next_norm`` (owned by ``owner``); False if that norm cannot take it."""
    plan: Plan = layer._fusednorm_plan
    if next_norm is None or not can_fuse(next_norm) or not as_consumer(next_norm):
        plan.next_norm = plan.next_owner = None
        return False
    plan.next_norm, plan.next_owner = next_norm, owner
    return True


# Children of an OLMo-2 layer: residual + norm(branch), the norm before the add, so no add is followed by a norm.
_POST_BRANCH_NORM = {"self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm"}
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_norm", "ln_f", "norm_f")


def _decoder_like(module: nn.Module) -> bool:
    return "self_attn" in module._modules and "mlp" in module._modules


def fuse_decoders(model: nn.Module, report: PatchReport) -> int:
    """Patch every LLaMA-family decoder layer of ``model`` (run after replace_norms) and link each layer's last
    add to the next layer's input norm, or to the final norm; returns the number of residual adds fused."""
    patched: list[tuple[str, nn.Module, nn.Module]] = []  # (name, layer, the ModuleList's owner)
    for owner_name, owner in model.named_modules():
        for list_name, layers in owner._modules.items():
            if not isinstance(layers, nn.ModuleList):
                continue
            run: dict[int, tuple[str, nn.Module]] = {}
            for i, layer in enumerate(layers):
                name = ".".join(p for p in (owner_name, list_name, str(i)) if p)
                if not _decoder_like(layer):
                    continue
                shape, why = match_shape(layer)
                if shape is None and set(layer._modules) == _POST_BRANCH_NORM:
                    why = "norm after the branch (residual + norm(f)): no residual add is followed by a norm"
                if shape is not None and not can_fuse(getattr(layer, shape.mid_norm)):
                    shape, why = None, f"its {shape.mid_norm} is not a fusednorm drop-in (left by replace_norms)"
                if shape is None:
                    report.add(name, layer, LEFT, why)
                    continue
                patch_decoder_layer(layer, shape)
                run[i] = (name, layer)
            patched += [(name, layer, owner) for name, layer in run.values()]
            final = next((n for n in _FINAL_NORM_NAMES if can_fuse(owner._modules.get(n))), None)
            for i, (name, layer) in run.items():
                next_owner, attr, label = None, None, None
                if i + 1 in run:  # the next layer's input norm ...
                    next_owner = run[i + 1][1]
                    attr = next_owner._fusednorm_plan.shape.in_norm
                    label = f"{run[i + 1][0]}.{attr}"
                elif i == len(layers) - 1 and final:  # ... or the final norm of the module holding the layers
                    next_owner, attr = owner, final
                    label = ".".join(p for p in (owner_name, final) if p)
                linked = link(layer, getattr(next_owner, attr) if attr else None, next_owner)
                shape = layer._fusednorm_plan.shape
                detail = f"attention add + {shape.mid_norm}"
                detail += f"; MLP add + {label}" if linked else "; MLP add left (no fusednorm norm follows it)"
                report.add(name, layer, FUSED, f"{shape.name}: {detail}")
    return sum(1 + (layer._fusednorm_plan.next_norm is not None) for _, layer, _ in patched)
