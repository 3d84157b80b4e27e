"""Checkpoints that rebuild themselves, and device placement.

A checkpoint stores the registry name, named configuration, overrides and number of classes next to the weights, so
`load_checkpoint(path)` rebuilds the model without params.yaml.

Integrity: torch's zip reader does not check the archive's CRCs, so flipped bytes in the weights load without a word
and change every prediction. A checkpoint therefore records a SHA-256 of its content (`content_digest`: the build
spec, meta and every tensor's name, dtype, shape and bytes), checked on load; a mismatch, weights that are not finite,
or weights that do not fit the model the checkpoint describes (e.g. an edited class count) are a CheckpointError
naming the file, never a model.

Device: `prepare_for_device(model, device)` moves the model and, on CUDA, switches convolutional models that declare
`prefers_channels_last` to the channels-last memory layout (inputs are converted by `to_device_batch`). Mixed precision
is the caller's choice: wrap forward and loss in `torch.autocast(device.type, dtype=autocast_dtype(device))`; losses
are computed in float32 by every model, so bfloat16/float16 activations are safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mer.model.errors import MerError
from mer.model.io import write_with
from mer.model.models.base import MERModel
from mer.model.models.registry import create_model

log = logging.getLogger(__name__)

FORMAT = "mer-model-checkpoint/1"


class CheckpointError(MerError):
    """A checkpoint file that cannot be read or rebuilt; the message names the file."""


def save_checkpoint(model: MERModel, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write weights + build spec + test-time augmentation (`model.tta`) (+ free-form `meta`, e.g. fold, epoch,
    metrics) to `path`."""
    spec = getattr(model, "build_spec", None)
    if spec is None:
        raise CheckpointError(f"{path}: model was not built by create_model, it cannot be rebuilt from a checkpoint")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"format": FORMAT, **spec, "tta": model.tta, "state_dict": state, "meta": dict(meta or {})}
    return write_with(path, lambda out: torch.save({**blob, "digest": content_digest(blob)}, out))


def content_digest(blob: Mapping[str, Any]) -> str:
    """SHA-256 over everything in a checkpoint but its digest: the other fields as canonical JSON, then each tensor
    of `state_dict` (sorted by name) as name, dtype, shape and raw bytes."""
    sha = hashlib.sha256()
    rest = {k: v for k, v in blob.items() if k not in ("state_dict", "digest")}
    sha.update(json.dumps(rest, sort_keys=True, default=str).encode())
    for name in sorted(blob["state_dict"]):
        tensor = blob["state_dict"][name].detach().cpu()
        sha.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        sha.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def _check_blob(path: Path, blob: Mapping[str, Any]) -> None:
    """The recorded digest matches and every floating-point weight is finite; else CheckpointError naming `path`."""
    recorded = blob.get("digest")
    if recorded is None:
        log.warning("%s records no content digest (written before checkpoints carried one): not verified", path)
    elif recorded != content_digest(blob):
        raise CheckpointError(f"{path}: content does not match the digest recorded when it was written (corrupt or "
                              "edited checkpoint)")
    for name, tensor in blob["state_dict"].items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: weight {name} has NaN/inf values (a diverged or corrupt model)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> MERModel:
    """Rebuild the model saved at `path` (eval mode); the saved meta is on `model.checkpoint_meta`. CheckpointError
    (one line naming the file) for a missing, unreadable, corrupt, non-finite or inconsistent checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    _check_blob(path, blob)
    model = create_model(blob["name"], blob["config"], num_classes=blob["num_classes"], **blob["overrides"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as err:  # shapes or names that do not fit the model the checkpoint describes
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"{path}: weights do not fit the {blob['name']} model it describes "
                              f"({blob['num_classes']} classes): {detail}") from None
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
