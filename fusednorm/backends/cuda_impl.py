"""The "cuda" backend: the compiled extension ``fusednorm._C`` built from ``csrc/``.

Importing ``fusednorm._C`` registers its ops in the ``fusednorm`` namespace (C++,
TORCH_LIBRARY_FRAGMENT; csrc/ops.cpp):

- ``torch.ops.fusednorm.cuda_fwd`` / ``cuda_bwd``: the kernels, with the arguments of the op layer's
  ``fusednorm::fwd`` / ``bwd`` (``fusednorm/ops.py``) minus ``backend``: the variant's flag word, which
  csrc/fusednorm.h decodes (its derived facts mirror ``fusednorm.variant.Variant``). On CPU tensors
  they run the same argument checks, ending in a ValueError;
- without a GPU too: ``cuda_launch_config`` (the launch heuristic), ``cuda_variant_facts`` (the C++
  facts of a flag word), ``cuda_keep_threshold`` (the dropout threshold) and ``cuda_philox_r0``.

``forward``/``backward`` below implement the backend contract (``backends/contract.py``). The module
imports without the extension; ``why_unavailable()`` says why the backend cannot run.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import NamedTuple

import torch

from ..variant import Variant
from .contract import BackwardArgs, ForwardArgs, ForwardResult, Gradients, allocate_backward, allocate_forward

_loaded: bool | None = None  # None: not tried yet
_load_error: str | None = None


def _load() -> bool:
    """Imports fusednorm._C once (registering its ops) and adds the fake functions; True on success."""
    global _loaded, _load_error
    if _loaded is not None:
        return _loaded
    if importlib.util.find_spec("fusednorm._C") is None:
        _loaded, _load_error = False, None
        return False
    try:
        importlib.import_module("fusednorm._C")
    except (ImportError, OSError) as error:  # e.g. a CPU-only torch without libc10_cuda.so
        _loaded, _load_error = False, f"{type(error).__name__}: {error}"
        return False
    _register_fakes()
    _loaded = True
    return True


def why_unavailable() -> str | None:
    """None when the cuda backend can run here, else the precise reason (not built / fails to load /
    no GPU)."""
    if importlib.util.find_spec("fusednorm._C") is None:
        return ("cuda backend not built: fusednorm._C is missing; build it with FUSEDNORM_BUILD_CUDA=1 "
                "pip install --no-build-isolation -e . (needs a CUDA build of torch and the CUDA toolkit, "
                "CUDA_HOME at its root)")
    if not _load():
        return f"cuda backend built but fusednorm._C fails to load: {_load_error}"
    if not torch.cuda.is_available():
        return ("cuda backend built (fusednorm._C loads) but no CUDA GPU is available: "
                "torch.cuda.is_available() is False")
    return None


def is_built() -> bool:
    """True when fusednorm._C is present and loads (whether or not a GPU is present)."""
    return _load()


class LaunchConfig(NamedTuple):
    """The kernels' launch configuration (csrc/fusednorm.h, choose_launch)."""

    threads_per_row: int
    rows_per_block: int
    groups_per_thread: int
    chunk_cols: int
    row_fits: bool
    grid: int
    smem_bytes: int


def launch_config(rows: int, cols: int, elem_bytes: int, num_sms: int, blocks_per_sm: int, backward: bool,
                  partial_slots: int = 0) -> LaunchConfig:
    """The heuristic the kernels launch with, for an (rows, cols) input of ``elem_bytes``-byte elements
    on a GPU with ``num_sms`` SMs where ``blocks_per_sm`` blocks fit (occupancy); ``partial_slots``: how
    many of dweight/dbias/dscale the backward accumulates. Needs the extension, not a GPU."""
    if not _load():
        raise RuntimeError(why_unavailable())
    values = torch.ops.fusednorm.cuda_launch_config(rows, cols, elem_bytes, num_sms, blocks_per_sm, backward,
                                                    partial_slots)
    return LaunchConfig(values[0], values[1], values[2], values[3], bool(values[4]), values[5], values[6])


def _require(x: torch.Tensor) -> None:
    if not _load():
        raise RuntimeError(why_unavailable())
    if x.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors, got {x.device.type} tensors; "
                         "use backend='torch' (or 'triton') for CPU tensors")


def forward(variant: Variant, args: ForwardArgs) -> ForwardResult:
    """The backend contract's forward (backends/contract.py)."""
    _require(args.x)
    a = args
    return ForwardResult(*torch.ops.fusednorm.cuda_fwd(
        a.x, a.residual, a.weight, a.bias, a.residual_scale, a.seed, variant.flags, a.eps, a.scale_value, a.dropout_p,
        a.weight_offset))


def backward(variant: Variant, args: BackwardArgs) -> Gradients:
    """The backend contract's backward (backends/contract.py)."""
    _require(args.dy)
    a = args
    return Gradients(*torch.ops.fusednorm.cuda_bwd(
        a.dy, a.dh_in, a.x, a.residual, a.h, a.weight, a.residual_scale, a.mean, a.rstd, a.seed, variant.flags,
        a.scale_value, a.dropout_p, a.weight_offset, a.bias_dtype))


def _register_fakes() -> None:
    """Fake (meta) functions of the C++ ops, so that they trace under torch.compile / FakeTensor."""

    @torch.library.register_fake("fusednorm::cuda_fwd")
    def _cuda_fwd_fake(x, residual, weight, bias, residual_scale, seed, variant, eps, scale_value, dropout_p,
                       weight_offset):
        return tuple(allocate_forward(Variant.from_flags(variant), x))

    @torch.library.register_fake("fusednorm::cuda_bwd")
    def _cuda_bwd_fake(dy, dh_in, x, residual, h, weight, residual_scale, mean, rstd, seed, variant, scale_value,
                       dropout_p, weight_offset, bias_dtype):
        return tuple(allocate_backward(Variant.from_flags(variant), dy, weight, residual_scale, bias_dtype))
