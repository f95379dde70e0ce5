"""replace_norms: swap the norms of a model for fusednorm's drop-ins, in place, and say what was done.

Swapped: torch.nn.LayerNorm -> fusednorm.LayerNorm and torch.nn.RMSNorm -> fusednorm.RMSNorm (those exact
classes: a subclass may override forward), and the RMSNorm classes of Hugging Face transformers (or of a
model's remote code, ``transformers_modules``) -> :class:`HFRMSNorm`, recognised by structure and checked
by behaviour on a probe (LlamaRMSNorm and its copies; T5LayerNorm; OLMo-2's; Gemma's ``(1 + w)`` as
``weight_offset=1.0``). A class of the user's own is never swapped, whatever its name: it may do more
than the probe sees (a clamp, a log).

The probe runs on a private copy of the module; a module on the meta device (a model built before its
weights are loaded) is probed on a CPU copy, so it is swapped too and keeps its meta Parameter, to be
loaded later (``load_state_dict(..., assign=True)`` or ``to_empty`` + ``load_state_dict``).

torch's TransformerEncoderLayer has an inference "fast path" that runs its own fused kernel on the norms'
weights, bypassing the norm modules (eval mode, no grad, batch_first, ...). A layer whose norms were
swapped gets the fast path disabled (``activation_relu_or_gelu = 0``, the flag the fast path checks; the
regular path reads ``activation``), so the swapped norms really run; the report says so.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers

import torch
from torch import Tensor, nn

from .. import functional as F
from ..modules import LayerNorm, RMSNorm
from .report import CHANGED, LEFT, SWAPPED, PatchReport, log_summary

__all__ = ["HFRMSNorm", "hf_rms_norm", "replace_norms"]

_HALF = (torch.float16, torch.bfloat16)
_RULES = ("promote", "input", "weight")


def hf_output_dtype(rule: str, x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The output dtype of an HF RMSNorm class for input x_dtype and weight w_dtype, by its rule.

    "promote" (LlamaRMSNorm and most: ``weight * h.to(input_dtype)``): promote_types(x, w).
    "input" (OLMo-2, Gemma, GPT-OSS: ``(weight * h).to(input_dtype)``): x's dtype.
    "weight" (T5LayerNorm, Idefics: ``h.to(weight.dtype)`` if the weight is 16-bit): w's dtype when it
    is 16-bit, else promote_types(x, w).
    """
    if rule == "input":
        return x_dtype
    if rule == "weight" and w_dtype in _HALF:
        return w_dtype
    return torch.promote_types(x_dtype, w_dtype)


def hf_rms_norm(x: Tensor, weight: Tensor, eps: float, rule: str, weight_offset: float = 0.0) -> Tensor:
    """An HF RMSNorm class's output: ``(weight + weight_offset) * x * rsqrt(mean(x^2) + eps)`` with float32
    statistics, rounded once, in the dtype of its ``rule`` (:func:`hf_output_dtype`). x: (..., N); weight: (N,)."""
    out_dtype = hf_output_dtype(rule, x.dtype, weight.dtype)
    if out_dtype != x.dtype and torch.promote_types(x.dtype, out_dtype) == out_dtype:
        # A wider output (bf16 x, float32 weight): HF computes the product in that dtype; so do we.
        x = x.to(out_dtype)
    if weight.dtype not in (x.dtype, torch.float32):
        weight = weight.float()  # the kernels take weights in x's dtype or float32; the upcast is exact
    y = F.rms_norm(x, weight, eps, weight_offset=weight_offset)
    # A narrower output (T5 with bf16 weights, float32 x): computed in x's dtype, rounded once.
    return y if y.dtype == out_dtype else y.to(out_dtype)


