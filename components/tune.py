"""The `tune` step's units of work: one LOSO fold as a Ray task, one hyperparameter trial as a Ray Tune function
trainable that fans its folds out as tasks, and a Tune callback that mirrors everything into MLflow.

Why this shape:
* A fold is the unit of scheduling. It declares its own resources (`tune.fold_cpus`, fractional `tune.fold_gpus`, so
  small folds share a GPU) and is retried by Ray when its worker dies (`tune.max_retries`); its checkpoint makes the
  retry continue instead of restarting.
* A trial requests a placement group of one empty head bundle (the trainable only waits) plus one bundle per fold it
  runs at once; its fold tasks are scheduled INSIDE that group, so Tune's accounting of trials matches what the folds
  really use, and trials and folds run concurrently up to the cluster's size.
* Finished folds are persisted under `tune.storage_path` (`FoldStorage`, local or s3:// through pyarrow), keyed by
  a hash of everything that determines the fold's numbers; a restarted driver, a restored trial, or another trial with
  the same configuration reads them instead of training again.
* Only the driver talks to MLflow (`MlflowCallback`): workers need no access to the tracking server or its
  credentials, and one writer keeps an embedded SQLite store consistent.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import tracking
from components.common import add_params_arguments, params_from_args
from components.evaluate import flat_metrics, write_artifacts
from components.report import reads_annotated_aus
from mer_model.config import ModelConfig, Params, TrainConfig, parse_params, set_dotted
from mer_model.errors import ConfigError
from mer_model.training.folds import Fold

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
PREDICTIONS_FILE = "predictions.csv"
CHECKPOINT_DIR = "checkpoint"
OBJECTIVE = "objective"  # the key a search trial reports: mean inner-validation score over its folds


# --------------------------------------------------------------------------------------------------------------------
# Persistent fold results


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class FoldStorage:
    """Finished folds under `<root>/<fold key>/` (result.json + predictions.csv; result.json is written last, so its
    presence means the fold is complete). `root` is a local directory or a pyarrow URI such as s3://bucket/prefix."""

    def __init__(self, root: str) -> None:
        from pyarrow import fs as pafs

        self.root = root.rstrip("/")
        self.fs, self.base = pafs.FileSystem.from_uri(self.root if "://" in self.root else
                                                      str(Path(self.root).resolve()))
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def _path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _write(self, path: str, data: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = path + ".tmp"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, path)

    def _read(self, path: str) -> bytes | None:
        from pyarrow import fs as pafs

        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as src:
            return src.read()

    def load(self, key: str) -> dict[str, Any] | None:
        """The stored summary of a finished fold (with `predictions` as a DataFrame), or None."""
        raw = self._read(self._path(key, RESULT_FILE))
        if raw is None:
            return None
        summary = json.loads(raw)
        csv = self._read(self._path(key, PREDICTIONS_FILE))
        if csv is None:
            return None
        import io

        summary["predictions"] = pd.read_csv(io.BytesIO(csv), keep_default_na=False)
        return summary

    def save(self, key: str, summary: Mapping[str, Any], predictions: pd.DataFrame) -> None:
        self._write(self._path(key, PREDICTIONS_FILE), predictions.to_csv(index=False).encode())
        self._write(self._path(key, RESULT_FILE), json.dumps(summary, default=_json_default).encode())

    def checkpoint_dir(self, key: str) -> str:
        """A local directory for train_fold's checkpoint: the storage itself when local, else a scratch directory
        seeded from and synced back to the remote copy (`pull_checkpoint` / `push_checkpoint`)."""
        if self.local:
            return self._path(key, CHECKPOINT_DIR)
        return str(Path(tempfile.gettempdir()) / "mer-fold-checkpoints" / key)

    def pull_checkpoint(self, key: str, local_dir: str) -> None:
        if self.local:
            return
        from mer_model.training.trainer import CHECKPOINT_NAME

        raw = self._read(self._path(key, CHECKPOINT_DIR, CHECKPOINT_NAME))
        if raw is not None:
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / CHECKPOINT_NAME).write_bytes(raw)

    def push_checkpoint(self, key: str, local_dir: str) -> None:
        if self.local:
            return
        from mer_model.training.trainer import CHECKPOINT_NAME

        path = Path(local_dir) / CHECKPOINT_NAME
        if path.is_file():
            self._write(self._path(key, CHECKPOINT_DIR, CHECKPOINT_NAME), path.read_bytes())


