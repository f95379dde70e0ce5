"""nn.Module drop-ins with torch.nn's constructor signatures and state_dict keys.

Every module takes a keyword-only ``weight_offset`` (float, default 0.0): the affine weight is
``weight + weight_offset``, summed in float32 (Gemma's ``(1 + w)``, TransformerEngine's zero-centred
gamma). With an offset the weight is initialised to ``1 - weight_offset`` (zeros for Gemma's 1.0), so a
fresh module still starts as the identity affine map; the state_dict holds the stored ``weight``.

Autocast: torch's autocast runs ``layer_norm`` and ``rms_norm`` in float32 on CUDA (both are on its
fp32 list) and leaves them alone on the CPU. The drop-ins do the same: under CUDA autocast a 16-bit
input is computed in float32 and the output is float32, as torch.nn.LayerNorm / RMSNorm return; on the
CPU the output has the input's dtype. AddLayerNorm / AddRMSNorm are not torch drop-ins and never cast:
y has x's dtype and h the residual's (float32 with ``residual_in_fp32``), also under autocast (the next
matmul casts y to the autocast dtype anyway; a float32 y would only cost bytes).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from . import _validate
from . import functional as F

# Device types whose autocast puts layer_norm and rms_norm on the fp32 list (torch's
# testing/_internal/autocast_test_lists.py: AutocastTestLists.torch_fp32 is CUDA's; the CPU lists do
# not name them, so CPU autocast runs them in the input's dtype).
AUTOCAST_FP32_NORM_DEVICES = ("cuda",)


_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)  # the x dtypes autocast may compute these norms in float32


def autocast_norm_dtype(x: Tensor) -> torch.dtype:
    """The dtype torch.nn.LayerNorm / RMSNorm compute in and return for ``x`` under the current autocast
    state: float32 for 16-bit x under CUDA autocast, x's dtype otherwise."""
    if (x.dtype in _AUTOCAST_DTYPES and x.device.type in AUTOCAST_FP32_NORM_DEVICES
            and torch.is_autocast_enabled(x.device.type)):
        return torch.float32
    return x.dtype


def _autocast_may_upcast(x: Tensor) -> bool:
    """Whether ``autocast_norm_dtype(x)`` may differ from x's dtype: 16-bit x while the autocast of a device in
    AUTOCAST_FP32_NORM_DEVICES is on. The modules' common call answers this without reading x's device."""
    if x.dtype in _AUTOCAST_DTYPES:
        for device_type in AUTOCAST_FP32_NORM_DEVICES:
            if torch.is_autocast_enabled(device_type):
                return True
    return False


def _flat(p: Tensor | None) -> Tensor | None:
    return p.reshape(-1) if p is not None else None


def _normalized_rows(x: Tensor, normalized_shape: tuple[int, ...]) -> Tensor:
    """View x (..., *normalized_shape) as (..., N) so the kernels see one normalized dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    k = len(normalized_shape)
    shape = x.shape
    if shape[len(shape) - k:] != tuple(normalized_shape):
        raise ValueError(f"x must end with normalized_shape {tuple(normalized_shape)}, got shape {tuple(shape)}")
    return x if k == 1 else x.flatten(len(shape) - k)


_MISSING = object()


def _parameter(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` for a parameter, read from ``module._parameters``: nn.Module.__getattr__ runs only after
    a failed ordinary lookup and costs about a microsecond per parameter per call. Anything else holding the
    name (a parametrization's property, a plain tensor attribute set by a wrapper) is read as usual."""
    p = module._parameters.get(name, _MISSING)
    return getattr(module, name) if p is _MISSING else p


def _unflatten(y: Tensor, shape: torch.Size) -> Tensor:
    """y back in x's shape. No view when the shape already matches (one normalized dimension): a module
    output that is an autograd view makes FSDP2 warn that in-place ops on it skip its hooks."""
    return y if y.shape == shape else y.view(shape)