class HFRMSNorm(nn.Module):
    """Drop-in for Hugging Face's RMSNorm classes (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, GemmaRMSNorm, ...).

    Computes ``(weight + weight_offset) * (x * rsqrt(mean(x^2) + variance_epsilon))`` over the last dimension
    with float32 statistics (float64 for float64 x), as the HF classes do (they upcast to float32), rounding
    once at the end. weight_offset is 0 for LLaMA's classes and 1 for Gemma's ``(1 + w)`` (summed in float32,
    as Gemma does). x: (..., N); weight: (N,). The output dtype follows the replaced class
    (``out_dtype_rule``, see :func:`hf_output_dtype`): LlamaRMSNorm's ``weight * h.to(input_dtype)`` gives
    promote_types(x, weight), Gemma's ``(...).type_as(x)`` x's dtype. HF's own classes ignore autocast (they
    upcast by hand), and so does this one.
    Parameter and state_dict key: ``weight``; attributes ``variance_epsilon`` (also readable as ``eps``).
    The class name ends in "RMSNorm" so that HF's ``_init_weights`` still recognises it (ones for LLaMA's
    models, zeros for Gemma's).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None, *,
                 out_dtype_rule: str = "promote", weight_offset: float = 0.0):
        super().__init__()
        if out_dtype_rule not in _RULES:
            raise ValueError(f"out_dtype_rule must be 'promote', 'input' or 'weight', got {out_dtype_rule!r}")
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - weight_offset, device=device, dtype=dtype))
        self.variance_epsilon = float(eps)
        self.out_dtype_rule = out_dtype_rule
        self.weight_offset = float(weight_offset)

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hf_rms_norm(hidden_states, self.weight, self.variance_epsilon, self.out_dtype_rule, self.weight_offset)

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        return (f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, "
                f"out_dtype_rule={self.out_dtype_rule!r}{offset}")


def forward_arity(module: nn.Module) -> int | None:
    """How many parameters ``module.forward`` takes (None if its signature cannot be read)."""
    try:
        return len(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None


def is_library_class(module: nn.Module | type) -> bool:
    """A class (of a module) of Hugging Face transformers or of a model's remote code (``transformers_modules``)."""
    cls = module if isinstance(module, type) else type(module)
    return cls.__module__.split(".")[0] in ("transformers", "transformers_modules")