# --------------------------------------------------------------------------------------------------------------------
# One fold


@dataclass(frozen=True)
class FoldJob:
    """Everything a worker needs to train one fold; `key` identifies its result in FoldStorage."""

    key: str
    fold: Fold
    model: dict[str, Any]
    train: dict[str, Any]
    cache_dir: str
    storage: str
    torch_threads: int = 1


def fold_key(model: ModelConfig, train: TrainConfig, fold: Fold, data_version: str) -> str:
    """Hash of what determines a fold's numbers (settings that only change speed are left out)."""
    return tracking.config_hash({
        "model": model.model_dump(mode="json"),
        "train": train.model_dump(mode="json", exclude={"checkpoint_every", "num_workers", "device", "amp"}),
        "fold": [fold.name, list(fold.train_subjects), list(fold.test_subjects), list(fold.val_subjects)],
        "data": data_version,
    }, length=16)


_STORES: dict[str, Any] = {}
_STORES_LOCK = threading.Lock()


def _open_store(cache_dir: str) -> Any:
    """One SampleStore per worker process and cache: Ray reuses workers, and the store keeps arrays in memory."""
    from mer_model.training.data import SampleStore

    with _STORES_LOCK:
        if cache_dir not in _STORES:
            _STORES[cache_dir] = SampleStore.open(cache_dir)
        return _STORES[cache_dir]


