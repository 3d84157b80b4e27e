"""The shared classification loss honours the trainer's class weights (train.class_weights)."""

from __future__ import annotations

import torch

from mer.model.models import create_model


def test_classification_loss_uses_class_weights() -> None:
    torch.manual_seed(0)
    model = create_model("ststnet", config="small", num_classes=3)
    batch = {"flow28": torch.rand(4, 3, 28, 28), "label": torch.tensor([0, 0, 1, 2])}
    outputs = model(batch)
    plain, _ = model.loss(outputs, batch)
    uniform, _ = model.loss(outputs, {**batch, "class_weights": torch.ones(3)})
    skewed, _ = model.loss(outputs, {**batch, "class_weights": torch.tensor([0.1, 1.0, 5.0])})
    assert torch.allclose(plain, uniform)
    assert not torch.allclose(plain, skewed)
