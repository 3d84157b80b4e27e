"""STSTNet (Liong et al., FG 2019): the shallow three-stream baseline of the MEGC2019 composite challenge.

Three single-conv streams (3, 5 and 8 filters of 3x3, padding 2) on the 28x28 u/v/strain map, each ReLU -> BN ->
max-pool 3/3 -> dropout, concatenated -> average-pool 2 -> FC. A floor every deeper model should clear.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mer.model.models.base import Batch, MERModel
from mer.model.models.registry import register_model


@register_model(
    "ststnet",
    configs={"paper": {}, "small": {}},
    description="STSTNet: shallow triple-stream CNN on the 28x28 flow (baseline)",
)
class STSTNet(MERModel):
    fold_batching = True

    def __init__(self, num_classes: int, streams: tuple[int, ...] = (3, 5, 8), dropout: float = 0.5,
                 map_size: int = 28) -> None:  # fmt: skip
        super().__init__(num_classes)
        self._set_io()
        self.streams = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3, c, 3, padding=2), nn.ReLU(), nn.BatchNorm2d(c), nn.MaxPool2d(3, 3, 1), nn.Dropout(dropout)
            )
            for c in streams
        )
        pooled = ((map_size + 2 - 1) // 3 + 1) // 2
        self.pool = nn.AvgPool2d(2, 2)
        self.fc = nn.Linear(sum(streams) * pooled * pooled, num_classes)

    @classmethod
    def io_keys(cls, **_: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return ("flow28",), ("label",)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.get(batch, "flow28")
        x = torch.cat([stream(x) for stream in self.streams], dim=1)
        return {"logits": self.fc(self.pool(x).flatten(1))}