def run_fold(job: FoldJob) -> dict[str, Any]:
    """Train one fold unless its result is already stored; returns the stored summary (without predictions)."""
    storage = FoldStorage(job.storage)
    done = storage.load(job.key)
    if done is None:
        import torch

        from mer_model.training.trainer import FoldSpec, train_fold

        torch.set_num_threads(max(1, job.torch_threads))
        store = _open_store(job.cache_dir)
        spec = FoldSpec(model=ModelConfig(**job.model), train=TrainConfig(**job.train), fold=job.fold,
                        class_names=store.class_names)
        ckpt_dir = storage.checkpoint_dir(job.key)
        storage.pull_checkpoint(job.key, ckpt_dir)

        def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
            log.info("fold %s epoch %d: %s", job.fold.name, epoch,
                     ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            storage.push_checkpoint(job.key, ckpt_dir)

        result = train_fold(spec, store, callback=on_epoch, checkpoint_dir=ckpt_dir)
        summary = {
            "key": job.key, "fold": result.fold, "protocol": result.protocol,
            "leaky": result.leaky or reads_annotated_aus(job.model),
            "selected_epoch": result.selected_epoch, "val_score": result.val_score, "history": result.history,
            "test_metrics": result.test_metrics, "wall_time": result.wall_time, "device": result.device,
            "train_subjects": list(result.train_subjects), "val_subjects": list(result.val_subjects),
            "test_subjects": list(job.fold.test_subjects),
        }
        storage.save(job.key, summary, result.predictions)
        done = storage.load(job.key)
    assert done is not None
    done.pop("predictions")
    return done


def run_final(model: dict[str, Any], train: dict[str, Any], cache_dir: str, epochs: int,
              torch_threads: int = 1) -> tuple[Any, list[dict[str, Any]]]:
    """Train the final model on every subject of the cache (a Ray task); returns (model on CPU, history)."""
    import torch

    from mer_model.training.trainer import train_final

    torch.set_num_threads(max(1, torch_threads))
    store = _open_store(cache_dir)
    return train_final(ModelConfig(**model), TrainConfig(**train), store, store.subjects(), epochs)


# --------------------------------------------------------------------------------------------------------------------
# One trial = one configuration over its folds


@dataclass
class TrialContext:
    """What every trial of one phase shares (passed once through the object store with tune.with_parameters)."""

    phase: str  # "search" (objective = mean inner validation score) or "evaluate" (full LOSO, pooled test metrics)
    params: dict[str, Any]  # params.yaml as a mapping; a trial applies its sampled values on top
    protocol: str
    folds: list[Fold]
    cache_dir: str
    storage: str
    data_version: str
    fold_cpus: float
    fold_gpus: float
    max_retries: int
    metric: str = "uf1"
    search_keys: list[str] = field(default_factory=list)


def trial_params(base: Mapping[str, Any], overrides: Mapping[str, Any], protocol: str) -> Params:
    """The resolved Params of a trial: `base` + sampled `overrides` (dotted keys), with train.protocol set."""
    tree = json.loads(json.dumps(base))
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    set_dotted(tree, "train.protocol", protocol)
    return parse_params(tree, "trial config")


def fold_jobs(ctx: TrialContext, params: Params) -> list[FoldJob]:
    threads = max(1, int(ctx.fold_cpus))
    return [
        FoldJob(key=fold_key(params.model, params.train, fold, ctx.data_version), fold=fold,
                model=params.model.model_dump(mode="json"), train=params.train.model_dump(mode="json"),
                cache_dir=ctx.cache_dir, storage=ctx.storage, torch_threads=threads)
        for fold in ctx.folds
    ]


def _fold_task(ctx: TrialContext) -> Any:
    """run_fold as a Ray task with the fold's resources, placed inside the calling trial's placement group."""
    import ray
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = get_current_placement_group()
    strategy: Any = (PlacementGroupSchedulingStrategy(placement_group=group, placement_group_capture_child_tasks=True)
                     if group is not None else "DEFAULT")
    return ray.remote(run_fold).options(num_cpus=ctx.fold_cpus, num_gpus=ctx.fold_gpus,
                                        max_retries=ctx.max_retries, scheduling_strategy=strategy)


def _report(metrics: dict[str, Any]) -> None:
    from ray import tune

    tune.report(metrics)


def trial_trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: launch every fold of this configuration, report each as it finishes.

    Search phase: the reported `objective` is the mean INNER validation score (`val_<tune.metric>` at the selected
    epoch) of the folds finished so far -- never a test-fold number. Evaluate phase: the pooled test metrics so far.
    """
    import ray

    overrides = {k: config[k] for k in ctx.search_keys if k in config}
    params = trial_params(ctx.params, overrides, ctx.protocol)
    jobs = fold_jobs(ctx, params)
    task = _fold_task(ctx)
    pending = {task.remote(job): job for job in jobs}
    scores: list[float] = []
    predictions: list[pd.DataFrame] = []
    storage = FoldStorage(ctx.storage)
    class_names: list[str] | None = None
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        summary = ray.get(ready[0])
        report: dict[str, Any] = {"fold": job.fold.name, "fold_key": job.key, "folds_done": len(jobs) - len(pending),
                                  "folds_total": len(jobs)}
        if ctx.phase == "search":
            scores.append(inner_score(summary, ctx.metric))
            report[OBJECTIVE] = float(np.mean(scores))
        else:
            stored = storage.load(job.key)
            assert stored is not None
            predictions.append(stored["predictions"])
            class_names = class_names or list(stored["test_metrics"]["per_class_recall"])  # in class order
            flat, _ = flat_metrics(pd.concat(predictions, ignore_index=True), class_names)
            report.update({k: v for k, v in flat.items() if v is not None})
        _report(report)


def inner_score(summary: Mapping[str, Any], metric: str) -> float:
    """The fold's validation `metric` at its selected epoch (protocol `inner`)."""
    if summary["protocol"] != "inner":
        raise ConfigError(f"tune.search_folds: fold {summary['fold']} ran protocol {summary['protocol']}, not inner")
    entry = summary["history"][summary["selected_epoch"] - 1]
    key = f"val_{metric}"
    if key not in entry:
        raise ConfigError(f"tune.metric: {metric!r} is not a validation metric; choose uf1, uar or accuracy")
    return float(entry[key])


def fold_resources(fold_cpus: float, fold_gpus: float, bundles: int) -> Any:
    """Tune resources of a trial: an empty head bundle for the waiting trainable, one bundle per concurrent fold."""
    from ray import tune

    fold = {"CPU": fold_cpus, **({"GPU": fold_gpus} if fold_gpus else {})}
    return tune.PlacementGroupFactory([{}] + [dict(fold) for _ in range(max(1, bundles))])


def fold_slots(cluster: Mapping[str, float], fold_cpus: float, fold_gpus: float) -> int:
    """How many folds the cluster can run at once."""
    slots = math.floor(cluster.get("CPU", 1) / fold_cpus + 1e-9)
    if fold_gpus:
        slots = min(slots, math.floor(cluster.get("GPU", 0) / fold_gpus + 1e-9))
    if slots < 1:
        raise ConfigError(f"tune.fold_cpus/fold_gpus: one fold needs {fold_cpus} CPU / {fold_gpus} GPU; the Ray "
                          f"cluster has {cluster.get('CPU', 0)} CPU / {cluster.get('GPU', 0)} GPU")
    return slots


# --------------------------------------------------------------------------------------------------------------------
# MLflow mirror (driver side)


@dataclass
class RunInfo:
    """Names and tags of the runs of one experiment (dataset x model x protocol)."""

    experiment_key: str
    parent_id: str
    protocol: str
    base_params: dict[str, str]
    artifacts_dir: Path


def is_leaky(protocol: str, model: ModelConfig | Mapping[str, Any]) -> bool:
    """Results used test labels: the `oracle` protocol chose the epoch on the test subject, or the model reads the
    annotated AUs the labels derive from (known from the configuration, without building the network)."""
    return protocol == "oracle" or reads_annotated_aus(model)


def leaky_tags(protocol: str, leaks_labels: bool = False) -> dict[str, str]:
    """`protocol` and `leaky` run tags; `leaks_labels`: the model reads annotated AUs (see `is_leaky`)."""
    return {"protocol": protocol, "leaky": str(protocol == "oracle" or leaks_labels).lower()}


def run_label(protocol: str, leaks_labels: bool = False) -> str:
    """The protocol as run names and titles show it, e.g. "oracle (leaky)", "fixed (leaky)" for annotated AUs."""
    return f"{protocol} (leaky)" if protocol == "oracle" or leaks_labels else protocol


class MlflowCallback:
    """Builds the Tune callback lazily (ray.tune.Callback) so that importing this module does not import Ray."""

    def __new__(cls, client: Any, experiment_id: str, runs: tracking.OpenRuns, info: RunInfo, ctx: TrialContext,
                params: Params) -> Any:
        from ray.tune import Callback

        class _Callback(Callback):
            def __init__(self) -> None:
                self.trial_runs: dict[str, str] = {}
                self.storage = FoldStorage(ctx.storage)

            def _trial_key(self, trial: Any) -> str:
                suffix = trial.trial_id if ctx.phase == "search" else "chosen"
                return f"{info.experiment_key}/{ctx.phase}/{suffix}"

            def _trial_run(self, trial: Any) -> str:
                if trial.trial_id in self.trial_runs:
                    return self.trial_runs[trial.trial_id]
                overrides = {k: trial.config[k] for k in ctx.search_keys if k in trial.config}
                resolved = trial_params(ctx.params, overrides, ctx.protocol)
                leaks = reads_annotated_aus(resolved.model)
                name = (f"search trial {trial.trial_id} ({run_label('inner', leaks)})" if ctx.phase == "search"
                        else f"LOSO {run_label(ctx.protocol, leaks)}")
                run_id, created = tracking.get_or_create_run(
                    client, experiment_id, self._trial_key(trial), name,
                    {tracking.KIND_TAG: "trial", tracking.EXPERIMENT_KEY_TAG: info.experiment_key, "phase": ctx.phase,
                     **leaky_tags(ctx.protocol, leaks)},
                    parent_id=info.parent_id)
                runs.add(run_id)
                if created:
                    tracking.log_params(client, run_id, info.base_params | tracking.run_params(resolved) | {
                        f"search.{k}": json.dumps(v) for k, v in overrides.items()})
                    tracking.log_config_artifact(client, run_id, resolved, info.artifacts_dir / run_id)
                self.trial_runs[trial.trial_id] = run_id
                return run_id

            def on_trial_start(self, iteration: int, trials: list, trial: Any, **info_: Any) -> None:
                self._trial_run(trial)

            def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info_: Any) -> None:
                trial_run = self._trial_run(trial)
                if ctx.phase == "search" and OBJECTIVE in result:
                    tracking.log_metrics(client, trial_run, {OBJECTIVE: result[OBJECTIVE]},
                                         step=int(result["folds_done"]))
                key = result.get("fold_key")
                if key:
                    overrides = {k: trial.config[k] for k in ctx.search_keys if k in trial.config}
                    resolved = trial_params(ctx.params, overrides, ctx.protocol)
                    self._log_fold(trial_run, self._trial_key(trial), result["fold"], key, resolved)

            def _log_fold(self, trial_run: str, trial_key: str, fold: str, key: str, resolved: Params) -> None:
                stored = self.storage.load(key)
                assert stored is not None, f"fold {fold} reported but not stored under {key}"
                run_key = f"{trial_key}/fold/{fold}"
                existing = tracking.find_run(client, experiment_id, run_key)
                if existing is not None and existing.info.status == "FINISHED":
                    return  # logged by an earlier driver
                leaks = reads_annotated_aus(resolved.model)
                run_id, _ = tracking.get_or_create_run(
                    client, experiment_id, run_key, f"fold {fold} ({run_label(stored['protocol'], leaks)})",
                    {tracking.KIND_TAG: "fold", tracking.EXPERIMENT_KEY_TAG: info.experiment_key, "fold": fold,
                     "phase": ctx.phase, "fold_key": key, **leaky_tags(stored["protocol"], leaks)},
                    parent_id=trial_run)
                runs.add(run_id)
                tracking.log_params(client, run_id, info.base_params | tracking.run_params(resolved) | {
                    "fold.test_subjects": ",".join(stored["test_subjects"]),
                    "fold.val_subjects": ",".join(stored["val_subjects"]),
                    "fold.n_train_subjects": str(len(stored["train_subjects"])),
                    "fold.device": stored["device"]})
                rows = [(name, value, int(entry["epoch"])) for entry in stored["history"]
                        for name, value in entry.items() if name != "epoch" and isinstance(value, (int, float))]
                tracking.log_metric_rows(client, run_id, rows)
                test = stored["test_metrics"]
                final = {k: test.get(k) for k in ("uf1", "uar", "accuracy", "weighted_f1")}
                final |= {"selected_epoch": stored["selected_epoch"], "wall_time_s": stored["wall_time"],
                          "n": test.get("n")}
                if stored["val_score"] is not None:
                    final["val_score"] = stored["val_score"]
                tracking.log_metrics(client, run_id, final)
                directory = info.artifacts_dir / run_id
                directory.mkdir(parents=True, exist_ok=True)
                stored["predictions"].to_csv(directory / PREDICTIONS_FILE, index=False)
                pd.DataFrame(stored["history"]).to_csv(directory / "history.csv", index=False)
                client.log_artifact(run_id, str(directory / PREDICTIONS_FILE))
                client.log_artifact(run_id, str(directory / "history.csv"))
                runs.end(run_id, "FINISHED")

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info_: Any) -> None:
                run_id = self._trial_run(trial)
                overrides = {k: trial.config[k] for k in ctx.search_keys if k in trial.config}
                resolved = trial_params(ctx.params, overrides, ctx.protocol)
                pooled = pooled_predictions(self.storage, fold_jobs(ctx, resolved))
                log_pooled(client, run_id, pooled, info.artifacts_dir / run_id,
                           f"{trial.trial_id} ({run_label(ctx.protocol, reads_annotated_aus(resolved.model))})")
                last = trial.last_result or {}
                if OBJECTIVE in last:
                    tracking.log_metrics(client, run_id, {OBJECTIVE: last[OBJECTIVE]})
                runs.end(run_id, "FINISHED")

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info_: Any) -> None:
                runs.end(self._trial_run(trial), "FAILED")

        return _Callback()


