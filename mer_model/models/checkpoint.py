"""Checkpoints that rebuild themselves, and device placement.

A checkpoint stores the registry name, named configuration, overrides and number of classes next to the weights, so
`load_checkpoint(path)` rebuilds the model without params.yaml.

Device: `prepare_for_device(model, device)` moves the model and, on CUDA, switches convolutional models that declare
`prefers_channels_last` to the channels-last memory layout (inputs are converted by `to_device_batch`). Mixed precision
is the caller's choice: wrap forward and loss in `torch.autocast(device.type, dtype=autocast_dtype(device))`; losses
are computed in float32 by every model, so bfloat16/float16 activations are safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mer_model.errors import MerError
from mer_model.models.base import MERModel
from mer_model.models.registry import create_model

FORMAT = "mer-model-checkpoint/1"


class CheckpointError(MerError):
    """A checkpoint file that cannot be read or rebuilt; the message names the file."""


def save_checkpoint(model: MERModel, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write weights + build spec + test-time augmentation (`model.tta`) (+ free-form `meta`, e.g. fold, epoch,
    metrics) to `path`."""
    spec = getattr(model, "build_spec", None)
    if spec is None:
        raise CheckpointError(f"{path}: model was not built by create_model, it cannot be rebuilt from a checkpoint")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, **spec, "tta": model.tta, "state_dict": state, "meta": dict(meta or {})}, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> MERModel:
    """Rebuild the model saved at `path` (eval mode); the saved meta is on `model.checkpoint_meta`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    model = create_model(blob["name"], blob["config"], num_classes=blob["num_classes"], **blob["overrides"])
    model.load_state_dict(blob["state_dict"])
    model.set_tta(blob.get("tta", "none"))  # checkpoints written before train.tta existed predict one view
    model.checkpoint_meta = blob["meta"]
    return model.to(map_location).eval()


def prepare_for_device(model: MERModel, device: str | torch.device) -> MERModel:
    """Move `model` to `device`; channels-last on CUDA for models that declare it helps."""
    device = torch.device(device)
    model = model.to(device)
    if device.type == "cuda" and model.prefers_channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device_batch(batch: Mapping[str, Tensor], model: MERModel, device: str | torch.device) -> dict[str, Tensor]:
    """Move a batch to `device` (non-blocking); 4-D image tensors follow the model's memory layout."""
    device = torch.device(device)
    channels_last = device.type == "cuda" and model.prefers_channels_last
    out = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=True)
        if channels_last and value.ndim == 4 and value.is_floating_point():
            value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def autocast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where the GPU supports it (no loss scaling needed), else float16; bfloat16 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16
