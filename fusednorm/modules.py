"""nn.Module drop-ins with torch.nn's constructor signatures and state_dict keys."""

from __future__ import annotations

import copy
import inspect
import math
import numbers

import torch
from torch import Tensor, nn

from . import _validate
from . import functional as F


def _flat(p: Tensor | None) -> Tensor | None:
    return p.reshape(-1) if p is not None else None


def _normalized_rows(x: Tensor, normalized_shape: tuple[int, ...]) -> Tensor:
    """View x (..., *normalized_shape) as (..., N) so the kernels see one normalized dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != tuple(normalized_shape):
        raise ValueError(f"x must end with normalized_shape {tuple(normalized_shape)}, got shape {tuple(x.shape)}")
    return x if k == 1 else x.flatten(x.dim() - k)


def _unflatten(y: Tensor, shape: torch.Size) -> Tensor:
    """y back in x's shape. No view when the shape already matches (one normalized dimension): a module
    output that is an autograd view makes FSDP2 warn that in-place ops on it skip its hooks."""
    return y if y.shape == shape else y.view(shape)


class LayerNorm(nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (same arguments, parameters and state_dict keys)."""

    def forward(self, x: Tensor) -> Tensor:
        rows = _normalized_rows(x, self.normalized_shape)
        y = F.layer_norm(rows, _flat(self.weight), _flat(self.bias), self.eps)
        return _unflatten(y, x.shape)


class RMSNorm(nn.RMSNorm):
    """Drop-in for torch.nn.RMSNorm (same arguments, parameters and state_dict keys).

    eps=None behaves as torch's: the epsilon of the dtype the statistics are computed in (float32's for
    16-bit x, which torch upcasts; float64's for float64 x). The output has x's dtype, as torch's does,
    also when the weight has another dtype (a weight that is neither x's dtype nor float32 is upcast
    to float32 -- float64 for float64 x -- on the way in; its gradient flows back in its own dtype).
    """

    def forward(self, x: Tensor) -> Tensor:
        rows = _normalized_rows(x, self.normalized_shape)
        weight = _flat(self.weight)
        if weight is not None and weight.dtype not in (x.dtype, torch.float32):
            weight = weight.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        y = F.rms_norm(rows, weight, self.eps)
        return _unflatten(y, x.shape)