class FoldProgress:
    """Tune callback on the driver: folds done/total and an ETA for one phase (Tune itself runs with verbose=0).

    A tqdm bar on a terminal; elsewhere (`dvc repro`, `ray job` logs, files) one log line per finished fold, since a
    redrawn bar turns into one unreadable line there. Folds read back from storage count as done at once."""

    def __new__(cls, phase: str, total: int, interactive: bool | None = None) -> Any:
        import sys
        import time

        from ray.tune import Callback
        from tqdm import tqdm

        class _Progress(Callback):
            def __init__(self) -> None:
                self.done = 0
                self.start = time.monotonic()
                tty = sys.stderr.isatty() if interactive is None else interactive
                self.bar = tqdm(total=total, desc=phase, unit="fold", disable=not tty, dynamic_ncols=True)

            def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info_: Any) -> None:
                if not result.get("fold_key"):
                    return
                self.done += 1
                self.bar.update(1)
                if self.bar.disable:
                    elapsed = time.monotonic() - self.start
                    eta = elapsed / self.done * max(0, total - self.done)
                    log.info("%s: %d/%d folds done (fold %s), elapsed %s, ETA %s", phase, self.done, total,
                             result.get("fold"), tqdm.format_interval(elapsed), tqdm.format_interval(eta))

            def on_experiment_end(self, trials: list, **info_: Any) -> None:
                self.bar.close()

        return _Progress()