def private_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` to probe (hooks dropped); meta tensors are given CPU storage (values unset)."""
    probe = copy.deepcopy(module)
    for m in probe.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(m, name):
                setattr(m, name, type(getattr(m, name))())
    if any(t.is_meta for t in list(probe.parameters()) + list(probe.buffers())):
        probe = probe.to_empty(device="cpu")
    return probe


def hf_rmsnorm_match(module: nn.Module) -> tuple[tuple[float, str, float] | None, str]:
    """((eps, out_dtype_rule, weight_offset), "") if ``module`` behaves as an HF RMSNorm, else (None, why not).

    Candidates by structure: one 1-D floating Parameter ``weight``, no buffers, no children, a forward with
    one argument, a number ``variance_epsilon`` (or ``eps``). Behaviour is then checked on a private copy
    (the model is not touched, no hooks run; a meta module is probed on a CPU copy) with a random weight:
      - float32 input rows of normal size (offset from 0) and of size ~sqrt(eps) (so a different eps
        shows), against ``(w + offset) * x * rsqrt(mean(x^2) + eps)`` in float64 for offset 0 (LLaMA) and
        1 (Gemma); this rejects a LayerNorm without bias (mean subtracted), gated norms and modules that
        ignore their weight;
      - the output dtype for inputs in float32, bfloat16 and float16, with the weight in its own dtype,
        float32 and bfloat16, must follow one rule of :func:`hf_output_dtype` (that rule is then kept by
        the drop-in, so it still holds after ``model.to(dtype)``).
    """
    weight = module._parameters.get("weight")
    if set(module._parameters) != {"weight"} or weight is None:
        return None, "parameters are not exactly one 'weight'"
    if module._buffers or module._modules or weight.dim() != 1 or not weight.is_floating_point() or weight.numel() == 0:
        return None, "has buffers or children, or its weight is not one non-empty floating row"
    if forward_arity(module) != 1:  # forward(hidden_states) only: a gated norm (x, gate=None) would lose its gate
        return None, "forward takes more than the input (a gated norm?)"
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        return None, "no numeric variance_epsilon / eps"
    eps = float(eps)
    n = weight.numel()
    gen = torch.Generator().manual_seed(0)
    try:
        probe = private_copy(module)
        device = probe.weight.device
        with torch.no_grad():
            probe.weight.copy_(1.0 + 0.5 * torch.randn(n, generator=gen))
            w64 = probe.weight.detach().double().cpu()
            tiny = math.sqrt(eps) if eps > 0 else 1e-3
            x = torch.cat([torch.randn(2, n, generator=gen) + 1.0, tiny * torch.randn(2, n, generator=gen)])
            x64 = x.double()
            xhat = x64 * torch.rsqrt((x64 * x64).mean(-1, keepdim=True) + eps)
            offset = None
            out_dtypes = {}
            for w_dtype in dict.fromkeys((weight.dtype, torch.float32, torch.bfloat16)):
                probe = probe.to(w_dtype)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    out = probe.forward(x.to(device=device, dtype=dtype))
                    if not isinstance(out, Tensor) or out.shape != x.shape:
                        return None, "output is not a tensor of the input's shape"
                    out_dtypes[dtype, w_dtype] = out.dtype
                    if dtype == torch.float32 and w_dtype == weight.dtype:
                        tol = 1e-4 if out.dtype in (torch.float32, torch.float64) else 2e-2
                        offset = _matching_offset(out.detach().double().cpu(), xhat, w64, tol)
                        if offset is None:
                            return None, "output differs from (w + 0 or 1) * x * rsqrt(mean(x^2) + eps) on the probe"
    except Exception as e:  # a module that cannot run the probe is not a match
        return None, f"probe failed: {type(e).__name__}: {e}"[:200]
    for rule in _RULES:
        if all(hf_output_dtype(rule, x_dtype, w_dtype) == o for (x_dtype, w_dtype), o in out_dtypes.items()):
            return (eps, rule, offset), ""
    return None, "output dtypes follow none of the known rules"


def _matching_offset(out: Tensor, xhat: Tensor, w64: Tensor, tol: float) -> float | None:
    """The weight offset (0: LLaMA, 1: Gemma) with which ``out`` is (w + offset) * xhat within ``tol`` of each
    row's largest value, or None."""
    for offset in (0.0, 1.0):
        ref = (w64 + offset) * xhat
        if bool(((out - ref).abs() / ref.abs().amax(-1, keepdim=True) <= tol).all()):
            return offset
    return None


# Hook registries moved to the drop-in (the very dict objects, so existing RemovableHandles still work).
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_DROP_INS = (LayerNorm, RMSNorm, HFRMSNorm)


def _class_name(module: nn.Module) -> str:
    """The class name; for a TorchScript module, the name of the class it was scripted from."""
    return module.original_name if isinstance(module, torch.jit.ScriptModule) else type(module).__name__


def _looks_like_a_norm(module: nn.Module) -> bool:
    name = _class_name(module)
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "LayerNorm" in name or "RMSNorm" in name


def _twin_or_reason(module: nn.Module) -> tuple[nn.Module | None, str]:
    """(the fusednorm drop-in holding the very same Parameter objects, "") or (None, why it is left)."""
    if type(module) is nn.LayerNorm:
        twin = LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                         bias=module.bias is not None, device="meta")
    elif type(module) is nn.RMSNorm:
        twin = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta")
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return None, f"a subclass of torch.nn.{type(module).__mro__[1].__name__} (may override forward)"
    elif not is_library_class(module):
        return None, "a class of your own (only torch.nn's and transformers' classes are swapped)"
    else:
        match, why = hf_rmsnorm_match(module)
        if match is None:
            return None, f"probe rejected it: {why}"
        eps, rule, offset = match
        twin = HFRMSNorm(module.weight.numel(), eps, device="meta", out_dtype_rule=rule, weight_offset=offset)
    # Reuse the Parameter objects (an optimizer may already hold them): no copy, same device/dtype.
    for name, param in module._parameters.items():
        twin._parameters[name] = param
    for name in _HOOK_DICTS:
        if hasattr(module, name):
            setattr(twin, name, getattr(module, name))
    twin._is_full_backward_hook = getattr(module, "_is_full_backward_hook", None)
    twin.train(module.training)
    return twin, ""


def _disable_encoder_fast_path(model: nn.Module, report: PatchReport) -> None:
    for name, layer in model.named_modules():
        if (isinstance(layer, nn.TransformerEncoderLayer) and not isinstance(layer, torch.jit.ScriptModule)
                and isinstance(layer.norm1, _DROP_INS) and layer.activation_relu_or_gelu):
            layer.activation_relu_or_gelu = 0
            report.add(name, layer, CHANGED, "inference fast path disabled (it would bypass the swapped norms)")


def replace_norms(model: nn.Module, *, report: PatchReport | None = None) -> nn.Module:
    """Swap every norm of ``model`` for fusednorm's drop-in, in place (see the module docstring for what).

    Keeps the Parameter objects, device (meta included), dtype, training mode, state_dict keys and the hooks
    registered on the module; a module shared by several parents is replaced by one shared drop-in. Modules
    inside a TorchScript module are left (its compiled forward would not call the drop-in).
    report: a :class:`PatchReport` to fill with what was swapped and what was left and why; a one-line
    summary is logged on the "fusednorm" logger either way.
    Returns ``model`` (replaced itself if it is a norm, in which case use the return value).
    """
    report = report if report is not None else PatchReport()
    start = len(report.records)
    model = swap_norms(model, report)
    log_summary(f"replace_norms({type(model).__name__})", report, start)
    return model


def swap_norms(model: nn.Module, report: PatchReport) -> nn.Module:
    """replace_norms without the log line (for callers that log one summary of several steps)."""
    twins: dict[int, tuple[nn.Module | None, str]] = {}

    def visit(module: nn.Module, name: str) -> nn.Module | None:
        """The twin of ``module`` (None: keep it), after visiting its children."""
        if isinstance(module, torch.jit.ScriptModule):
            for sub_name, sub in module.named_modules(prefix=name):
                if _looks_like_a_norm(sub):
                    report.add(sub_name, _class_name(sub), LEFT, "inside a TorchScript module")
            return None
        if id(module) in twins:
            return twins[id(module)][0]
        twins[id(module)] = (None, "")  # a module that contains itself is visited once
        for child_name, child in list(module._modules.items()):
            if child is not None and (twin := visit(child, f"{name}.{child_name}" if name else child_name)) is not None:
                module._modules[child_name] = twin
        if type(module).__module__.split(".")[0] == "fusednorm":  # ours already (drop-ins, fused blocks)
            return None
        twin, why = _twin_or_reason(module) if _looks_like_a_norm(module) or is_library_class(module) else (None, "")
        twins[id(module)] = (twin, why)
        if twin is not None:
            report.add(name, module, SWAPPED, f"-> {type(twin).__name__}" + _twin_detail(twin))
        elif why and _looks_like_a_norm(module):
            report.add(name, module, LEFT, why)
        return twin

    root = visit(model, "")
    _disable_encoder_fast_path(root if root is not None else model, report)
    return root if root is not None else model


def _twin_detail(twin: nn.Module) -> str:
    if isinstance(twin, HFRMSNorm):
        offset = f", weight_offset={twin.weight_offset:g}" if twin.weight_offset else ""
        return f" (out_dtype_rule={twin.out_dtype_rule!r}{offset})"
    return ""
