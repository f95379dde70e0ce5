"""Argument checks shared by the autograd Functions: every misuse raises ValueError or TypeError
naming the argument and what was expected. Nothing is broadcast silently."""

from __future__ import annotations

import numbers

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


def _param_dtypes(x: torch.Tensor) -> tuple[torch.dtype, ...]:
    # Mixed precision keeps norm parameters in float32 while x is 16-bit.
    return (x.dtype,) if x.dtype == torch.float32 else (x.dtype, torch.float32)


def _expected_dtypes(x: torch.Tensor) -> str:
    """"x's dtype (float32)" or "x's dtype (bfloat16) or float32", for the error messages."""
    own = f"x's dtype ({str(x.dtype).removeprefix('torch.')})"
    return own if x.dtype == torch.float32 else f"{own} or float32"


def check_residual(residual: object, x: torch.Tensor) -> None:
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {_describe(residual)}")
    if residual.device != x.device:
        raise ValueError(f"residual must be on x's device {x.device}, got {residual.device}")
    if residual.dtype not in _param_dtypes(x):
        raise TypeError(f"residual must have {_expected_dtypes(x)} (float32: a residual stream kept in "
                        f"float32), got {residual.dtype}")


def check_param(name: str, p: object, x: torch.Tensor) -> None:
    """weight and bias: None or a tensor of shape (N,) on x's device, in x's dtype or float32."""
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    n = x.shape[-1]
    if p.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match x's last dimension, got {_describe(p)}")
    if p.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {p.device}")
    if p.dtype not in _param_dtypes(x):
        raise TypeError(f"{name} must have {_expected_dtypes(x)}, got {p.dtype}")


def check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be a float >= 0, got {eps}")
    return float(eps)


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
    """None, a Python float (constant, e.g. DeepNorm's alpha), or a 0-d / (N,) tensor (learned)."""
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
        if scale.dtype not in _param_dtypes(x):
            raise TypeError(f"residual_scale must have {_expected_dtypes(x)}, got {scale.dtype}")
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError("residual_scale must be None, a Python float or a tensor of shape () or (N,), "
                        f"got {type(scale).__name__}")


def check_weight_offset(weight_offset: object, weight: object) -> float:
    """A finite Python float; the affine weight is (weight + weight_offset), so it needs a weight."""
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, numbers.Real):
        raise TypeError(f"weight_offset must be a Python float, got {type(weight_offset).__name__}")
    weight_offset = float(weight_offset)
    if weight_offset != weight_offset or weight_offset in (float("inf"), float("-inf")):
        raise ValueError(f"weight_offset must be finite, got {weight_offset}")
    if weight_offset != 0.0 and weight is None:
        raise ValueError("weight_offset was given but weight is None: the affine weight is (weight + weight_offset)")
    return weight_offset