def pooled_predictions(storage: FoldStorage, jobs: Sequence[FoldJob]) -> tuple[pd.DataFrame, list[str]]:
    """Test predictions of all (finished) folds of a configuration, and the class names."""
    frames, names = [], None
    for job in jobs:
        stored = storage.load(job.key)
        if stored is None:
            continue
        frames.append(stored["predictions"])
        names = names or list(stored["test_metrics"]["per_class_recall"])
    if not frames or names is None:
        raise ConfigError("no finished fold to pool")
    return pd.concat(frames, ignore_index=True), names


def log_pooled(client: Any, run_id: str, pooled: tuple[pd.DataFrame, list[str]], directory: Path,
               title: str) -> dict[str, float]:
    """Pooled LOSO metrics and the evaluation artifacts of a run; returns the metrics."""
    predictions, names = pooled
    flat, _ = flat_metrics(predictions, names)
    tracking.log_metrics(client, run_id, flat)
    paths = write_artifacts(predictions, names, directory, title=title)
    for name in ("predictions", "per_subject", "confusion_png", "per_class_recall"):
        client.log_artifact(run_id, str(paths[name]))
    return flat


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _run(args: argparse.Namespace) -> int:
    # The driver lives in pipelines/ (orchestration); the CLI is only its second entry point besides `python -m`.
    from pipelines.loso import run_experiment

    run_experiment(params_from_args(args))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="LOSO training + Optuna search on Ray Tune, tracked in MLflow")
    add_params_arguments(parser)
    parser.set_defaults(func=_run)

