"""Argument checks shared by the autograd Functions: every misuse raises ValueError or TypeError
naming the argument and what was expected. Nothing is broadcast silently."""

from __future__ import annotations

import math
import numbers
import sys

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_input(x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise TypeError("x must be a dense (strided) tensor, got a nested tensor: pad it, or run the norm on "
                        "its values (x.values() for a jagged layout)")
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense (strided) tensor, got layout {x.layout}: call x.to_dense() first")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., N), got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a last dimension N >= 1, got {_describe(x)}")


def _residual_dtypes(x: torch.Tensor) -> tuple[torch.dtype, ...]:
    # The residual stream is x's dtype, or float32 (residual_in_fp32 kept the stream in float32).
    return (x.dtype,) if x.dtype == torch.float32 else (x.dtype, torch.float32)


def _expected_dtypes(x: torch.Tensor) -> str:
    """"x's dtype (float32)" or "x's dtype (bfloat16) or float32", for the residual's error message."""
    own = f"x's dtype ({str(x.dtype).removeprefix('torch.')})"
    return own if x.dtype == torch.float32 else f"{own} or float32"


def _check_param_dtype(name: str, p: torch.Tensor) -> None:
    """weight, bias and a residual_scale tensor: any floating dtype, whatever x's (FSDP mixed precision
    hands bf16 parameters to float32 activations); the backends compute with them in float32 (float64
    for float64 x) and return their gradients in their own dtype."""
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor (any of them, whatever "
                        f"x's dtype), got {p.dtype}")


def check_residual(residual: object, x: torch.Tensor) -> None:
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {_describe(residual)}")
    if residual.device != x.device:
        raise ValueError(f"residual must be on x's device {x.device}, got {residual.device}")
    if residual.dtype not in _residual_dtypes(x):
        raise TypeError(f"residual must have {_expected_dtypes(x)} (float32: a residual stream kept in "
                        f"float32), got {residual.dtype}")


def check_param(name: str, p: object, x: torch.Tensor) -> None:
    """weight and bias: None or a tensor of shape (N,) on x's device, in any floating dtype."""
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    n = x.shape[-1]
    if p.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match x's last dimension, got {_describe(p)}")
    if p.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {p.device}")
    _check_param_dtype(name, p)


def _as_float(value: numbers.Real) -> float:
    """float(value); an integer too large for a float64 is +-inf (float() would raise OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _finite(value: float) -> bool:
    """Whether value is finite, in comparisons only: torch.compile traces them on a symbolic float
    (math.isfinite would break the graph)."""
    return abs(value) <= sys.float_info.max


def check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__}")
    value = _as_float(eps)
    # eps = inf would make every rstd 0 (y = bias whatever x), NaN every output NaN: neither is a norm.
    if not (value >= 0.0 and _finite(value)):
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    return value


def check_dropout_p(dropout_p: object) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a Python float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_residual_scale(scale: object, residual: object, x: torch.Tensor) -> None:
    """None, a finite Python float (constant, e.g. DeepNorm's alpha), or a 0-d / (N,) tensor (learned) of
    any floating dtype."""
    if scale is None:
        return
    if residual is None:
        raise ValueError("residual_scale was given but residual is None: the scale multiplies the residual")
    if isinstance(scale, torch.Tensor):
        n = x.shape[-1]
        if scale.shape not in ((), (n,)):
            raise ValueError(f"residual_scale must be a 0-d tensor or have shape ({n},), got {_describe(scale)}")
        if scale.device != x.device:
            raise ValueError(f"residual_scale must be on x's device {x.device}, got {scale.device}")
        _check_param_dtype("residual_scale", scale)
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError("residual_scale must be None, a Python float or a tensor of shape () or (N,), "
                        f"got {type(scale).__name__}")
    if not _finite(_as_float(scale)):
        raise ValueError(f"residual_scale must be a finite float, got {scale}")


def check_weight_offset(weight_offset: object, weight: object) -> float:
    """A finite Python float; the affine weight is (weight + weight_offset), so it needs a weight."""
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, numbers.Real):
        raise TypeError(f"weight_offset must be a Python float, got {type(weight_offset).__name__}")
    weight_offset = _as_float(weight_offset)
    if not _finite(weight_offset):
        raise ValueError(f"weight_offset must be finite, got {weight_offset}")
    if weight_offset != 0.0 and weight is None:
        raise ValueError("weight_offset was given but weight is None: the affine weight is (weight + weight_offset)")
    return weight_offset
