"""fusednorm: fused residual-add + LayerNorm/RMSNorm with residual scaling (Admin, DeepNorm).

See README.md for usage and DESIGN.md for the math and the contract.
"""

from . import models, ops  # noqa: F401  (ops registers torch.ops.fusednorm.*; models: reference encoders)
from .admin import admin_init, deepnorm_constants
from .backends import BackendUnavailableError, available_backends, get_backend, set_backend
from .functional import (
    AddLayerNormFunction,
    AddRMSNormFunction,
    LayerNormFunction,
    RMSNormFunction,
    add_layer_norm,
    add_rms_norm,
    layer_norm,
    rms_norm,
)
from .integrations.norms import replace_norms
from .models import deepnorm_init_
from .modules import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm
from .monitor import monitor  # fusednorm.monitor is this function; ``from fusednorm.monitor import Monitor``

__version__ = "0.1.0"

__all__ = [
    "AddLayerNorm", "AddLayerNormFunction", "AddRMSNorm", "AddRMSNormFunction",
    "BackendUnavailableError", "LayerNorm", "LayerNormFunction", "RMSNorm", "RMSNormFunction",
    "add_layer_norm", "add_rms_norm", "admin_init", "available_backends", "deepnorm_constants",
    "deepnorm_init_", "get_backend", "layer_norm", "monitor",
    "replace_norms", "rms_norm", "set_backend",
]
