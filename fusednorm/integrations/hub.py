"""fusednorm's norms as layers of the Hugging Face ``kernels`` hub convention.

transformers marks its RMSNorm classes ``@use_kernel_forward_from_hub("RMSNorm")`` (LlamaRMSNorm and ~130
copies: ``weight * h.to(input_dtype)``, eps in ``variance_epsilon``) or ``"RMSNormZeroCentered"`` (Qwen3.5's
Gemma-style ``(1 + w)``, computed in float32 and cast to the input's dtype, eps in ``eps``); any other class
can be marked with ``kernels.replace_kernel_forward_from_hub(nn.LayerNorm, "LayerNorm")``.
``kernels.kernelize(model, mode=..., device=...)`` then replaces the forward of every marked module by the
forward of the layer its name maps to. The layers here are stateless, as the convention requires (no
``__init__``, no members beyond ``forward``, ``has_backward`` and ``can_torch_compile``): their forward reads
the module's own ``weight`` / ``bias`` / eps, so Parameters and state_dict stay as they are::

    from kernels import Mode, kernelize, use_kernel_mapping
    from fusednorm.integrations.hub import kernel_mapping

    with use_kernel_mapping(kernel_mapping()):                   # or kernel_mapping(repo_path=some_dir)
        kernelize(model, mode=Mode.TRAINING | Mode.TORCH_COMPILE, device="cuda")

``kernel_mapping()`` maps to :class:`Repository` (this module, in process); with ``repo_path`` it writes
a local kernel repository there (:func:`write_local_kernel`: ``metadata.json`` and an ``__init__.py``
whose ``layers`` are these classes) and maps to ``kernels.LocalLayerRepository`` entries on it. Nothing is
downloaded either way. The ``kernels`` package is needed only for ``kernelize`` and the local repository.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from ..modules import layer_norm_like_torch
from .norms import hf_rms_norm

__all__ = ["LAYER_NAMES", "LayerNorm", "RMSNorm", "RMSNormZeroCentered", "Repository", "kernel_mapping",
           "write_local_kernel"]

LAYER_NAMES = ("RMSNorm", "RMSNormZeroCentered", "LayerNorm")


class RMSNorm(nn.Module):
    """For transformers' "RMSNorm" classes: ``weight * (x * rsqrt(mean(x^2) + variance_epsilon))`` with float32
    statistics, output promote_types(x, weight) as LlamaRMSNorm's. x: (..., N)."""

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hf_rms_norm(hidden_states, self.weight, self.variance_epsilon, "promote")


class RMSNormZeroCentered(nn.Module):
    """For transformers' "RMSNormZeroCentered" classes: ``(1 + weight) * (x * rsqrt(mean(x^2) + eps))``, the
    sum and the product in float32, output in x's dtype. x: (..., N)."""

    has_backward = True
    can_torch_compile = True

    def forward(self, x: Tensor) -> Tensor:
        return hf_rms_norm(x, self.weight, self.eps, "input", weight_offset=1.0)


class LayerNorm(nn.Module):
    """For torch.nn.LayerNorm marked "LayerNorm": its result (dtype, autocast behaviour) from fusednorm."""

    has_backward = True
    can_torch_compile = True

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm_like_torch(input, self.normalized_shape, self.weight, self.bias, self.eps)


class Repository:
    """A ``kernels`` repository (``load()`` returns the layer class) for one layer of this module, in process."""

    def __init__(self, layer_name: str):
        if layer_name not in LAYER_NAMES:
            raise ValueError(f"layer_name must be one of {LAYER_NAMES}, got {layer_name!r}")
        self.layer_name = layer_name

    def load(self) -> type[nn.Module]:
        return globals()[self.layer_name]

    def __eq__(self, other) -> bool:
        return isinstance(other, Repository) and other.layer_name == self.layer_name

    def __hash__(self) -> int:
        return hash((Repository, self.layer_name))

    def __str__(self) -> str:
        return f"fusednorm.integrations.hub (layer `{self.layer_name}`)"


_INIT = '''"""fusednorm's norms for the kernels hub convention (written by fusednorm.integrations.hub)."""
from fusednorm.integrations import hub as layers  # noqa: F401
'''
_METADATA = {"id": "fusednorm_hub_layers", "name": "fusednorm-hub", "version": 1, "license": "Apache-2.0",
             "python-depends": [], "backend": {"type": "universal"}}


def write_local_kernel(path: str | Path) -> Path:
    """Write a local kernel repository (one universal build variant: metadata.json and __init__.py) to
    ``path``, for ``kernels.LocalLayerRepository(path, layer_name=...)``. Returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "metadata.json").write_text(json.dumps(_METADATA))
    (path / "__init__.py").write_text(_INIT)
    return path


def kernel_mapping(repo_path: str | Path | None = None, devices: tuple[str, ...] = ("cuda",)) -> dict:
    """A mapping for ``kernels.use_kernel_mapping`` / ``register_kernel_mapping``: every name of
    ``LAYER_NAMES`` to fusednorm's layer on each of ``devices`` ("cuda"; "cpu" runs the torch backend, or the
    interpreted Triton kernels under TRITON_INTERPRET=1), for every mode. repo_path: write a local kernel
    repository there and map to it (``kernels.LocalLayerRepository``); None: :class:`Repository`."""
    if repo_path is not None:
        from kernels import LocalLayerRepository

        path = write_local_kernel(repo_path)
        repo = lambda name: LocalLayerRepository(path, layer_name=name)  # noqa: E731
    else:
        repo = Repository
    return {name: {device: repo(name) for device in devices} for name in LAYER_NAMES}