def layer_norm_like_torch(x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None,
                          eps: float, weight_offset: float = 0.0) -> Tensor:
    """torch.nn.functional.layer_norm's result (shape, dtype, autocast behaviour) computed by fusednorm.
    x: (..., *normalized_shape); weight, bias: normalized_shape or None."""
    rows = _normalized_rows(x, normalized_shape)
    if len(normalized_shape) != 1:  # parameters of normalized_shape (N,) are (N,) already (the checks say if not)
        weight, bias = _flat(weight), _flat(bias)
    if autocast_norm_dtype(x) != x.dtype:  # CUDA autocast: torch casts input and parameters to float32
        rows = rows.float()
        weight, bias = (p.float() if p is not None else None for p in (weight, bias))
    y = F._call_norm(False, rows, weight, bias, eps, weight_offset, None)  # layer_norm
    return y if rows is x else _unflatten(y, x.shape)


def rms_norm_like_torch(x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float | None,
                        weight_offset: float = 0.0) -> Tensor:
    """torch.nn.functional.rms_norm's result (shape, dtype, autocast behaviour, eps=None) computed by fusednorm.
    A weight that is neither the compute dtype nor float32 is upcast on the way in (its gradient flows back
    in its own dtype), as torch accepts any weight dtype."""
    rows = _normalized_rows(x, normalized_shape)
    if autocast_norm_dtype(x) != x.dtype:
        rows = rows.float()
    if len(normalized_shape) != 1:
        weight = _flat(weight)
    if weight is not None and weight.dtype not in (rows.dtype, torch.float32):
        weight = weight.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
    y = F._call_norm(True, rows, weight, None, eps, weight_offset, None)  # rms_norm
    return y if rows is x else _unflatten(y, x.shape)


def _set_weight_offset(module: nn.Module, weight_offset: object) -> None:
    """Validate and store ``weight_offset``; start the affine weight (weight + offset) at 1."""
    module.weight_offset = _validate.check_weight_offset(weight_offset, module.weight)
    _init_offset_weight(module)


def _init_offset_weight(module: nn.Module) -> None:
    if module.weight is not None and getattr(module, "weight_offset", 0.0) != 0.0:
        with torch.no_grad():
            module.weight.fill_(1.0 - module.weight_offset)


def _offset_repr(module: nn.Module) -> str:
    return f", weight_offset={module.weight_offset}" if module.weight_offset != 0.0 else ""