class _AddNorm(nn.Module):
    """Shared body of AddLayerNorm and AddRMSNorm: y = Norm(residual * s + dropout(x))."""

    def __init__(self, normalized_shape: int, eps, elementwise_affine: bool, bias: bool,
                 residual_scale, dropout_p: float, prenorm: bool, residual_in_fp32: bool,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = tuple(normalized_shape)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"normalized_shape must be one int N, got {normalized_shape}")
        (n,) = self.normalized_shape
        # Checked here, as nn.Dropout does, not at the first training-mode forward.
        self.eps = eps if eps is None else _validate.check_eps(eps)
        self.elementwise_affine = elementwise_affine
        self.dropout_p = _validate.check_dropout_p(dropout_p)
        self.prenorm = _validate.check_flag("prenorm", prenorm)
        self.residual_in_fp32 = _validate.check_flag("residual_in_fp32", residual_in_fp32)
        factory = dict(device=device, dtype=dtype)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(n, **factory))
            self.bias = nn.Parameter(torch.zeros(n, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if residual_scale is None or isinstance(residual_scale, numbers.Real) and not isinstance(residual_scale, bool):
            self.register_parameter("residual_scale", None)
            self.scale_constant = None if residual_scale is None else float(residual_scale)
        elif residual_scale in ("scalar", "vector"):
            shape = () if residual_scale == "scalar" else (n,)
            # Learned (Admin's omega); 1 until admin_init sets it from a profiling pass.
            self.residual_scale = nn.Parameter(torch.ones(shape, **factory))
            self.scale_constant = None
        else:
            raise ValueError(f"residual_scale must be None, a float, 'scalar' or 'vector', got {residual_scale!r}")
        self.residual_scale_kind = residual_scale

    def _scale(self):
        return self.residual_scale if self.residual_scale is not None else self.scale_constant

    def _dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"residual_scale={self.residual_scale_kind!r}, dropout_p={self.dropout_p}, "
                f"prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}")


class AddLayerNorm(_AddNorm):
    """y = LayerNorm(residual * s + dropout(x)); returns (y, h) when prenorm.

    residual_scale: None, a float (constant, DeepNorm's alpha), "scalar" or "vector" (learned
    Parameter ``residual_scale``, initialised to 1: Admin's omega). Keys: weight, bias, residual_scale.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, residual_scale=None, dropout_p: float = 0.0,
                 prenorm: bool = False, residual_in_fp32: bool = False):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, residual_scale, dropout_p, prenorm,
                         residual_in_fp32, device, dtype)

    def forward(self, x: Tensor, residual: Tensor | None):
        return F.add_layer_norm(x, residual, self.weight, self.bias, self.eps, residual_scale=self._scale(),
                                dropout_p=self._dropout(), prenorm=self.prenorm,
                                residual_in_fp32=self.residual_in_fp32)


class AddRMSNorm(_AddNorm):
    """y = RMSNorm(residual * s + dropout(x)); options as AddLayerNorm. Keys: weight, residual_scale."""

    def __init__(self, normalized_shape: int, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, residual_scale=None, dropout_p: float = 0.0, prenorm: bool = False,
                 residual_in_fp32: bool = False):
        super().__init__(normalized_shape, eps, elementwise_affine, False, residual_scale, dropout_p, prenorm,
                         residual_in_fp32, device, dtype)

    def forward(self, x: Tensor, residual: Tensor | None):
        return F.add_rms_norm(x, residual, self.weight, self.eps, residual_scale=self._scale(),
                              dropout_p=self._dropout(), prenorm=self.prenorm,
                              residual_in_fp32=self.residual_in_fp32)


_HALF = (torch.float16, torch.bfloat16)


def _hf_output_dtype(rule: str, x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The output dtype of an HF RMSNorm class for input x_dtype and weight w_dtype, by its rule.

    "promote" (LlamaRMSNorm and most: ``weight * h.to(input_dtype)``): promote_types(x, w).
    "input" (OLMo-2, GPT-OSS, Helium: ``(weight * h).to(input_dtype)``): x's dtype.
    "weight" (T5LayerNorm, Idefics: ``h.to(weight.dtype)`` if the weight is 16-bit): w's dtype when it
    is 16-bit, else promote_types(x, w).
    """
    if rule == "input":
        return x_dtype
    if rule == "weight" and w_dtype in _HALF:
        return w_dtype
    return torch.promote_types(x_dtype, w_dtype)


class HFRMSNorm(nn.Module):
    """Drop-in for Hugging Face's LLaMA-family RMSNorm classes (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, ...).

    Computes ``weight * (x * rsqrt(mean(x^2) + variance_epsilon))`` over the last dimension with float32
    statistics (float64 for float64 x), as the HF classes do (they upcast to float32 and cast back),
    rounding once at the end. x: (..., N); weight: (N,). The output dtype follows the replaced class
    (``out_dtype_rule``, see ``_hf_output_dtype``); LlamaRMSNorm's ``weight * h.to(input_dtype)`` gives
    promote_types(x.dtype, weight.dtype): bf16 with bf16 weights, float32 with float32 weights.
    Parameter and state_dict key: ``weight``; attribute ``variance_epsilon``. The class name ends in
    "RMSNorm" so that HF's ``_init_weights`` still recognises it (weight -> ones).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None, *,
                 out_dtype_rule: str = "promote"):
        super().__init__()
        if out_dtype_rule not in ("promote", "input", "weight"):
            raise ValueError(f"out_dtype_rule must be 'promote', 'input' or 'weight', got {out_dtype_rule!r}")
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = float(eps)
        self.out_dtype_rule = out_dtype_rule

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def forward(self, hidden_states: Tensor) -> Tensor:
        x, w = hidden_states, self.weight
        out_dtype = _hf_output_dtype(self.out_dtype_rule, x.dtype, w.dtype)
        if out_dtype != x.dtype and torch.promote_types(x.dtype, out_dtype) == out_dtype:
            # A wider output (bf16 x, float32 weight): HF computes the product in that dtype; so do we.
            x = x.to(out_dtype)
        if w.dtype not in (x.dtype, torch.float32):
            w = w.float()  # the kernels take weights in x's dtype or float32; the upcast is exact
        y = F.rms_norm(x, w, self.variance_epsilon)
        # A narrower output (T5 with bf16 weights, float32 x): computed in x's dtype, rounded once.
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, out_dtype_rule={self.out_dtype_rule!r}"


def forward_arity(module: nn.Module) -> int | None:
    """How many parameters ``module.forward`` takes (None if its signature cannot be read)."""
    try:
        return len(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None


def _hf_rmsnorm_match(module: nn.Module) -> tuple[float, str] | None:
    """(eps, out_dtype_rule) if ``module`` behaves as an HF LLaMA-family RMSNorm, else None (left alone).

    Candidates by structure: one 1-D floating Parameter ``weight``, no buffers, no children, a forward
    with one argument, a number ``variance_epsilon`` (or ``eps``). Behaviour is then checked on a private
    copy (the model is not touched, no hooks run) with a random weight, on the weight's device:
      - float32 input rows of normal size (offset from 0) and of size ~sqrt(eps) (so a different eps
        shows), against ``w * x * rsqrt(mean(x^2) + eps)`` in float64; this rejects Gemma's ``(1 + w)``,
        a LayerNorm without bias (mean subtracted), gated norms and modules that ignore their weight;
      - the output dtype for inputs in float32, bfloat16 and float16, with the weight in its own dtype,
        float32 and bfloat16, must follow one of the rules of ``_hf_output_dtype`` (that rule is then
        kept by the drop-in, so it still holds after ``model.to(dtype)``).
    """
    weight = module._parameters.get("weight")
    if (set(module._parameters) != {"weight"} or module._buffers or module._modules or weight is None
            or weight.dim() != 1 or not weight.is_floating_point() or weight.is_meta or weight.numel() == 0):
        return None
    if forward_arity(module) != 1:  # forward(hidden_states) only: a gated norm (x, gate=None) would lose its gate
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        return None
    eps = float(eps)
    n = weight.numel()
    gen = torch.Generator().manual_seed(0)
    try:
        probe = copy.deepcopy(module)
        with torch.no_grad():
            probe.weight.copy_(1.0 + 0.5 * torch.randn(n, generator=gen))
            w64 = probe.weight.detach().double().cpu()
            tiny = math.sqrt(eps) if eps > 0 else 1e-3
            x = torch.cat([torch.randn(2, n, generator=gen) + 1.0, tiny * torch.randn(2, n, generator=gen)])
            x64 = x.double()
            ref = w64 * x64 * torch.rsqrt((x64 * x64).mean(-1, keepdim=True) + eps)
            # The output dtype for every (x dtype, weight dtype) pair: with float32 weights LLaMA's and
            # T5's conventions agree, with bf16 weights they differ; the rule must hold after model.to().
            out_dtypes = {}
            for w_dtype in dict.fromkeys((weight.dtype, torch.float32, torch.bfloat16)):
                probe = probe.to(w_dtype)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    out = probe.forward(x.to(device=weight.device, dtype=dtype))
                    if not isinstance(out, Tensor) or out.shape != x.shape:
                        return None
                    out_dtypes[dtype, w_dtype] = out.dtype
                    if dtype == torch.float32 and w_dtype == weight.dtype:
                        tol = 1e-4 if out.dtype in (torch.float32, torch.float64) else 2e-2
                        err = (out.detach().double().cpu() - ref).abs() / ref.abs().amax(-1, keepdim=True)
                        if not bool((err <= tol).all()):
                            return None
    except Exception:  # a module that cannot run the probe is not a match
        return None
    for rule in ("promote", "input", "weight"):
        if all(_hf_output_dtype(rule, x_dtype, w_dtype) == o for (x_dtype, w_dtype), o in out_dtypes.items()):
            return eps, rule
    return None


def _is_hf_rmsnorm_candidate(module: nn.Module) -> bool:
    """A class of Hugging Face's (transformers, or a model's remote code) or one named ``*RMSNorm``.

    Behaviour alone is not enough: a user's own module that happens to compute an RMS norm may do more
    (clamp, log, ...) outside what the probe sees, and must never be swapped behind the user's back.
    """
    cls = type(module)
    return cls.__module__.split(".")[0] in ("transformers", "transformers_modules") or cls.__name__.endswith("RMSNorm")


# Hook registries moved to the drop-in (the very dict objects, so existing RemovableHandles still work).
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _fused_twin(module: nn.Module) -> nn.Module | None:
    """The fusednorm drop-in for a torch.nn or HF norm, holding the very same Parameter objects.

    Exact classes only: a subclass of nn.LayerNorm / nn.RMSNorm may override forward, so it is left alone.
    """
    if type(module) is nn.LayerNorm:
        twin = LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                         bias=module.bias is not None, device="meta")
    elif type(module) is nn.RMSNorm:
        twin = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta")
    elif (not isinstance(module, (nn.LayerNorm, nn.RMSNorm, HFRMSNorm)) and _is_hf_rmsnorm_candidate(module)
          and (match := _hf_rmsnorm_match(module)) is not None):
        twin = HFRMSNorm(module.weight.numel(), match[0], device="meta", out_dtype_rule=match[1])
    else:
        return None
    # Reuse the Parameter objects (an optimizer may already hold them): no copy, same device/dtype.
    for name, param in module._parameters.items():
        twin._parameters[name] = param
    for name in _HOOK_DICTS:
        if hasattr(module, name):
            setattr(twin, name, getattr(module, name))
    twin._is_full_backward_hook = getattr(module, "_is_full_backward_hook", None)
    twin.train(module.training)
    return twin


def replace_norms(model: nn.Module) -> nn.Module:
    """Swap every norm of ``model`` for fusednorm's drop-in, in place.

    Swapped: torch.nn.LayerNorm -> fusednorm.LayerNorm, torch.nn.RMSNorm -> fusednorm.RMSNorm (those exact
    classes: subclasses may override forward and are left alone), and Hugging Face's LLaMA-family RMSNorm
    classes (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, T5LayerNorm, OLMo-2, ...: classes of transformers
    or of a model's remote code, or named ``*RMSNorm``, recognised by behaviour, see ``_hf_rmsnorm_match``)
    -> fusednorm.HFRMSNorm. Keeps the Parameter objects, device, dtype, training mode, state_dict keys and
    the hooks registered on the module; a module shared by several parents is replaced by one shared
    drop-in. Returns ``model`` (replaced itself if it is a norm, in which case use the return value).
    """
    twins: dict[int, nn.Module] = {}

    def twin_of(module):
        if id(module) not in twins:
            twins[id(module)] = _fused_twin(module)
        return twins[id(module)]

    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and (twin := twin_of(child)) is not None:
                parent._modules[name] = twin
    root = twin_of(model)
    return root if root is not None else model
