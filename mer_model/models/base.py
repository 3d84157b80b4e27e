"""The model contract shared by every registered network (see docs/architecture.md, "Model contract").

A model reads named tensors from a batch dict and says which ones it needs (`inputs`) and which ones only its loss
reads (`targets`), so the data layer can feed any model without special cases and inference never depends on a target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mer.model.data.aus import AU_LIST
from mer.model.errors import ConfigError, DataError

Batch = Mapping[str, Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OptionalInput:
    """A part of a model that reads data not every collection has, switched by ONE constructor argument (timm's
    `PretrainedCfg` idea: the knowledge lives on the model, so no consumer names the argument). The benchmark
    (mer.pipelines.benchmark.adapt_entry) switches it off where the data lacks `needs`, from this record alone.

    `label`: how notes name it ("FPF", "AUs"); `kwarg`: the argument; `off`: its value when the part reads nothing;
    `needs`: the data capability it reads (a key of the benchmark's `data_capabilities`: `faces` = an apex face crop
    for every sample, `au_coded` = AU coding of some source dataset); `uses`: per value, what the data is used as;
    `column`: the results-table column that shows the value actually run ("" = none).
    """

    label: str
    kwarg: str
    off: Any
    needs: str
    uses: Mapping[str, str] = field(default_factory=dict)
    column: str = ""


def default_num_aus() -> int:
    """Length of the AU vocabulary the data layer writes."""
    return len(AU_LIST)


def masked_au_bce(au_logits: Tensor, aus: Tensor, mask: Tensor | None = None) -> Tensor:
    """Multi-label AU loss: per-sample mean BCE, averaged over the samples whose dataset codes AUs (`mask` (B,), the
    batch's `aus_mask`; None = all coded). An uncoded sample's all-zero `aus` is unknown, not "no AU", so it adds
    nothing; a batch without any coded sample gives 0 (with a gradient path, so backward still works)."""
    per_sample = F.binary_cross_entropy_with_logits(au_logits.float(), aus.float(), reduction="none").mean(dim=1)
    if mask is None:
        return per_sample.mean()
    weights = mask.float().reshape(-1)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


def imagenet_normalise(x: Tensor) -> Tensor:
    """RGB in [0,1] -> ImageNet statistics, the normalisation the two-frame papers use."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def choice(name: str, key: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """Validate a string option; the error names the model argument like params.yaml does (model.kwargs.<key>)."""
    if value not in allowed:
        raise ConfigError(f"model.kwargs.{key}: {name} accepts {', '.join(map(repr, allowed))}, got {value!r}")
    return value


TTA_MODES: tuple[str, ...] = ("none", "flip")


class MERModel(nn.Module):
    """Base of all models: batch-dict forward, declared inputs/targets, a loss returning its named parts.

    `tta` is how the model's predictions are made (train.tta, saved in checkpoints): "flip" = the mean class
    probabilities of the batch and its mirror image (mer.model.training.augment.tta_forward, which every evaluation
    and `inference.predict_proba` call); forward itself always runs one view.
    """

    name: ClassVar[str] = "model"
    #: True when an input is (part of) the human coding the labels were derived from (annotated AUs).
    leaks_labels: bool = False
    #: channels-last memory layout speeds up its convolutions on GPU (see checkpoint.prepare_for_device).
    prefers_channels_last: ClassVar[bool] = False
    #: the folds of one configuration may be trained as one stacked model with torch.func (vmap over
    #: functional_call; mer.model.training.fold_batch): no data-dependent Python control flow, no `.item()` in
    #: forward or loss, BatchNorm only with running statistics (stacked buffers).
    fold_batching: ClassVar[bool] = False

    @classmethod
    def optional_inputs(cls) -> tuple[OptionalInput, ...]:
        """The parts of the model that read data a collection may lack (copied onto its registry entry)."""
        return ()

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"model.num_classes: {self.name} needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.inputs: tuple[str, ...] = ()
        self.targets: tuple[str, ...] = ("label",)
        self.tta = "none"

    def set_tta(self, mode: str) -> MERModel:
        """Choose the test-time augmentation ("none" | "flip"); a ConfigError names train.tta otherwise."""
        if mode not in TTA_MODES:
            raise ConfigError(f"train.tta: {self.name} accepts {', '.join(map(repr, TTA_MODES))}, got {mode!r}")
        self.tta = mode
        return self

    @classmethod
    def io_keys(cls, **cfg: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(inputs, targets) for the resolved constructor arguments `cfg`, without building the network."""
        raise NotImplementedError

    def _set_io(self, **cfg: Any) -> None:
        self.inputs, self.targets = self.io_keys(**cfg)

    def get(self, batch: Batch, key: str) -> Tensor:
        """batch[key] with a one-line error naming the model and the missing key."""
        if key not in batch:
            raise DataError(f"{self.name}: batch has no {key!r} (this configuration reads {', '.join(self.inputs)})")
        return batch[key]

    def classification_loss(self, outputs: Mapping[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        # `class_weights` (C,) is set by the trainer from the training fold's class frequencies (train.class_weights).
        ce = F.cross_entropy(outputs["logits"].float(), self.get(batch, "label"), weight=batch.get("class_weights"))
        return ce, {"ce": ce.detach()}

    def loss(self, outputs: Mapping[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Total training loss and its named parts (detached 0-d tensors: no host sync, vmap-safe); cross-entropy
        unless a model adds auxiliary terms."""
        total, parts = self.classification_loss(outputs, batch)
        parts["loss"] = total.detach()
        return total, parts


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B,C,H,W) map, with (1,C,1,1) gain and bias (NesT/HTNet style)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.g + self.b


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