class LayerNorm(nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (same arguments, parameters and state_dict keys), plus weight_offset.

    x: (..., *normalized_shape). Returns x's shape and dtype (float32 for 16-bit x under CUDA autocast).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, weight_offset: float = 0.0):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        _set_weight_offset(self, weight_offset)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        _init_offset_weight(self)

    def forward(self, x: Tensor) -> Tensor:
        params = self._parameters  # read directly: see _parameter
        weight, bias = params.get("weight", _MISSING), params.get("bias", _MISSING)
        if weight is _MISSING or bias is _MISSING:
            weight, bias = _parameter(self, "weight"), _parameter(self, "bias")
        if (type(x) is Tensor and x.shape[-1:] == self.normalized_shape
                and (x.dtype not in _AUTOCAST_DTYPES or not _autocast_may_upcast(x))):  # float32 x: no call
            # x is (..., N) as the functional layer takes it, and no autocast cast applies: the common call
            return F._call_norm(False, x, weight, bias, self.eps, self.weight_offset, None)
        return layer_norm_like_torch(x, self.normalized_shape, weight, bias, self.eps, self.weight_offset)

    def extra_repr(self) -> str:
        return super().extra_repr() + _offset_repr(self)


class RMSNorm(nn.RMSNorm):
    """Drop-in for torch.nn.RMSNorm (same arguments, parameters and state_dict keys), plus weight_offset.

    eps=None behaves as torch's: the epsilon of the dtype the statistics are computed in (float32's for
    16-bit x, which torch upcasts; float64's for float64 x). The output has x's dtype, as torch's does
    (float32 for 16-bit x under CUDA autocast), also when the weight has another dtype (a weight that is
    neither x's dtype nor float32 is upcast to float32 -- float64 for float64 x -- on the way in; its
    gradient flows back in its own dtype).
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, weight_offset: float = 0.0):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        _set_weight_offset(self, weight_offset)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        _init_offset_weight(self)

    def forward(self, x: Tensor) -> Tensor:
        weight = self._parameters.get("weight", _MISSING)
        if weight is _MISSING:
            weight = _parameter(self, "weight")
        if (type(x) is Tensor and x.shape[-1:] == self.normalized_shape
                and (x.dtype not in _AUTOCAST_DTYPES or not _autocast_may_upcast(x))
                and (weight is None or weight.dtype == x.dtype or weight.dtype == torch.float32)):
            return F._call_norm(True, x, weight, None, self.eps, self.weight_offset, None)
        return rms_norm_like_torch(x, self.normalized_shape, weight, self.eps, self.weight_offset)

    def extra_repr(self) -> str:
        return super().extra_repr() + _offset_repr(self)


class _AddNorm(nn.Module):
    """Shared body of AddLayerNorm and AddRMSNorm: y = Norm(residual * s + dropout(x))."""

    def __init__(self, normalized_shape: int, eps, elementwise_affine: bool, bias: bool,
                 residual_scale, dropout_p: float, prenorm: bool, residual_in_fp32: bool,
                 device=None, dtype=None, weight_offset: float = 0.0):
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
            if bias:
                self.bias = nn.Parameter(torch.zeros(n, **factory))
            else:
                self.register_parameter("bias", None)  # in _parameters, as torch.nn.LayerNorm(bias=False) has it
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
        _set_weight_offset(self, weight_offset)

    _is_rms: bool  # AddRMSNorm's, else AddLayerNorm's

    def forward(self, x: Tensor, residual: Tensor | None):
        """F.add_layer_norm / F.add_rms_norm with this module's parameters and options; (y, h) when prenorm."""
        params = self._parameters  # read directly: see _parameter (AddRMSNorm's bias is None)
        weight, bias, scale = (params.get("weight", _MISSING), params.get("bias", _MISSING),
                               params.get("residual_scale", _MISSING))
        if weight is _MISSING or bias is _MISSING or scale is _MISSING:
            weight, bias, scale = (_parameter(self, "weight"), _parameter(self, "bias"),
                                   _parameter(self, "residual_scale"))
        # positionally: keyword arguments cost on every call
        return F._call(self._is_rms, x, residual, weight, bias, self.eps,
                       scale if scale is not None else self.scale_constant,
                       self.dropout_p if self.training else 0.0, self.prenorm, self.residual_in_fp32,
                       self.weight_offset, None)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"residual_scale={self.residual_scale_kind!r}, dropout_p={self.dropout_p}, "
                f"prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}" + _offset_repr(self))


class AddLayerNorm(_AddNorm):
    """y = LayerNorm(residual * s + dropout(x)); returns (y, h) when prenorm.

    residual_scale: None, a float (constant, DeepNorm's alpha), "scalar" or "vector" (learned
    Parameter ``residual_scale``, initialised to 1: Admin's omega). Keys: weight, bias, residual_scale.
    x, residual: (..., N); y in x's dtype, h in the residual's (float32 with residual_in_fp32); no autocast
    cast (see the module docstring).
    """

    _is_rms = False

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, residual_scale=None, dropout_p: float = 0.0,
                 prenorm: bool = False, residual_in_fp32: bool = False, weight_offset: float = 0.0):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, residual_scale, dropout_p, prenorm,
                         residual_in_fp32, device, dtype, weight_offset)


class AddRMSNorm(_AddNorm):
    """y = RMSNorm(residual * s + dropout(x)); options as AddLayerNorm. Keys: weight, residual_scale."""

    _is_rms = True

    def __init__(self, normalized_shape: int, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, residual_scale=None, dropout_p: float = 0.0, prenorm: bool = False,
                 residual_in_fp32: bool = False, weight_offset: float = 0.0):
        super().__init__(normalized_shape, eps, elementwise_affine, False, residual_scale, dropout_p, prenorm,
                         residual_in_fp32, device, dtype, weight_offset)
