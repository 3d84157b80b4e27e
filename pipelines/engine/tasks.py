"""The engine's Ray tasks. A fold task takes a LIST of fold jobs (a group of `tune.fold_group_size` folds of one
configuration) and returns one stored FoldSummary (or FoldFailure) per fold, each under its own key. A fold whose
result is already stored is read back, not trained. The folds left are trained as one stacked model
(mer.model.training.fold_batch) where `trainer.stack_folds` says so (several folds of a model that declares
`fold_batching`, no seed ensemble), else one after another, each stored as it finishes.

A fold whose numbers become NaN/inf (NonFiniteError: a diverged loss, non-finite outputs) fails alone: it is returned
as a `FoldFailure` naming it and recorded beside the fold storage (`failed.json`), never stored as finished, while the
task goes on with its other folds (a stacked group that diverges is trained again fold by fold, so only the folds
that diverge fail).

A fold declares its resources (`tune.fold_cpus`, fractional `tune.fold_gpus`, so small folds share a GPU) and is
retried by Ray when its worker dies (`tune.max_retries`); its checkpoint makes the retry continue instead of
restarting.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from mer.model.config import ModelConfig, TrainConfig
from mer.model.errors import NonFiniteError
from mer.model.logging_utils import PLATFORM_LOGGERS, setup_logging
from mer.model.training.folds import Fold
from mer.model.training.results import FoldSummary
from mer.pipelines.engine.storage import FoldStorage

if TYPE_CHECKING:
    from mer.model.training.data import SampleStore
    from mer.model.training.results import FoldResult
    from mer.model.training.trainer import Callback, FoldSpec

# torch and the trainer are imported inside the task functions: this module is also imported by every Tune trial
# actor (for FoldJob and fold_task), which only submits fold tasks and waits; importing torch there cost each trial
# seconds of start-up on two cores.

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


@dataclass(frozen=True)
class FoldFailure:
    """A fold that failed for a reason the user must see (`error`, one line naming the fold); never pooled."""

    key: str
    fold: str
    error: str


_STORES: dict[str, SampleStore] = {}
_STORES_LOCK = threading.Lock()
_LOGGING_SET = False
EPOCH_PROGRESS_S = 30.0  # a fold's epoch progress line at most this often


def open_store(cache_dir: str) -> SampleStore:
    """One SampleStore per worker process and cache: Ray reuses workers, and the store keeps arrays in memory."""
    from mer.model.training.data import SampleStore

    with _STORES_LOCK:
        if cache_dir not in _STORES:
            _STORES[cache_dir] = SampleStore.open(cache_dir)
        return _STORES[cache_dir]


def _set_threads(count: int) -> None:
    """torch's intra-op threads in this worker (torch imported here, not by the module: see the note above)."""
    import torch

    torch.set_num_threads(max(1, count))


def _spec(job: FoldJob, store: SampleStore) -> FoldSpec:
    from mer.model.training.trainer import FoldSpec

    return FoldSpec(model=ModelConfig(**job.model), train=TrainConfig(**job.train), fold=job.fold,
                    class_names=store.class_names)


def _worker_logging() -> None:
    """This module's epoch progress lines reach the driver's console (Ray forwards a worker's stderr); everything
    else only from WARNING (the driver already says when a fold is done). Once per worker process; never in the
    driver's own process (a fold run there, as in tests, keeps the caller's logging)."""
    global _LOGGING_SET
    if not _LOGGING_SET and ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None:
        setup_logging(verbose=False)
        for name in PLATFORM_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        log.setLevel(logging.INFO)
        _LOGGING_SET = True


