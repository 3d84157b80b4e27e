"""The fold trainer: protocols, determinism, checkpoint resume, and LOSO end to end.

All runs train the real registered STSTNet (the shallow MEGC2019 baseline on flow28): it is small enough for CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from test_training_data import CLASSES, write_cache

from mer.model.config import ModelConfig, TrainConfig
from mer.model.errors import ConfigError, NonFiniteError
from mer.model.training import trainer
from mer.model.training.data import SampleStore
from mer.model.training.folds import loso_folds
from mer.model.training.metrics import pooled_metrics
from mer.model.training.trainer import FoldSpec, class_weights, train_final, train_fold

MODEL = ModelConfig(name="ststnet", config="small")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(store: SampleStore, fold_no: int = 0, **train: Any) -> FoldSpec:
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 8, "lr": 0.01, "device": "cpu", **train})
    return FoldSpec(MODEL, cfg, loso_folds(store.index)[fold_no], CLASSES)


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
    store: SampleStore, monkeypatch: pytest.MonkeyPatch, protocol: str, test_passes: int
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


def test_inner_validation_uses_training_subjects_only(store: SampleStore) -> None:
    spec = _spec(store, fold_no=2, protocol="inner", val_fraction=0.25)
    result = train_fold(spec, store)
    test = set(spec.fold.test_subjects)
    assert result.val_subjects and not test & set(result.val_subjects)
    assert not test & set(result.train_subjects)
    assert set(result.train_subjects) | set(result.val_subjects) == set(spec.fold.train_subjects)
    assert result.val_score == pytest.approx(result.history[result.selected_epoch - 1]["val_uf1"])


def test_early_stopping_follows_patience(store: SampleStore) -> None:
    result = train_fold(_spec(store, protocol="inner", epochs=12, patience=2, lr=0.05), store)
    assert len(result.history) == min(12, result.selected_epoch + 2)


def test_same_seed_same_predictions(store: SampleStore) -> None:
    a = train_fold(_spec(store, seed=7), store)
    b = train_fold(_spec(store, seed=7), store)
    c = train_fold(_spec(store, seed=8), store)
    prob_cols = [f"prob_{k}" for k in range(3)]
    assert np.array_equal(a.predictions[prob_cols].to_numpy(), b.predictions[prob_cols].to_numpy())
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert not np.array_equal(a.predictions[prob_cols].to_numpy(), c.predictions[prob_cols].to_numpy())


@pytest.mark.parametrize("protocol", ["fixed", "inner", "oracle"])
def test_seed_ensemble_averages_its_members_probabilities(store: SampleStore, protocol: str) -> None:
    """Member m is the single model of seed `member_seed(seed, m)` (under `inner` with the validation subjects that
    seed draws from the fold's training subjects); the ensemble predicts the mean of their probabilities at their
    kept epochs."""
    seed, cols = 3, [f"prob_{k}" for k in range(3)]
    spec = _spec(store, fold_no=1, protocol=protocol, epochs=3, seed=seed, ensemble=2, val_fraction=0.25)
    ensemble = train_fold(spec, store)
    singles = [train_fold(_spec(store, fold_no=1, protocol=protocol, epochs=3, seed=trainer.member_seed(seed, m),
                                val_fraction=0.25), store) for m in range(2)]
    assert trainer.member_seed(seed, 0) == seed and trainer.member_seed(seed, 1) != seed
    probs = [r.predictions[cols].to_numpy() for r in singles]
    assert not np.allclose(probs[0], probs[1])  # different seeds, different models
    mean = (probs[0] + probs[1]) / 2
    np.testing.assert_allclose(ensemble.predictions[cols].to_numpy(), mean, rtol=1e-6, atol=1e-7)
    assert (ensemble.predictions["pred"].to_numpy() == mean.argmax(1)).all()
    assert ensemble.selected_epoch == round(np.median([r.selected_epoch for r in singles]))
    assert ensemble.member_epochs == tuple(r.selected_epoch for r in singles)
    stored = ensemble.summary("key", ensemble.leaky, "loso")
    assert stored.member_seeds == [seed, trainer.member_seed(seed, 1)]
    assert stored.member_epochs == list(ensemble.member_epochs) and not singles[0].member_seeds
    assert len(ensemble.history) == 3 and all("member" not in e for e in ensemble.history)
    np.testing.assert_allclose([e["train_loss"] for e in ensemble.history],
                               [(a["train_loss"] + b["train_loss"]) / 2 for a, b in zip(*[r.history for r in singles])])
    assert ensemble.leaky is (protocol == "oracle")
    test = set(spec.fold.test_subjects)
    if protocol == "inner":
        assert ensemble.val_score == pytest.approx(np.mean([r.val_score for r in singles]))
        assert set(ensemble.val_subjects) == set(singles[0].val_subjects) | set(singles[1].val_subjects)
        assert set(ensemble.train_subjects) == set(singles[0].train_subjects) | set(singles[1].train_subjects)
        assert set(singles[0].val_subjects) != set(singles[1].val_subjects)  # each member its own split
        assert not test & (set(ensemble.val_subjects) | set(ensemble.train_subjects))
    else:
        assert ensemble.val_score is None and ensemble.train_subjects == spec.fold.train_subjects


def test_seed_ensemble_resumes_each_member_from_its_checkpoint(store: SampleStore, tmp_path: Path) -> None:
    spec = _spec(store, fold_no=1, protocol="inner", epochs=3, ensemble=2, checkpoint_every=1)
    first = train_fold(spec, store, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [trainer.CHECKPOINT_NAME, f"member1-{trainer.CHECKPOINT_NAME}"])
    again = train_fold(spec, store, checkpoint_dir=tmp_path)  # both members resume after their last epoch
    cols = [f"prob_{k}" for k in range(3)]
    np.testing.assert_array_equal(first.predictions[cols].to_numpy(), again.predictions[cols].to_numpy())


def test_seed_ensemble_of_one_is_the_single_model(store: SampleStore) -> None:
    a = train_fold(_spec(store, protocol="inner", ensemble=1), store)
    b = train_fold(_spec(store, protocol="inner"), store)
    cols = [f"prob_{k}" for k in range(3)]
    assert np.array_equal(a.predictions[cols].to_numpy(), b.predictions[cols].to_numpy())


_KILLED_FOLD = """
import sys, time
sys.path[:0] = sys.argv[3:]
from mer.model.training.data import SampleStore
from mer.model.training.trainer import train_fold
from test_training_trainer import _spec
store = SampleStore.open(sys.argv[1])
train_fold(_spec(store, epochs=6, checkpoint_every=1), store, callback=lambda epoch, metrics: time.sleep(1),
           checkpoint_dir=sys.argv[2])
"""


def test_a_fold_whose_process_is_killed_resumes_and_says_from_which_epoch(
        store: SampleStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real SIGKILL of the process training a fold with `checkpoint_every: 1`: the next call resumes from the
    last checkpoint and logs "fold X resumed from epoch N" at WARNING (what a Ray worker forwards to the driver)."""
    ckpt = tmp_path / "ckpt"
    tests = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_FOLD, str(store.root), str(ckpt), tests,
                             str(Path(tests).parent)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    try:
        while not (ckpt / trainer.CHECKPOINT_NAME).is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the fold never wrote a checkpoint"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    saved = torch.load(ckpt / trainer.CHECKPOINT_NAME, weights_only=False)["epoch"]
    assert 1 <= saved < 6
    spec = _spec(store, epochs=6, checkpoint_every=1)
    epochs_run: list[int] = []
    with caplog.at_level("WARNING", logger="mer.model.training.trainer"):
        resumed = train_fold(spec, store, callback=lambda e, m: epochs_run.append(e), checkpoint_dir=ckpt)
    assert f"fold {spec.fold.name} resumed from epoch {saved} " in caplog.text
    assert epochs_run == list(range(saved + 1, 7)) and [h["epoch"] for h in resumed.history] == list(range(1, 7))


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_checkpoint_resume_continues_exactly(store: SampleStore, tmp_path: Path, ema_decay: float) -> None:
    """Also with weight averaging: the checkpoint holds the average and the trained weights apart."""
    reference = train_fold(_spec(store, epochs=4, protocol="inner", ema_decay=ema_decay), store)

    class WorkerDied(RuntimeError):
        pass

    def die_in_epoch_3(epoch: int, metrics: dict) -> None:
        if epoch == 3:
            raise WorkerDied

    spec = _spec(store, epochs=4, protocol="inner", checkpoint_every=2, ema_decay=ema_decay)
    with pytest.raises(WorkerDied):
        train_fold(spec, store, callback=die_in_epoch_3, checkpoint_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / trainer.CHECKPOINT_NAME).is_file()
    epochs_run: list[int] = []
    resumed = train_fold(spec, store, callback=lambda e, m: epochs_run.append(e), checkpoint_dir=tmp_path / "ckpt")
    assert epochs_run == [3, 4]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.selected_epoch == reference.selected_epoch
    prob_cols = [f"prob_{k}" for k in range(3)]
    assert np.array_equal(resumed.predictions[prob_cols].to_numpy(), reference.predictions[prob_cols].to_numpy())
    assert [h["val_uf1"] for h in resumed.history] == [h["val_uf1"] for h in reference.history]
    other = _spec(store, epochs=4, protocol="inner", checkpoint_every=2, lr=0.02, ema_decay=ema_decay)
    with pytest.raises(ConfigError, match="different configuration"):
        train_fold(other, store, checkpoint_dir=tmp_path / "ckpt")


def test_a_damaged_resume_checkpoint_restarts_the_fold(store: SampleStore, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A fold's resume checkpoint cut short (a worker killed on a full disk, a bad copy from S3): the fold trains
    from epoch 1 with a warning naming the file, instead of a traceback in the fold task; it is only lost time."""
    spec = _spec(store, epochs=2, checkpoint_every=1)
    ckpt = tmp_path / "ckpt" / trainer.CHECKPOINT_NAME
    train_fold(spec, store, checkpoint_dir=ckpt.parent)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    epochs_run: list[int] = []
    train_fold(spec, store, callback=lambda e, m: epochs_run.append(e), checkpoint_dir=ckpt.parent)
    assert epochs_run == [1, 2]
    assert f"{ckpt} is unreadable" in caplog.text and "training from epoch 1" in caplog.text


def test_weight_average_is_evaluated_without_changing_the_training_path(store: SampleStore) -> None:
    """train.ema_decay: after every optimiser step the average follows timm's warm-up EMA of the trained weights; an
    evaluated epoch leaves the model holding that average, and the next epoch trains on from the trained weights, so
    the trained weights follow exactly the path of a run without averaging."""
    decay = 0.5
    trained: dict[float, list[list[torch.Tensor]]] = {}
    for ema_decay in (0.0, decay):
        spec = _spec(store, epochs=2, ema_decay=ema_decay)
        loop = trainer._Loop(spec.model, spec.train, store, 3, [store.sample_ids(spec.fold.train_subjects)], 2,
                             ["fold"])
        start = [p.detach().clone() for p in loop.model.parameters()]
        steps: list[list[torch.Tensor]] = trained.setdefault(ema_decay, [])
        loop.optimizer.register_step_post_hook(
            lambda *_, loop=loop, steps=steps: steps.append([p.detach().clone() for p in loop.model.parameters()]))
        for epoch in (1, 2):
            loop.train_epoch(epoch, final=True)
            if ema_decay == 0.0:
                continue
            average = [p.clone() for p in start]
            for t, weights in enumerate(steps, start=1):
                d = min(decay, (1 + t) / (10 + t))
                average = [a + (1 - d) * (w - a) for a, w in zip(average, weights, strict=True)]
            for got, want, last in zip(loop.model.parameters(), average, steps[-1], strict=True):
                torch.testing.assert_close(got.detach(), want)
            assert any(not torch.equal(p.detach(), w) for p, w in zip(loop.model.parameters(), steps[-1]))
    assert len(trained[0.0]) == len(trained[decay]) > 2
    for plain, averaged in zip(trained[0.0], trained[decay], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(plain, averaged, strict=True))


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_weight_average_rejects_a_decay_outside_its_range(decay: float) -> None:
    with pytest.raises(ConfigError, match="train.ema_decay"):
        trainer.WeightAverage([torch.zeros(2, requires_grad=True)], decay)


def test_class_weights_are_balanced_over_present_classes() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 6, 2.0, 0.0])


def test_train_final_uses_all_subjects(store: SampleStore) -> None:
    model, history = train_final(MODEL, TrainConfig(epochs=2, batch_size=8, device="cpu"),
                                 store, store.subjects(), epochs=2)
    assert not model.training and len(history) == 2
    assert next(model.parameters()).device.type == "cpu"


def test_loso_end_to_end_learns_a_separable_signal(tmp_path: Path) -> None:
    """Every LOSO fold of a cache whose flow28 carries a class-specific block: pooled accuracy far above chance."""
    store = SampleStore.open(write_cache(tmp_path / "cache", subjects=3, per_subject=9))
    cfg = TrainConfig(epochs=10, batch_size=6, lr=0.01, device="cpu")
    results = [train_fold(FoldSpec(MODEL, cfg, fold, CLASSES), store) for fold in loso_folds(store.index)]
    metrics = pooled_metrics(pd.concat([r.predictions for r in results]), CLASSES)
    assert metrics["overall"]["accuracy"] > 0.8  # chance is 1/3
    assert metrics["overall"]["n"] == 27 and {r.leaky for r in results} == {False}


@pytest.mark.parametrize("enabled", [True, False])
def test_class_weights_reach_the_model_loss(store: SampleStore, monkeypatch: pytest.MonkeyPatch,
                                            enabled: bool) -> None:
    seen: list[Any] = []
    build = trainer.build_model

    def recording_build(cfg: ModelConfig, num_classes: int, tta: str = "none") -> Any:
        model = build(cfg, num_classes, tta)
        loss = model.loss
        model.loss = lambda outputs, batch: (seen.append(batch.get("class_weights")), loss(outputs, batch))[1]
        return model

    monkeypatch.setattr(trainer, "build_model", recording_build)
    spec = _spec(store, epochs=1, class_weights=enabled)
    train_fold(spec, store)
    expected = class_weights(store.labels(store.sample_ids(spec.fold.train_subjects)), 3)
    assert seen and all((w is not None and np.allclose(w.cpu(), expected)) if enabled else w is None for w in seen)


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, [1.0, 1.0, 1.0, 1.0]),
    ("constant", 1, [0.5, 1.0, 1.0, 1.0]),
    ("cosine", 0, [1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))]),
    ("cosine", 2, [1 / 3, 2 / 3, 1.0, 0.5]),
    ("exponential", 0, [1.0, 0.5, 0.25, 0.125]),
])
def test_lr_schedule_factors(schedule: str, warmup: int, expected: list[float]) -> None:
    cfg = TrainConfig(schedule=schedule, warmup_epochs=warmup, lr_gamma=0.5)
    assert [trainer.lr_factor(e, cfg, 4) for e in range(4)] == pytest.approx(expected)


def test_schedule_is_applied_per_epoch_and_resumed(store: SampleStore, tmp_path: Path) -> None:
    """The learning rate each epoch trained with is in the history, and a fold resumed from its checkpoint continues
    the schedule where it stopped."""
    spec = _spec(store, epochs=4, lr=0.02, schedule="cosine", warmup_epochs=1, checkpoint_every=2)
    whole = train_fold(spec, store)
    assert [h["lr"] for h in whole.history] == pytest.approx(
        [0.02 * trainer.lr_factor(e, spec.train, 4) for e in range(4)])

    class Killed(Exception):
        pass

    def die_in_epoch_three(epoch: int, metrics: dict) -> None:
        if epoch == 3:  # after the epoch-2 checkpoint, before the epoch-3 one
            raise Killed

    with pytest.raises(Killed):
        train_fold(spec, store, callback=die_in_epoch_three, checkpoint_dir=tmp_path)
    resumed = train_fold(spec, store, checkpoint_dir=tmp_path)
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in whole.history])


@pytest.mark.parametrize("precise", [True, False])
def test_precise_batchnorm_holds_the_training_population_statistics(store: SampleStore, precise: bool) -> None:
    """With train.precise_bn the kept model's BatchNorm mean is its input's mean over the non-augmented training set
    (recomputed with the final weights); without it, it is the lagging running average of the training steps."""
    cfg = TrainConfig(epochs=2, batch_size=6, lr=0.01, device="cpu", precise_bn=precise)
    model, _ = train_final(MODEL, cfg, store, store.subjects(), 2)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    handle = bn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    dataset = store.torch_dataset(store.sample_ids(store.subjects()), model.inputs, False, 0)
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dataset, batch_size=6):  # 30 samples: 5 equal batches
            model(batch)
    handle.remove()
    population = torch.cat(seen).mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, population, atol=1e-5) is precise


def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every read of a tensor's value into Python made by the library's code (each one a host sync on a GPU;
    torch's own reads of CPU-resident bookkeeping, e.g. Adam's step counter, are not syncs and not counted)."""
    count = [0]
    library = str(Path(trainer.__file__).parents[1])
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: Any, _original: Any = original) -> Any:
            if sys._getframe(1).f_code.co_filename.startswith(library):
                count[0] += 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return count


def test_training_steps_never_read_values_back(store: SampleStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Losses and their parts are accumulated on the device and read ONCE per epoch: the number of host reads of an
    epoch does not grow with its number of steps (24 training samples: 6 steps of 4 vs 2 of 12)."""
    reads = []
    for batch_size in (4, 12):
        spec = _spec(store, batch_size=batch_size, augment=False)
        loop = trainer._Loop(spec.model, spec.train, store, 3, [store.sample_ids(spec.fold.train_subjects)], 3,
                             ["fold"])
        count = _count_host_reads(monkeypatch)
        (entry,) = loop.train_epoch(1, final=False)
        monkeypatch.undo()
        reads.append(count[0])
        assert np.isfinite(entry["train_loss"]) and entry["train_ce"] == pytest.approx(entry["train_loss"])
    assert reads == [1, 1]  # the epoch's sums, read together


def test_non_finite_loss_is_one_clear_error_per_epoch(store: SampleStore, monkeypatch: pytest.MonkeyPatch) -> None:
    build = trainer.build_model

    def poisoned(cfg: ModelConfig, num_classes: int, tta: str = "none") -> Any:
        model = build(cfg, num_classes, tta)
        loss = model.loss
        model.loss = lambda outputs, batch: (lambda total, parts: (total * float("nan"), parts))(
            *loss(outputs, batch))
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    with pytest.raises(NonFiniteError, match=r"^fold \S+: loss became non-finite at epoch 1 \(.*train_loss=nan"):
        train_fold(_spec(store, epochs=2), store)


@pytest.mark.parametrize("bf16, amp, expected", [
    (True, True, (torch.bfloat16, False)), (False, True, (torch.float16, True)), (True, False, (None, False)),
])
def test_mixed_precision_prefers_bfloat16_and_scales_only_float16(monkeypatch: pytest.MonkeyPatch, bf16: bool,
                                                                   amp: bool, expected: tuple) -> None:
    """bf16 autocast where the GPU supports it (no GradScaler), fp16 + GradScaler otherwise; CPU runs stay float32."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert trainer.mixed_precision(torch.device("cuda"), amp) == expected
    assert trainer.mixed_precision(torch.device("cpu"), True) == (None, False)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_fused_optimizer_makes_the_reference_update(optimizer: str) -> None:
    """make_optimizer's fused kernels update like torch's default per-tensor implementation (float tolerance)."""
    cfg = TrainConfig(optimizer=optimizer, lr=0.01, weight_decay=0.05, momentum=0.9)
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    results = []
    for fused in (True, False):
        params = [p.clone().requires_grad_() for p in start]
        opt = trainer.make_optimizer(params, cfg)
        if not fused:  # the same optimizer and hyperparameters, torch's default (unfused) implementation
            keep = {"lr", "weight_decay", "momentum", "betas", "eps"}
            opt = type(opt)(params, foreach=False, **{k: v for k, v in opt.defaults.items() if k in keep})
        assert bool(opt.defaults.get("fused")) is fused
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
