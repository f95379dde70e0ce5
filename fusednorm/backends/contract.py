"""The backend contract: what every backend's ``forward`` and ``backward`` take and return.

Every backend module ("torch", "triton", "cuda") provides

    forward(variant: Variant, args: ForwardArgs) -> ForwardResult
    backward(variant: Variant, args: BackwardArgs) -> Gradients

with the shapes below, and allocates its results with ``allocate_forward`` / ``allocate_backward``
(which are also the fake functions of the custom ops: one definition of every result's shape and
dtype). M rows of N columns; (M, N) tensors have unit stride along N (rows may be strided); (N,)
parameters are contiguous; a learned residual_scale is 0-d or (N,).

Results are fresh and contiguous. A result that does not apply is a fresh tensor of shape (0,)
(custom-op results may not alias each other):

- y: (M, N), x's dtype. h: (M, N) in ``variant.h_dtype(x.dtype)`` when ``variant.store_h``, and then
  the statistics are those of the stored (rounded) h, because the backward reads it.
- mean (LayerNorm only) and rstd: (M,), float32 (float64 for float64 x).
- stats (DESIGN section 7, when ``variant.store_stats``): (M, len(STATS_COLUMNS)) float32, one row of
  telemetry per row of x, computed in the compute dtype from the values the kernel holds anyway (see
  STATS_COLUMNS); (0,) otherwise.
- dx: (M, N), x's dtype (= dy's dtype). dresidual: (M, N) in the residual's dtype when
  ``variant.store_dresidual`` (else the caller uses dx for it). dweight, dscale: the parameter's shape and
  dtype; dbias: (N,) in ``bias_dtype``. Column sums are float32 partials over a partition of the rows,
  then one fixed-order reduction: bit-identical run to run.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from ..variant import Variant

# The columns of ``ForwardResult.stats``, per row of N values (f = dropout(x), the branch; r * s, the
# scaled residual stream, 0 without a residual; h = r * s + f as the norm sees it: the stored, rounded h
# when the variant stores h). Means and M2 = sum((v - mean)^2) (two-pass or chunk-merged, never
# E[v^2] - E[v]^2) let the caller merge rows with Chan's formula into a variance over any set of rows.
STATS_COLUMNS = ("mean_branch", "m2_branch", "mean_stream", "m2_stream", "mean_h", "m2_h", "max_abs_h",
                 "nonfinite_h")
# max_abs_h ignores NaN (an Inf counts); nonfinite_h: how many of the row's h values are NaN or +-Inf.
STATS_WIDTH = len(STATS_COLUMNS)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (so gradcheck is exact); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, five times the cost of
# a slotted one, and every eager call builds one of each. Nothing changes them after construction
# (dataclasses.replace makes a new one).
@dataclasses.dataclass(slots=True)
class ForwardArgs:
    """The tensors and host scalars of one forward call (see the module docstring for shapes)."""

    x: Tensor
    residual: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    residual_scale: Tensor | None = None  # learned scale only; a constant one is ``scale_value``
    seed: Tensor | None = None  # int64 (1,) on x's device, when the variant has dropout
    eps: float = 1e-5
    scale_value: float = 1.0
    dropout_p: float = 0.0
    weight_offset: float = 0.0  # the affine weight is (weight + weight_offset)


@dataclasses.dataclass(slots=True)
class BackwardArgs:
    """The tensors and host scalars of one backward call. h is given when ``variant.store_h``, else x
    (and the residual) to rebuild it; the residual also for a learned scale (ds reads it)."""

    dy: Tensor
    mean: Tensor
    rstd: Tensor
    dh_in: Tensor | None = None  # gradient flowing into the returned h (prenorm), or None
    x: Tensor | None = None
    residual: Tensor | None = None
    h: Tensor | None = None
    weight: Tensor | None = None
    residual_scale: Tensor | None = None
    seed: Tensor | None = None
    bias_dtype: torch.dtype | None = None  # dbias is wanted (in this dtype) when not None
    scale_value: float = 1.0
    dropout_p: float = 0.0
    weight_offset: float = 0.0


class ForwardResult(NamedTuple):
    y: Tensor
    h: Tensor
    mean: Tensor
    rstd: Tensor
    stats: Tensor


class Gradients(NamedTuple):
    dx: Tensor
    dresidual: Tensor
    dweight: Tensor
    dbias: Tensor
    dscale: Tensor


def allocate_forward(variant: Variant, x: Tensor) -> ForwardResult:
    """Uninitialised results of a forward over x (M, N), with the contract's shapes and dtypes."""
    rows = x.shape[0]
    stats = compute_dtype(x.dtype)
    return ForwardResult(
        y=x.new_empty(x.shape),
        h=x.new_empty(x.shape if variant.store_h else (0,), dtype=variant.h_dtype(x.dtype)),
        mean=x.new_empty((0,) if variant.is_rms else (rows,), dtype=stats),
        rstd=x.new_empty((rows,), dtype=stats),
        stats=x.new_empty((rows, STATS_WIDTH) if variant.store_stats else (0,), dtype=torch.float32),
    )


def allocate_backward(variant: Variant, dy: Tensor, weight: Tensor | None, residual_scale: Tensor | None,
                      bias_dtype: torch.dtype | None) -> Gradients:
    """Uninitialised gradients of a backward over dy (M, N), with the contract's shapes and dtypes."""
    def like(p: Tensor | None) -> Tensor:
        return dy.new_empty(p.shape, dtype=p.dtype) if p is not None else dy.new_empty((0,))

    store_dr = variant.store_dresidual
    return Gradients(
        dx=dy.new_empty(dy.shape),
        dresidual=dy.new_empty(dy.shape if store_dr else (0,), dtype=variant.residual_dtype(dy.dtype) or dy.dtype),
        dweight=like(weight),
        dbias=dy.new_empty(dy.shape[1:], dtype=bias_dtype) if bias_dtype is not None else dy.new_empty((0,)),
        dscale=like(residual_scale),
    )


def zero_parameter_gradients(grads: Gradients) -> Gradients:
    """For M = 0: the column sums are empty sums, 0."""
    for g in (grads.dweight, grads.dbias, grads.dscale):
        g.zero_()
    return grads
