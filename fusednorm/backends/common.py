"""Small rules that every backend and the op layer share."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (so gradcheck is exact); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dresidual_is_dx(residual_scale, scale_value, dropout_p, x_dtype, residual_dtype) -> bool:
    """True when dresidual equals dx element for element, so backends write it only once."""
    return (residual_scale is None and scale_value == 1.0 and dropout_p == 0.0
            and residual_dtype == x_dtype)
