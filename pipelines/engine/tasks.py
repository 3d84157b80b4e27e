"""The engine's Ray tasks. A fold task takes a LIST of fold jobs and returns one stored FoldSummary per fold, each
under its own key (today the trial submits one job per task; a task may train a group of folds, e.g. batched, without
changing storage or callers). A fold whose result is already stored is read back, not trained.

A fold declares its resources (`tune.fold_cpus`, fractional `tune.fold_gpus`, so small folds share a GPU) and is
retried by Ray when its worker dies (`tune.max_retries`); its checkpoint makes the retry continue instead of
restarting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from mer_model.config import ModelConfig, TrainConfig
from mer_model.training.data import SampleStore
from mer_model.training.folds import Fold
from mer_model.training.results import FoldSummary
from mer_model.training.trainer import FoldSpec, train_final, train_fold
from pipelines.engine.storage import FoldStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldJob:
    """Everything a worker needs to train one fold; `key` (folds.fold_fingerprint) identifies its stored result;
    `leaky` is the leak rule's verdict on its configuration."""

    key: str
    fold: Fold
    model: dict[str, Any]
    train: dict[str, Any]
    leaky: bool
    cache_dir: str
    storage: str
    torch_threads: int = 1


_STORES: dict[str, SampleStore] = {}
_STORES_LOCK = threading.Lock()


def open_store(cache_dir: str) -> SampleStore:
    """One SampleStore per worker process and cache: Ray reuses workers, and the store keeps arrays in memory."""
    with _STORES_LOCK:
        if cache_dir not in _STORES:
            _STORES[cache_dir] = SampleStore.open(cache_dir)
        return _STORES[cache_dir]


def _train(job: FoldJob, storage: FoldStorage) -> FoldSummary:
    torch.set_num_threads(max(1, job.torch_threads))
    store = open_store(job.cache_dir)
    train = TrainConfig(**job.train)
    spec = FoldSpec(model=ModelConfig(**job.model), train=train, fold=job.fold, class_names=store.class_names)
    ckpt_dir = storage.checkpoint_dir(job.key)
    storage.pull_checkpoint(job.key, ckpt_dir)

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        log.info("fold %s epoch %d: %s", job.fold.name, epoch,
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        storage.push_checkpoint(job.key, ckpt_dir)

    result = train_fold(spec, store, callback=on_epoch, checkpoint_dir=ckpt_dir)
    summary = result.summary(job.key, job.leaky, train.split)
    storage.save(summary, result.predictions)
    return summary


def run_folds(jobs: Sequence[FoldJob]) -> list[FoldSummary]:
    """Train the folds of `jobs` whose results are not stored yet; returns every job's stored summary, in order."""
    out = []
    for job in jobs:
        storage = FoldStorage(job.storage)
        out.append(storage.summary(job.key) or _train(job, storage))
    return out


def fold_task(cpus: float, gpus: float, retries: int, strategy: Any = "DEFAULT") -> Any:
    """`run_folds` as a Ray task with one fold's resources (scheduled by `strategy`, e.g. a trial's placement group)."""
    return ray.remote(run_folds).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries,
                                         scheduling_strategy=strategy)


def run_final(model: dict[str, Any], train: dict[str, Any], cache_dir: str, epochs: int,
              torch_threads: int = 1) -> tuple[Any, list[dict[str, Any]]]:
    """Train the final model on every subject of the cache (a Ray task); returns (model on CPU, history)."""
    torch.set_num_threads(max(1, torch_threads))
    store = open_store(cache_dir)
    return train_final(ModelConfig(**model), TrainConfig(**train), store, store.subjects(), epochs)
