"""Models of the platform behind one registry (see docs/architecture.md, "Model contract").

Importing this package imports every module of it (pkgutil), and so registers every model (htnet, mmnet, cva_fpf,
mol, ststnet): adding a model is adding a module here.
"""

import importlib
import pkgutil

from mer.model.models.base import MERModel, count_parameters
from mer.model.models.checkpoint import (
    autocast_dtype,
    load_checkpoint,
    prepare_for_device,
    save_checkpoint,
    to_device_batch,
)
from mer.model.models.registry import (
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

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
