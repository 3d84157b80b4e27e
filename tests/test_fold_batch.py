"""Fold-batched training (the trainer's loop over F > 1 folds, mer.model.training.fold_batch) against one fold at a
time (the same loop, F = 1).

Tolerances: the batched path runs the same arithmetic on stacked tensors (vmap), with the same initialisation, data
order and augmentation draws, so with equal training-set sizes and no dropout each fold's predictions and losses equal
the per-fold path's up to float summation order (1e-4), and its weights as a whole within 5% (a channel that a ReLU
keeps nearly dead drifts from round-off under Adam without changing any output). With dropout (per-fold masks from
another generator) and unequal training sets (padded per-fold index tables repeat a smaller fold's own samples) the
paths agree statistically: on a separable LOSO both learn the signal and their pooled accuracies differ by at most
two of the 33 test samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_training_data import CLASSES, write_cache

from mer.model.config import ModelConfig, TrainConfig
from mer.model.errors import ConfigError, NonFiniteError
from mer.model.models.registry import get_entry, list_models
from mer.model.training.data import SampleStore
from mer.model.training import trainer
from mer.model.training.folds import Fold, loso_folds
from mer.model.training.metrics import pooled_metrics
from mer.model.training.trainer import FoldSpec, stack_folds, train_fold, train_fold_group

PROBS = [f"prob_{k}" for k in range(3)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _specs(folds: list[Fold], dropout: float = 0.0, name: str = "ststnet", **train: Any) -> list[FoldSpec]:
    model = ModelConfig(name=name, config="small", kwargs={"dropout": dropout})
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 8, "lr": 0.01, "device": "cpu", **train})
    return [FoldSpec(model, cfg, fold, CLASSES) for fold in folds]


@pytest.mark.parametrize("protocol", ["fixed", "inner", "oracle"])
def test_batched_folds_equal_per_fold_training_without_dropout(store: SampleStore, protocol: str) -> None:
    """Equal training-set sizes (5 subjects x 6 clips), no dropout: every fold's history, kept epoch, predictions
    and weights match the per-fold trainer's (protocol bookkeeping, class weights, augmentation, precise BN)."""
    specs = _specs(loso_folds(store.index)[:3], protocol=protocol)
    seen: list[tuple[str, int]] = []
    callbacks = [lambda e, m, name=s.fold.name: seen.append((name, e)) for s in specs]
    batched = train_fold_group(specs, store, callbacks)
    assert sorted(seen) == sorted((s.fold.name, e) for s in specs for e in (1, 2, 3))
    for spec, got in zip(specs, batched, strict=True):
        want = train_fold(spec, store)
        assert got.fold == want.fold and got.selected_epoch == want.selected_epoch
        assert got.val_subjects == want.val_subjects and got.leaky == want.leaky
        np.testing.assert_allclose(got.predictions[PROBS].to_numpy(), want.predictions[PROBS].to_numpy(), atol=1e-4)
        assert list(got.predictions["sample_id"]) == list(want.predictions["sample_id"])
        for a, b in zip(got.history, want.history, strict=True):
            assert set(a) == set(b)
            assert {k: v for k, v in a.items() if k != "time_s"} == pytest.approx(
                {k: v for k, v in b.items() if k != "time_s"}, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("train", [{"tta": "flip"}, {"ema_decay": 0.5}], ids=["flip-tta", "weight-average"])
def test_batched_folds_evaluate_like_per_fold_training(store: SampleStore, train: dict[str, Any]) -> None:
    """train.tta="flip" (the mirror is indexing only) and train.ema_decay (the stacked weights averaged elementwise)
    under vmap: validation scores, kept epoch and test probabilities equal the per-fold trainer's."""
    specs = _specs(loso_folds(store.index)[:2], protocol="inner", **train)
    for spec, got in zip(specs, train_fold_group(specs, store), strict=True):
        want = train_fold(spec, store)
        assert got.selected_epoch == want.selected_epoch
        np.testing.assert_allclose(got.predictions[PROBS].to_numpy(), want.predictions[PROBS].to_numpy(), atol=1e-4)
        assert [h["val_uf1"] for h in got.history] == pytest.approx([h["val_uf1"] for h in want.history])


def _uneven_store(root: Path) -> SampleStore:
    """6 subjects with 3..8 clips each (the last clips of smaller subjects left out)."""
    full = SampleStore.open(write_cache(root, subjects=6, per_subject=8))
    keep = full.index.groupby("subject").cumcount() < full.index["subject"].map(
        {s: 3 + i for i, s in enumerate(full.subjects())})
    entries = pd.read_csv(root / "modalities.csv", dtype=str, keep_default_na=False)
    return SampleStore(full.root, full.index[keep], full.class_names, full.manifest, entries)


def test_batched_loso_agrees_statistically_with_per_fold_loso(tmp_path: Path) -> None:
    """Unequal folds (training sets of 25..30 clips: padded index tables) and dropout 0.5: both paths learn the
    separable signal and their pooled accuracies differ by at most two test clips."""
    store = _uneven_store(tmp_path / "cache")
    specs = _specs(loso_folds(store.index), dropout=0.5, epochs=8, batch_size=6)
    assert len({len(store.sample_ids(s.fold.train_subjects)) for s in specs}) == 6
    batched = train_fold_group(specs, store)
    single = [train_fold(spec, store) for spec in specs]
    accuracy = [pooled_metrics(pd.concat([r.predictions for r in rs]), CLASSES)["overall"]["accuracy"]
                for rs in (batched, single)]
    n = len(store.index)
    assert n == 33 and min(accuracy) > 0.75  # chance is 1/3
    assert abs(accuracy[0] - accuracy[1]) <= 2 / n
    assert [r.fold for r in batched] == [s.fold.name for s in specs]


def test_group_falls_back_to_a_loop_and_rejects_mixed_configurations(store: SampleStore) -> None:
    folds = loso_folds(store.index)[:2]
    specs = _specs(folds)
    assert stack_folds(specs) and not stack_folds(specs[:1]) and not stack_folds(specs, requested=False)
    looped = train_fold_group(specs, store, batched=False)
    single = [train_fold(s, store) for s in specs]
    for a, b in zip(looped, single, strict=True):
        assert np.array_equal(a.predictions[PROBS].to_numpy(), b.predictions[PROBS].to_numpy())
    mixed = [specs[0], _specs(folds[1:], lr=0.5)[0]]
    with pytest.raises(ConfigError, match="a group trains one configuration"):
        train_fold_group(mixed, store)
    with pytest.raises(NonFiniteError, match=r"^fold \S+: loss became non-finite at epoch \d+ \(.*=nan"):
        train_fold_group(_specs(folds, lr=10, optimizer="sgd", epochs=10), store)  # plain SGD at lr 10 diverges


def test_a_seed_ensemble_group_trains_fold_by_fold(store: SampleStore) -> None:
    """Members of a seed ensemble are trained one after another, so a group asked to stack falls back to the loop."""
    specs = _specs(loso_folds(store.index)[:2], ensemble=2)
    grouped = train_fold_group(specs, store, batched=True)
    for a, b in zip(grouped, [train_fold(s, store) for s in specs], strict=True):
        assert np.array_equal(a.predictions[PROBS].to_numpy(), b.predictions[PROBS].to_numpy())


def test_the_search_scores_a_seed_ensemble_by_its_mean_probabilities(store: SampleStore) -> None:
    """A search's UF1 objective is the fold's `val_score` (for an ensemble: the members' mean probabilities on the
    validation subjects), other metrics the validation figure of the (member-averaged) selected epoch."""
    from mer.pipelines.engine.trial import inner_score

    (spec,) = _specs(loso_folds(store.index)[1:2], protocol="inner", ensemble=2)
    summary = train_fold(spec, store).summary("key", False, "loso")
    assert inner_score(summary, "uf1") == pytest.approx(summary.val_score)
    assert inner_score(summary, "uar") == pytest.approx(summary.history[summary.selected_epoch - 1]["val_uar"])


def test_fold_task_logs_name_the_ensemble_member(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from mer.pipelines.engine.tasks import _epoch_logger

    job = SimpleNamespace(fold=SimpleNamespace(name="s01"), key="k", train={"epochs": 3})
    log = _epoch_logger(job, None, None)
    with caplog.at_level("DEBUG", logger="mer.pipelines.engine.tasks"):
        log(3, {"epoch": 3, "train_loss": 0.5})
        log(3, {"epoch": 3, "member": 2, "train_loss": 0.4})
    assert [r.getMessage() for r in caplog.records if r.levelname == "DEBUG"] == [
        "fold s01 epoch 3: train_loss=0.5", "fold s01 epoch 3 (ensemble member 2): train_loss=0.4"]


def test_a_fold_task_trains_its_unfinished_folds_as_one_group(store: SampleStore, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's fold task (called directly, without Ray): a stored fold is read back, the others are trained
    as one batched group, and each is stored under its own key."""
    from mer.pipelines.engine import tasks

    spec = _specs(loso_folds(store.index)[:3])[0]
    jobs = [tasks.FoldJob(key=f"key{i}", fold=fold, model=spec.model.model_dump(mode="json"),
                          train=spec.train.model_dump(mode="json"), leaky=False, cache_dir=str(store.root),
                          storage=str(tmp_path / "folds"))
            for i, fold in enumerate(loso_folds(store.index)[:3])]
    monkeypatch.setitem(tasks._STORES, str(store.root), store)
    (first,) = tasks.run_folds(jobs[:1])  # one fold: the per-fold trainer
    groups: list[list[str]] = []
    real = train_fold_group  # the task looks it up in its module when it runs, so the module's name is patched
    monkeypatch.setattr(trainer, "train_fold_group",
                        lambda specs, *a, **k: (groups.append([s.fold.name for s in specs]), real(specs, *a, **k))[1])
    summaries = tasks.run_folds(jobs)
    assert groups == [[jobs[1].fold.name, jobs[2].fold.name]]
    assert summaries[0] == first and [s.fold for s in summaries] == [j.fold.name for j in jobs]
    storage = tasks.FoldStorage(str(tmp_path / "folds"))
    for job, summary in zip(jobs, summaries, strict=True):
        stored = storage.load(job.key)
        assert stored is not None and stored[0] == summary and len(stored[1]) == 6


@pytest.mark.parametrize("name", [n for n in list_models() if get_entry(n).cls.fold_batching])
def test_every_batchable_model_trains_in_groups_like_alone(store: SampleStore, name: str) -> None:
    """Each model that declares `fold_batching` (no dropout): one batched epoch gives each fold the predictions it
    gets alone."""
    specs = _specs(loso_folds(store.index)[:2], name=name, epochs=1)
    for got, spec in zip(train_fold_group(specs, store), specs, strict=True):
        want = train_fold(spec, store)
        np.testing.assert_allclose(got.predictions[PROBS].to_numpy(), want.predictions[PROBS].to_numpy(), atol=1e-4)


def test_device_resident_data_trains_like_the_cpu_reference_path(store: SampleStore) -> None:
    """train.device_data=on (arrays stacked once, batches gathered and augmented in one batched call) against the
    CPU reference path, per fold and in a batched group: flow28 warps agree to ~1e-6 (test_training_data.py), so
    after three epochs the predictions agree within 1e-3."""
    specs = _specs(loso_folds(store.index)[:2])
    on = _specs(loso_folds(store.index)[:2], device_data="on")
    for got, want in zip(train_fold_group(on, store), [train_fold(s, store) for s in specs], strict=True):
        np.testing.assert_allclose(got.predictions[PROBS].to_numpy(), want.predictions[PROBS].to_numpy(), atol=1e-3)
    alone = train_fold(on[0], store)
    want = train_fold(specs[0], store)
    np.testing.assert_allclose(alone.predictions[PROBS].to_numpy(), want.predictions[PROBS].to_numpy(), atol=1e-3)
    tiny = _specs(loso_folds(store.index)[:1], device_data="on", device_data_mb=1e-3)[0]  # does not fit
    assert np.array_equal(train_fold(tiny, store).predictions[PROBS].to_numpy(), want.predictions[PROBS].to_numpy())


@pytest.mark.parametrize("group", [1, 4])
def test_a_fold_whose_outputs_become_non_finite_fails_alone(tmp_path: Path, group: int,
                                                            caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One sample holds an extreme (finite) flow value, 3e37: the three folds that train on it finish; the fold that
    tests on it gets NaN probabilities (before: stored as finished and pooled, argmax naming a class). It now fails,
    named, is recorded as failed and never stored as finished, while the others complete -- also when the four
    were a stacked group (trained again fold by fold)."""
    from test_failures import _poison_entry
    from test_training_data import write_cache

    from mer.pipelines.engine import tasks
    from mer.pipelines.engine.callbacks import failed_folds, stored_folds

    monkeypatch.setattr(tasks, "_LOGGING_SET", True)  # a Ray worker's logging set-up would replace pytest's capture
    root = write_cache(tmp_path / "cache", subjects=4, per_subject=2)
    sid = "synthetic/s01/clip1"
    flow = SampleStore.open(root).arrays(sid, ("flow28",))["flow28"].copy()
    flow[0, 14, 14] = 3e37
    _poison_entry(root, sid, "flow28", {"flow28": flow})
    store = SampleStore.open(root)
    spec = _specs(loso_folds(store.index), epochs=1)[0]
    jobs = [tasks.FoldJob(key=f"key{i}", fold=fold, model=spec.model.model_dump(mode="json"),
                          train=spec.train.model_dump(mode="json"), leaky=False, cache_dir=str(root),
                          storage=str(tmp_path / "folds")) for i, fold in enumerate(loso_folds(store.index))]
    outcomes = [o for i in range(0, 4, group) for o in tasks.run_folds(jobs[i:i + group])]
    failed = [o for o in outcomes if isinstance(o, tasks.FoldFailure)]
    assert [f.fold for f in failed] == ["synthetic/s01"] and len(outcomes) == 4
    assert failed[0].error == ("fold synthetic/s01: outputs became non-finite on the test set (epoch 1) (1 of 2 "
                               "samples)")
    keys = [j.key for j in jobs]
    summaries, predictions = stored_folds(str(tmp_path / "folds"), keys)
    assert [s.fold for s in summaries] == ["synthetic/s00", "synthetic/s02", "synthetic/s03"]
    assert len(predictions) == 6 and np.isfinite(predictions[PROBS].to_numpy()).all()
    assert failed_folds(str(tmp_path / "folds"), keys) == [{"fold": "synthetic/s01", "error": failed[0].error}]
    assert not (tmp_path / "folds" / "key1" / "result.json").exists()
    assert "fold synthetic/s01: outputs became non-finite" in caplog.text


def test_one_training_loop_serves_every_fold_count() -> None:
    """One loop (issue 32): the training package defines one train-epoch, one BatchNorm refresh, one
    predict-and-score and one epoch loop, all in the trainer, which F = 1 and F > 1 both run; the stacked model
    imports nothing from the trainer, and no library, platform or benchmark module imports another's private name."""
    import ast

    root = Path(__file__).resolve().parents[1]
    defined: dict[str, list[str]] = {}
    for path in sorted((root / "mer_model" / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name, []).append(path.name)
    for name in ("train_epoch", "refresh_batchnorm", "predict_and_score", "_fit"):
        assert defined.get(name) == ["trainer.py"], (name, defined.get(name))
    assert "evaluate" not in defined
    private = []
    for folder in ("mer_model", "pipelines", "components", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    if path.name == "fold_batch.py" and node.module.endswith("trainer"):
                        private.append(f"{path.name} imports the trainer")
                    private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                                and not a.name.startswith("__")]
    assert private == []
