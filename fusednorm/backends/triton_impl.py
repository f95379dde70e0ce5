"""The "triton" backend: ``forward(variant, ForwardArgs)`` / ``backward(variant, BackwardArgs)`` with
the contract of ``backends/contract.py``, over the kernels of ``fusednorm/triton/``.

Host side only: allocate the results, pass the variant's constexpr flags
(``Variant.triton_forward_flags`` / ``triton_backward_flags``), pick the launch with
``heuristics.launch_config`` (a pure function of (M, N, dtype, variant): the same partition, so the same
gradient bits, on every GPU) and reduce the backward's per-program column sums with one fixed-order
kernel launch. No host synchronization (no ``.item()``), so calls can be captured in CUDA graphs. Runs
on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported.
"""

from __future__ import annotations

import struct

import torch
import triton
from torch import Tensor

from ..dropout import keep_threshold
from ..triton import heuristics
from ..triton.backward import _backward_kernel, _reduce_partials_kernel
from ..triton.forward import _forward_kernel
from ..variant import ScaleKind, Variant
from .contract import (
    BackwardArgs,
    ForwardArgs,
    ForwardResult,
    Gradients,
    allocate_backward,
    allocate_forward,
    compute_dtype,
    zero_parameter_gradients,
)


def float_words(value: float) -> tuple[int, int]:
    """The bits of ``value`` as a float64, as two signed int32 words (hi, lo): ``helpers.host_scalar``."""
    lo, hi = struct.unpack("<ii", struct.pack("<d", float(value)))
    return hi, lo


def _tl_compute(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def _row_stride(t: Tensor | None) -> int:
    return t.stride(0) if t is not None else 0


def _dropout_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p)


def forward(variant: Variant, args: ForwardArgs) -> ForwardResult:
    x = args.x
    rows, cols = x.shape
    out = allocate_forward(variant, x)
    if rows == 0:
        return out
    cfg = heuristics.launch_config(rows, cols, backward=False, variant=variant, dtype=x.dtype)
    _forward_kernel[(cfg.num_programs,)](
        x, args.residual, args.weight, args.bias, args.residual_scale, args.seed,
        out.y, out.h if variant.store_h else None, None if variant.is_rms else out.mean, out.rstd,
        out.stats if variant.store_stats else None,
        x.stride(0), _row_stride(args.residual), out.y.stride(0), out.h.stride(0) if variant.store_h else 0,
        rows, cols, cfg.rows_per_program,
        *float_words(args.eps), *float_words(args.scale_value), *float_words(_dropout_scale(args.dropout_p)),
        *float_words(args.weight_offset), keep_threshold(args.dropout_p),
        COMPUTE=_tl_compute(x.dtype), BLOCK_N=cfg.block_n, ROWS=cfg.tile_rows, NUM_CHUNKS=cfg.num_chunks,
        NUM_STAGES=cfg.num_stages, PARAMS_PER_ROW=cfg.params_per_row,
        num_warps=cfg.num_warps, maxnreg=cfg.max_registers, **variant.triton_forward_flags(),
    )
    return out


# The reduction of the backward's partials: BLOCK_C columns per program, STRANDS running sums per column.
REDUCE_BLOCK_C = 64
REDUCE_STRANDS = 16


def backward(variant: Variant, args: BackwardArgs) -> Gradients:
    dy = args.dy
    rows, cols = dy.shape
    grads = allocate_backward(variant, dy, args.weight, args.residual_scale, args.bias_dtype)
    if rows == 0:
        return zero_parameter_gradients(grads)
    cd = compute_dtype(dy.dtype)
    cfg = heuristics.launch_config(rows, cols, backward=True, variant=variant, dtype=dy.dtype)
    programs = cfg.num_programs

    def partial(wanted: bool, shape: tuple[int, ...]) -> Tensor | None:
        return torch.empty(shape, dtype=cd, device=dy.device) if wanted else None

    has_weight, has_bias = args.weight is not None, args.bias_dtype is not None
    dweight_partial = partial(has_weight, (programs, cols))
    dbias_partial = partial(has_bias, (programs, cols))
    scalar_scale = variant.scale_kind == ScaleKind.SCALAR
    dscale_partial = partial(variant.learned_scale, (programs,) if scalar_scale else (programs, cols))
    row_coef = torch.empty((rows, 2), dtype=cd, device=dy.device) if cfg.num_bands > 1 else None
    _backward_kernel[(programs,)](
        dy, args.dh_in, None if variant.store_h else args.x, args.residual, args.h, args.weight,
        args.residual_scale, None if variant.is_rms else args.mean, args.rstd, args.seed,
        grads.dx, grads.dresidual if variant.store_dresidual else None, dweight_partial, dbias_partial,
        dscale_partial, row_coef,
        dy.stride(0), _row_stride(args.dh_in), _row_stride(args.x), _row_stride(args.residual),
        _row_stride(args.h), grads.dx.stride(0), grads.dresidual.stride(0) if variant.store_dresidual else 0,
        rows, cols, cfg.rows_per_program, cfg.num_bands,
        *float_words(args.scale_value), *float_words(_dropout_scale(args.dropout_p)), *float_words(args.weight_offset),
        keep_threshold(args.dropout_p),
        COMPUTE=_tl_compute(dy.dtype), BLOCK_N=cfg.block_n, ROWS=cfg.tile_rows, BAND_CHUNKS=cfg.band_chunks,
        MULTI_BAND=cfg.num_bands > 1, GROUP=cfg.group_rows, NUM_STAGES=cfg.num_stages,
        PARAMS_PER_ROW=cfg.params_per_row,
        num_warps=cfg.num_warps, maxnreg=cfg.max_registers,
        **variant.triton_backward_flags(has_dh_in=args.dh_in is not None),
    )
    if has_weight or has_bias or variant.learned_scale:
        # One fixed-order reduction of every partial buffer, written in each parameter's dtype.
        _reduce_partials_kernel[(triton.cdiv(cols, REDUCE_BLOCK_C),)](
            dweight_partial, dbias_partial, dscale_partial,
            grads.dweight if has_weight else None, grads.dbias if has_bias else None,
            grads.dscale if variant.learned_scale else None, programs, cols,
            BLOCK_C=REDUCE_BLOCK_C, STRANDS=REDUCE_STRANDS, COMPUTE=_tl_compute(dy.dtype), HAS_WEIGHT=has_weight,
            HAS_BIAS=has_bias, SCALE_KIND=int(variant.scale_kind), num_warps=4,
        )
    return grads
