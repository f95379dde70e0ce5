"""The "triton" backend: ``forward``/``backward`` with the contract of ``fusednorm/ops.py``.

Host side only: allocate outputs, turn the optional arguments into the kernels' constexpr flags,
pick the launch with ``heuristics.launch_config`` and reduce the backward's per-program column
sums. No host synchronization (no ``.item()``), so calls can be captured in CUDA graphs. Runs on
CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..backends.common import compute_dtype, dresidual_is_dx
from ..dropout import keep_threshold
from . import heuristics
from .kernels import _backward_kernel, _forward_kernel

_TL_COMPUTE = {torch.float32: "float32", torch.float64: "float64"}


def _hi_lo(value: float) -> tuple[float, float]:
    """A Python float as two float32 words hi + lo (float64 kernels add them back: ~48 bits)."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def _scale_kind(residual_scale: Tensor | None, scale_value: float) -> int:
    if residual_scale is not None:
        return 3 if residual_scale.dim() == 1 else 2
    return 0 if scale_value == 1.0 else 1


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return getattr(tl, _TL_COMPUTE[dtype])


def _row_stride(t: Tensor | None) -> int:
    return t.stride(0) if t is not None else 0


def forward(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
            residual_scale: Tensor | None, scale_value: float, eps: float, dropout_p: float,
            seed: Tensor | None, is_rms: bool, store_h: bool, h_dtype: torch.dtype
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, h, mean, rstd for x: (M, N) (see ops.py). y: (M, N) x's dtype; h: (M, N) h_dtype when
    ``store_h`` else (0,); mean: (M,) (or (0,) for RMSNorm) and rstd: (M,), float32 (float64 for
    float64 x). When h is stored, the statistics are those of the rounded h."""
    rows, cols = x.shape
    cd = compute_dtype(x.dtype)
    y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    h = torch.empty((rows, cols) if store_h else (0,), dtype=h_dtype, device=x.device)
    mean = torch.empty((0,) if is_rms else (rows,), dtype=cd, device=x.device)
    rstd = torch.empty((rows,), dtype=cd, device=x.device)
    if rows == 0:
        return y, h, mean, rstd
    has_dropout = dropout_p > 0.0
    cfg = heuristics.launch_config(rows, cols, x.device, backward=False)
    _forward_kernel[(cfg.num_programs,)](
        x, residual, weight, bias, residual_scale, seed if has_dropout else None,
        y, h if store_h else None, None if is_rms else mean, rstd,
        x.stride(0), _row_stride(residual), y.stride(0), h.stride(0) if store_h else 0,
        rows, cols, cfg.rows_per_program,
        *_hi_lo(eps), *_hi_lo(scale_value), *_hi_lo(1.0 / (1.0 - dropout_p)), keep_threshold(dropout_p),
        COMPUTE=_tl_dtype(cd), BLOCK_N=cfg.block_n, NUM_CHUNKS=cfg.num_chunks, IS_RMS=is_rms,
        HAS_RESIDUAL=residual is not None, SCALE_KIND=_scale_kind(residual_scale, scale_value),
        HAS_DROPOUT=has_dropout, STORE_H=store_h, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps,
    )
    return y, h, mean, rstd


def backward(dy: Tensor, dh_in: Tensor | None, x: Tensor | None, residual: Tensor | None, h: Tensor | None,
             weight: Tensor | None, bias_dtype: torch.dtype | None, residual_scale: Tensor | None,
             scale_value: float, mean: Tensor, rstd: Tensor, dropout_p: float, seed: Tensor | None,
             is_rms: bool, x_dtype: torch.dtype, residual_dtype: torch.dtype | None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, dresidual, dweight, dbias, dscale (see ops.py). Reads h when given, else rebuilds h from
    x and residual in the compute dtype. dx: (M, N) x_dtype; dresidual: (M, N) residual_dtype or (0,)
    (no residual, or equal to dx); dweight/dbias/dscale: the parameter's shape and dtype, or (0,)."""
    rows, cols = dy.shape
    device = dy.device
    cd = compute_dtype(x_dtype)

    def empty() -> Tensor:  # a fresh (0,) placeholder per result: custom-op results may not alias
        return dy.new_empty((0,))

    store_dresidual = residual_dtype is not None and not dresidual_is_dx(
        residual_scale, scale_value, dropout_p, x_dtype, residual_dtype)
    dx = torch.empty((rows, cols), dtype=x_dtype, device=device)
    dresidual = torch.empty((rows, cols), dtype=residual_dtype, device=device) if store_dresidual else empty()
    learned_scale = residual_scale is not None
    if rows == 0:
        def zeros_like_param(p):
            return torch.zeros_like(p) if p is not None else empty()
        dbias = torch.zeros((cols,), dtype=bias_dtype, device=device) if bias_dtype is not None else empty()
        return dx, dresidual, zeros_like_param(weight), dbias, zeros_like_param(residual_scale)

    cfg = heuristics.launch_config(rows, cols, device, backward=True)

    def partial(wanted: bool) -> Tensor | None:
        return torch.empty((cfg.num_programs, cols), dtype=cd, device=device) if wanted else None

    dweight_partial = partial(weight is not None)
    dbias_partial = partial(bias_dtype is not None)
    dscale_partial = partial(learned_scale)
    row_coef = torch.empty((rows, 2), dtype=cd, device=device) if cfg.num_chunks > 1 else None
    has_dropout = dropout_p > 0.0
    recompute_h = h is None
    _backward_kernel[(cfg.num_programs,)](
        dy, dh_in, x if recompute_h else None, residual, h, weight, residual_scale, None if is_rms else mean, rstd,
        seed if has_dropout else None,
        dx, dresidual if store_dresidual else None, dweight_partial, dbias_partial, dscale_partial, row_coef,
        dy.stride(0), _row_stride(dh_in), _row_stride(x), _row_stride(residual), _row_stride(h), dx.stride(0),
        dresidual.stride(0) if store_dresidual else 0,
        rows, cols, cfg.rows_per_program,
        *_hi_lo(scale_value), *_hi_lo(1.0 / (1.0 - dropout_p)), keep_threshold(dropout_p),
        COMPUTE=_tl_dtype(cd), BLOCK_N=cfg.block_n, NUM_CHUNKS=cfg.num_chunks, IS_RMS=is_rms,
        RECOMPUTE_H=recompute_h, HAS_RESIDUAL=residual_dtype is not None,
        SCALE_KIND=_scale_kind(residual_scale, scale_value), HAS_DROPOUT=has_dropout,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias_dtype is not None, HAS_DH_IN=dh_in is not None,
        STORE_DRESIDUAL=store_dresidual, num_warps=cfg.num_warps,
    )
    # One fixed-order reduction over the programs' float32 partial sums: deterministic.
    dweight = dweight_partial.sum(0).to(weight.dtype) if weight is not None else empty()
    dbias = dbias_partial.sum(0).to(bias_dtype) if bias_dtype is not None else empty()
    dscale = empty()
    if learned_scale:
        per_column = dscale_partial.sum(0)
        dscale = (per_column if residual_scale.dim() == 1 else per_column.sum()).to(residual_scale.dtype)
    return dx, dresidual, dweight, dbias, dscale
