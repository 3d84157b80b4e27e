"""The fold trainer: protocols, determinism, checkpoint resume, and an end-to-end fold that learns.

Protocol tests use a tiny network that follows the model contract (fast on two cores); the end-to-end test trains a
real registered model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_training_data import CLASSES, write_cache
from torch import nn

from mer_model.config import ModelConfig, TrainConfig
from mer_model.errors import ConfigError
from mer_model.training import trainer
from mer_model.training.data import SampleStore
from mer_model.training.folds import loso_folds
from mer_model.training.metrics import pooled_metrics
from mer_model.training.trainer import FoldSpec, class_weights, train_final, train_fold


class TinyFlowNet(nn.Module):
    """Contract-conforming test network: conv + BN + dropout on flow28 (dropout exercises the RNG seeding)."""

    inputs = ("flow28",)
    targets = ("label",)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 4, stride=4)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(6 * 7 * 7, num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.drop(F.relu(self.bn(self.conv(batch["flow28"] - 0.5))))
        return {"logits": self.fc(x.flatten(1))}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(outputs["logits"].float(), batch["label"], weight=batch.get("class_weights"))
        return ce, {"ce": float(ce.detach())}


@pytest.fixture()
def tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "build_model", lambda cfg, num_classes: TinyFlowNet(num_classes))


@pytest.fixture()
def store(tmp_path: Path) -> SampleStore:
    return SampleStore.open(write_cache(tmp_path / "cache", subjects=5, per_subject=6))


def _spec(store: SampleStore, fold_no: int = 0, **train: Any) -> FoldSpec:
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 8, "lr": 0.01, "device": "cpu", **train})
    return FoldSpec(ModelConfig(name="tiny"), cfg, loso_folds(store.index)[fold_no], CLASSES)


def _count_test_loads(store: SampleStore, monkeypatch: pytest.MonkeyPatch, test_subject: str) -> list[int]:
    """Instrument the store: every time a test-subject sample is read for a batch, count it."""
    counter = [0]
    test_ids = set(store.sample_ids([test_subject]))
    original = store.arrays

    def counting(sample_id: str, keys: Any) -> dict[str, np.ndarray]:
        if sample_id in test_ids:
            counter[0] += 1
        return original(sample_id, keys)

    monkeypatch.setattr(store, "arrays", counting)
    return counter


@pytest.mark.parametrize("protocol, test_passes", [("fixed", 1), ("inner", 1), ("oracle", 3)])
def test_protocols_touch_the_test_subject_as_specified(
    tiny_model: None, store: SampleStore, monkeypatch: pytest.MonkeyPatch, protocol: str, test_passes: int
) -> None:
    spec = _spec(store, protocol=protocol, epochs=3)
    counter = _count_test_loads(store, monkeypatch, spec.fold.test_subjects[0])
    seen: list[tuple[int, dict]] = []
    result = train_fold(spec, store, callback=lambda epoch, metrics: seen.append((epoch, metrics)))
    n_test = len(store.sample_ids(spec.fold.test_subjects))
    assert counter[0] == test_passes * n_test
    assert [e for e, _ in seen] == [1, 2, 3] and len(result.history) == 3
    has_test = ["test_accuracy" in m for _, m in seen]
    has_val = ["val_uf1" in m for _, m in seen]
    assert has_test == [protocol == "oracle"] * 3
    assert has_val == [protocol == "inner"] * 3
    assert result.leaky is (protocol == "oracle")
    assert (result.val_score is not None) is (protocol == "inner")
    assert len(result.predictions) == n_test
    assert set(result.predictions["subject"]) == set(spec.fold.test_subjects)
    assert list(result.predictions.columns[-3:]) == ["prob_0", "prob_1", "prob_2"]
    if protocol == "oracle":
        accs = [m["test_accuracy"] for _, m in seen]
        # The last epoch reaching the best test accuracy is kept, and its predictions are the result.
        assert result.selected_epoch == max(e for e, a in zip([1, 2, 3], accs) if a == max(accs))
        assert result.test_metrics["accuracy"] == pytest.approx(max(accs))
    if protocol == "fixed":
        assert result.selected_epoch == 3


def test_inner_validation_uses_training_subjects_only(tiny_model: None, store: SampleStore) -> None:
    spec = _spec(store, fold_no=2, protocol="inner", val_fraction=0.25)
    result = train_fold(spec, store)
    test = set(spec.fold.test_subjects)
    assert result.val_subjects and not test & set(result.val_subjects)
    assert not test & set(result.train_subjects)
    assert set(result.train_subjects) | set(result.val_subjects) == set(spec.fold.train_subjects)
    assert result.val_score == pytest.approx(result.history[result.selected_epoch - 1]["val_uf1"])


def test_early_stopping_follows_patience(tiny_model: None, store: SampleStore) -> None:
    result = train_fold(_spec(store, protocol="inner", epochs=12, patience=2, lr=0.05), store)
    assert len(result.history) == min(12, result.selected_epoch + 2)


def test_same_seed_same_predictions(tiny_model: None, store: SampleStore) -> None:
    a = train_fold(_spec(store, seed=7), store)
    b = train_fold(_spec(store, seed=7), store)
    c = train_fold(_spec(store, seed=8), store)
    prob_cols = [f"prob_{k}" for k in range(3)]
    assert np.array_equal(a.predictions[prob_cols].to_numpy(), b.predictions[prob_cols].to_numpy())
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert not np.array_equal(a.predictions[prob_cols].to_numpy(), c.predictions[prob_cols].to_numpy())


def test_checkpoint_resume_continues_exactly(tiny_model: None, store: SampleStore, tmp_path: Path) -> None:
    reference = train_fold(_spec(store, epochs=4, protocol="inner"), store)

    class WorkerDied(RuntimeError):
        pass

    def die_in_epoch_3(epoch: int, metrics: dict) -> None:
        if epoch == 3:
            raise WorkerDied

    spec = _spec(store, epochs=4, protocol="inner", checkpoint_every=2)
    with pytest.raises(WorkerDied):
        train_fold(spec, store, callback=die_in_epoch_3, checkpoint_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / trainer.CHECKPOINT_NAME).is_file()
    epochs_run: list[int] = []
    resumed = train_fold(spec, store, callback=lambda e, m: epochs_run.append(e), checkpoint_dir=tmp_path / "ckpt")
    assert epochs_run == [3, 4]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.selected_epoch == reference.selected_epoch
    prob_cols = [f"prob_{k}" for k in range(3)]
    assert np.allclose(resumed.predictions[prob_cols].to_numpy(), reference.predictions[prob_cols].to_numpy())
    other = _spec(store, epochs=4, protocol="inner", checkpoint_every=2, lr=0.02)
    with pytest.raises(ConfigError, match="different configuration"):
        train_fold(other, store, checkpoint_dir=tmp_path / "ckpt")


def test_class_weights_are_balanced_over_present_classes() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 6, 2.0, 0.0])


def test_train_final_uses_all_subjects(tiny_model: None, store: SampleStore) -> None:
    model, history = train_final(ModelConfig(name="tiny"), TrainConfig(epochs=2, batch_size=8, device="cpu"),
                                 store, store.subjects(), epochs=2)
    assert not model.training and len(history) == 2
    assert next(model.parameters()).device.type == "cpu"


def test_end_to_end_loso_with_a_registered_model_learns(tmp_path: Path) -> None:
    """A real small model on a cache with a trivially separable flow28 signal, all LOSO folds: far above chance."""
    from mer_model.models import list_models

    if "htnet" not in list_models():
        pytest.skip("htnet is not registered")
    store = SampleStore.open(write_cache(tmp_path / "cache", subjects=3, per_subject=9))
    cfg = TrainConfig(epochs=8, batch_size=6, lr=3e-3, device="cpu", augment=False)
    results = [train_fold(FoldSpec(ModelConfig(name="htnet", config="small"), cfg, fold, CLASSES), store)
               for fold in loso_folds(store.index)]
    metrics = pooled_metrics(pd.concat([r.predictions for r in results]), CLASSES)
    assert metrics["overall"]["accuracy"] > 0.8  # chance is 1/3
    assert {r.leaky for r in results} == {False}
