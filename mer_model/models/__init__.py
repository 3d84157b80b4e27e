"""Models of the platform behind one registry (see docs/architecture.md, "Model contract").

Importing this package registers: htnet, mmnet, cva_fpf, mol, ststnet.
"""

from mer_model.models import cva_fpf, htnet, mmnet, mol, ststnet  # noqa: F401  (registration side effects)
from mer_model.models.base import MERModel, count_parameters
from mer_model.models.checkpoint import (
    autocast_dtype,
    load_checkpoint,
    prepare_for_device,
    save_checkpoint,
    to_device_batch,
)
from mer_model.models.registry import (
    create_model,
    list_configs,
    list_models,
    model_inputs,
    model_io,
    model_targets,
    register_model,
    resolve_kwargs,
)

__all__ = [
    "MERModel",
    "autocast_dtype",
    "count_parameters",
    "create_model",
    "list_configs",
    "list_models",
    "load_checkpoint",
    "model_inputs",
    "model_io",
    "model_targets",
    "prepare_for_device",
    "register_model",
    "resolve_kwargs",
    "save_checkpoint",
    "to_device_batch",
]