def _epoch_logger(job: FoldJob, storage: FoldStorage, ckpt_dir: str | None) -> Callback:
    """Logs each epoch (DEBUG) and, at most every EPOCH_PROGRESS_S seconds, a progress line "fold X: epoch e/E"
    (INFO: a long fold is not silent, a short one adds no noise); pushes the fold's checkpoint (if it has one) to the
    fold storage."""
    start = last = time.monotonic()
    total = int(job.train.get("epochs", 0))

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        nonlocal last
        member = f" (ensemble member {metrics['member']})" if metrics.get("member") else ""
        log.debug("fold %s epoch %d%s: %s", job.fold.name, epoch, member,
                  ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        now = time.monotonic()
        if now - last >= EPOCH_PROGRESS_S:
            last = now
            loss = metrics.get("train_loss")
            log.info("fold %s: epoch %d/%d%s, train_loss %s, %s elapsed", job.fold.name, epoch, total, member,
                     f"{loss:.4g}" if isinstance(loss, float) else "?", _interval(now - start))
        if ckpt_dir is not None:
            storage.push_checkpoint(job.key, ckpt_dir)

    return on_epoch


def _interval(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _store(job: FoldJob, storage: FoldStorage, result: FoldResult) -> FoldSummary:
    summary = result.summary(job.key, job.leaky, TrainConfig(**job.train).split)
    summary.finished_at = time.time()
    storage.save(summary, result.predictions)
    return summary


def _train(job: FoldJob, storage: FoldStorage) -> FoldSummary:
    from mer.model.training.trainer import train_fold

    _set_threads(job.torch_threads)
    _worker_logging()
    store = open_store(job.cache_dir)
    ckpt_dir = storage.checkpoint_dir(job.key)
    storage.pull_checkpoint(job.key, ckpt_dir)
    result = train_fold(_spec(job, store), store, callback=_epoch_logger(job, storage, ckpt_dir),
                        checkpoint_dir=ckpt_dir)
    return _store(job, storage, result)


def _train_or_fail(job: FoldJob) -> FoldSummary | FoldFailure:
    storage = FoldStorage(job.storage)
    try:
        return _train(job, storage)
    except NonFiniteError as err:
        log.error("%s: the fold failed and is not pooled", err)
        storage.save_failure(job.key, job.fold.name, str(err))
        return FoldFailure(job.key, job.fold.name, str(err))
    except Exception as err:  # noqa: BLE001 - any other error fails this fold alone, in one line; the others go on
        return fail_fold(job, err)


def failure_line(fold: str, err: BaseException) -> str:
    """One line naming the fold and why it failed: the exception raised in training (for a failed Ray task, the
    task's own exception, not Ray's wrapper with the remote traceback)."""
    inner = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    inner = inner if isinstance(inner, BaseException) else err
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    text = (lines[-1] if isinstance(inner, ray.exceptions.RayError) else lines[0]) if lines else ""
    return f"fold {fold}: {type(inner).__name__}" + (f": {text[:400]}" if text else "")


def fail_fold(job: FoldJob, err: BaseException) -> FoldFailure:
    """Record `job`'s fold as failed by `err` (failed.json beside its storage, one log line): never pooled, the other
    folds kept, tried again by a later run."""
    line = failure_line(job.fold.name, err)
    log.error("%s (the fold is not pooled)", line)
    log.debug("fold %s failed", job.fold.name, exc_info=err)
    FoldStorage(job.storage).save_failure(job.key, job.fold.name, line)
    return FoldFailure(job.key, job.fold.name, line)


def _train_batched(jobs: Sequence[FoldJob]) -> list[FoldSummary]:
    """The folds of `jobs` as one stacked model; each result stored under its own key."""
    from mer.model.training.trainer import train_fold_group

    _set_threads(jobs[0].torch_threads)
    store = open_store(jobs[0].cache_dir)
    storages = [FoldStorage(job.storage) for job in jobs]
    _worker_logging()
    callbacks = [_epoch_logger(job, storage, None) for job, storage in zip(jobs, storages, strict=True)]
    results = train_fold_group([_spec(job, store) for job in jobs], store, callbacks)
    return [_store(job, storage, result) for job, storage, result in zip(jobs, storages, results, strict=True)]


def run_folds(jobs: Sequence[FoldJob]) -> list[FoldSummary | FoldFailure]:
    """Train the folds of `jobs` (one configuration) whose results are not stored yet; returns every job's stored
    summary, or its FoldFailure, in order."""
    from mer.model.training.trainer import stack_folds

    done: dict[str, FoldSummary | FoldFailure | None] = {
        job.key: FoldStorage(job.storage).summary(job.key) for job in jobs}
    todo = [job for job in jobs if done[job.key] is None]
    if todo and stack_folds([_spec(job, open_store(job.cache_dir)) for job in todo]):
        try:
            done.update({job.key: s for job, s in zip(todo, _train_batched(todo), strict=True)})
            todo = []
        except NonFiniteError as err:
            log.warning("%s; training the group's %d folds one by one", err, len(todo))
    for job in todo:
        done[job.key] = _train_or_fail(job)
    return [done[job.key] for job in jobs]  # type: ignore[misc]  # every job is stored, read back or failed


@functools.cache
def _remote_run_folds() -> Any:
    return ray.remote(run_folds)


def fold_task(cpus: float, gpus: float, retries: int, strategy: Any = "DEFAULT", name: str | None = None) -> Any:
    """`run_folds` as a Ray task with one fold's resources, scheduled by `strategy` ("DEFAULT": anywhere in the
    cluster, the way trial_trainable submits it, so that pending tasks are demand the autoscaler sees), named `name`
    in Ray's dashboard and task table."""
    return _remote_run_folds().options(num_cpus=cpus, num_gpus=gpus, max_retries=retries,
                                       scheduling_strategy=strategy, **({"name": name} if name else {}))


def run_final(model: dict[str, Any], train: dict[str, Any], cache_dir: str, epochs: int,
              torch_threads: int = 1) -> tuple[Any, list[dict[str, Any]]]:
    """Train the final model on every subject of the cache (a Ray task); returns (model on CPU, history)."""
    from mer.model.training.trainer import train_final

    _set_threads(torch_threads)
    store = open_store(cache_dir)
    return train_final(ModelConfig(**model), TrainConfig(**train), store, store.subjects(), epochs)
