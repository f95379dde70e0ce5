"""The CPU eager path (issue 15, item 3): ATen's own ops under autograd, where they compute what the
torch backend computes.

On the CPU there is no fused kernel: the "torch" backend is a reference written for clarity. For the calls
that ATen's composed ops (add, F.layer_norm / F.rms_norm, and a seed-regenerated dropout that saves no
mask) compute with the same roundings and the same saved-tensor budget, the eager layer
(``fusednorm.functional``) calls ``call`` instead of the autograd Function, so a CPU model costs what
torch.nn's own modules cost. ``usable`` decides, once per call signature (the plan cache of
``fusednorm.functional``), from facts that signature holds: dtypes, devices, the Variant, the backend.

STUB: ``usable`` returns False until the CPU path is built; ``call`` is its interface.
"""

from __future__ import annotations

from torch import Tensor

from .variant import Variant


def usable(variant: Variant, backend: str, x: Tensor, residual: Tensor | None, weight: Tensor | None,
           bias: Tensor | None, residual_scale: float | Tensor | None, weight_offset: float) -> bool:
    """True when ``call`` computes this call exactly as the torch backend would (eager, plain CPU tensors,
    backend "torch", no telemetry). Depends only on types, dtypes, devices and the Variant."""
    return False


def call(variant: Variant, x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
         residual_scale: float | Tensor | None, eps: float, scale_value: float,
         dropout_p: float) -> Tensor | tuple[Tensor, Tensor]:
    """y, or (y, h) for a Pre-LN variant, in x's shape, differentiable by autograd (x, residual: (..., N) as
    the caller gave them; weight, bias: (N,); residual_scale: as given)."""
    raise NotImplementedError("fusednorm.cpu_path.call: the CPU path is not built yet")
