"""nn.Module drop-ins with torch.nn's constructor signatures and state_dict keys."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from . import functional as F

_SCALE_KINDS = (None, "scalar", "vector")


def _flat(p: Tensor | None) -> Tensor | None:
    return p.reshape(-1) if p is not None else None


def _normalized_rows(x: Tensor, normalized_shape: tuple[int, ...]) -> Tensor:
    """View x (..., *normalized_shape) as (..., N) so the kernels see one normalized dimension."""
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != tuple(normalized_shape):
        raise ValueError(f"x must end with normalized_shape {tuple(normalized_shape)}, got shape {tuple(x.shape)}")
    return x if k == 1 else x.flatten(x.dim() - k)


class LayerNorm(nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (same arguments, parameters and state_dict keys)."""

    def forward(self, x: Tensor) -> Tensor:
        rows = _normalized_rows(x, self.normalized_shape)
        y = F.layer_norm(rows, _flat(self.weight), _flat(self.bias), self.eps)
        return y.view(x.shape)


class RMSNorm(nn.RMSNorm):
    """Drop-in for torch.nn.RMSNorm; eps=None uses torch.finfo(x.dtype).eps as torch does."""

    def forward(self, x: Tensor) -> Tensor:
        rows = _normalized_rows(x, self.normalized_shape)
        y = F.rms_norm(rows, _flat(self.weight), self.eps)
        return y.view(x.shape)


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
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.dropout_p = float(dropout_p)
        self.prenorm = prenorm
        self.residual_in_fp32 = residual_in_fp32
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


def _fused_twin(module: nn.Module) -> nn.Module | None:
    """The fusednorm drop-in for a torch.nn norm, holding the very same Parameter objects."""
    if isinstance(module, (LayerNorm, RMSNorm)):
        return None
    if isinstance(module, nn.LayerNorm):
        twin = LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                         bias=module.bias is not None, device="meta")
    elif isinstance(module, nn.RMSNorm):
        twin = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta")
    else:
        return None
    # Reuse the Parameter objects (an optimizer may already hold them): no copy, same device/dtype.
    for name, param in module._parameters.items():
        twin._parameters[name] = param
    twin.train(module.training)
    return twin


def replace_norms(model: nn.Module) -> nn.Module:
    """Swap every torch.nn.LayerNorm / torch.nn.RMSNorm in ``model`` for fusednorm's, in place.

    Keeps the Parameter objects, device, dtype, training mode and state_dict keys; a module shared by
    several parents is replaced by one shared drop-in. Returns ``model`` (replaced itself if it is a
    norm, in which case use the return value).
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
