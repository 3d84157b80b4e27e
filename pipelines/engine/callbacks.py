"""Tune callbacks of the driver, attached through `RunConfig(callbacks=...)` when a Tuner is built and restored with
it by `Tuner.restore` (so they pickle: they hold configuration and open clients and files lazily).

* `TrackingCallback` mirrors trials and folds into the tracker: a run per trial (child of the experiment's parent
  run) and a run per fold (child of its trial) with per-epoch metrics, predictions and history. Only the driver
  talks to the tracker: workers need no access to the tracking server or its credentials.
* `FoldProgress` shows folds done/total with an ETA.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback
from tqdm import tqdm

from mer.components.tracking import EXPERIMENT_KEY_TAG, KIND_TAG, Tracker
from mer.model.io import write_csv
from mer.model.reporting.artifacts import write_artifacts
from mer.model.training.metrics import METRICS, OPTIONAL_METRICS, flat_metrics
from mer.model.config import IntervalConfig
from mer.model.training.protocols import result_verdict, run_label
from mer.model.training.results import FoldSummary
from mer.pipelines.engine.storage import FoldStorage
from mer.pipelines.engine.trial import OBJECTIVE, OUTER_KEY, REPEAT_KEY, TrialContext

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """The tracked runs of one experiment (dataset x model x protocol x split)."""

    experiment_key: str
    parent_id: str
    base_params: dict[str, str] = field(default_factory=dict)  # data_version, git_commit, experiment


def leak_tags(protocol: str, leaky: bool) -> dict[str, str]:
    """The `protocol` and `leaky` tags every run carries."""
    return {"protocol": protocol, "leaky": str(leaky).lower()}


def log_pooled(tracker: Tracker, run: str, predictions: pd.DataFrame, class_names: list[str],
               title: str, leaky: bool, intervals: IntervalConfig | None = None) -> dict[str, Any]:
    """Pooled metrics and the evaluation artifacts of a run (mer.model.reporting.artifacts); returns the metrics.
    With `intervals`, the subject-bootstrap bounds too (`uf1_ci_low`, ...: the parent run's, for the MLflow UI's
    compare view; search trials go without)."""
    flat, _ = flat_metrics(predictions, class_names, intervals)
    tracker.log_metrics(run, [(k, v, 0) for k, v in flat.items()])
    with tempfile.TemporaryDirectory(prefix="mer-artifacts-") as tmp:
        paths = write_artifacts(predictions, class_names, Path(tmp), title=title, leaky=leaky)
        tracker.log_files(run, [paths[k] for k in ("predictions", "per_subject", "confusion_png", "per_class_recall")])
    return flat


class TrackingCallback(Callback):
    """Mirrors one phase's trials and folds into `tracker` (see the module docstring)."""

    def __init__(self, tracker: Tracker, info: RunInfo, ctx: TrialContext) -> None:
        self.tracker = tracker
        self.info = info
        self.ctx = ctx
        self.trial_runs: dict[str, str] = {}

    def _trial_key(self, trial: Any) -> str:
        repeat = trial.config.get(REPEAT_KEY)
        suffix = trial.trial_id if self.ctx.phase == "search" else (
            "chosen" if repeat is None else f"chosen/repeat{repeat}")
        return f"{self.info.experiment_key}/{self.ctx.phase}/{suffix}"

    def _trial_run(self, trial: Any) -> str:
        if trial.trial_id in self.trial_runs:
            return self.trial_runs[trial.trial_id]
        resolved, overrides = self.ctx.resolved(trial.config)
        leaky = any(job.leaky for job in self.ctx.jobs(trial.config))
        label = run_label(self.ctx.protocol, leaky)
        outer, repeat = trial.config.get(OUTER_KEY), trial.config.get(REPEAT_KEY)
        if self.ctx.phase == "search":
            name = f"search trial {trial.trial_id}" + (f" for fold {outer}" if outer else "") + f" ({label})"
        else:
            name = f"evaluation {label}" + (f" repeat {repeat} (seed {resolved.train.seed})" if repeat is not None
                                            else "")
        extra = {**({"outer_fold": str(outer)} if outer else {}), **({"repeat": str(repeat)} if repeat is not None
                                                                     else {})}
        run, created = self.tracker.open_run(
            self._trial_key(trial), name,
            {KIND_TAG: "trial", EXPERIMENT_KEY_TAG: self.info.experiment_key, "phase": self.ctx.phase, **extra,
             **leak_tags(self.ctx.protocol, leaky)},
            parent=self.info.parent_id)
        if created:
            self.tracker.log_params_of(run, resolved, self.info.base_params | {
                f"search.{k}": json.dumps(v) for k, v in overrides.items()})
            with tempfile.TemporaryDirectory(prefix="mer-config-") as tmp:
                self.tracker.log_config(run, resolved, Path(tmp))
        self.trial_runs[trial.trial_id] = run
        return run

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run = self._trial_run(trial)
        if self.ctx.phase == "search" and OBJECTIVE in result and not math.isnan(result[OBJECTIVE]):
            self.tracker.log_metrics(run, [(OBJECTIVE, result[OBJECTIVE], int(result["folds_done"]))])
        if result.get("fold_failed"):
            self._log_failed_fold(run, self._trial_key(trial), result["fold"], result["fold_key"],
                                  result["fold_failed"])
        elif result.get("fold_key"):
            self._log_fold(run, self._trial_key(trial), result["fold"], result["fold_key"], trial.config)

    def _log_failed_fold(self, trial_run: str, trial_key: str, fold: str, key: str, error: str) -> None:
        """A fold that failed (FoldFailure): its run ends FAILED with the reason as a tag, and nothing is pooled."""
        run, _ = self.tracker.open_run(
            f"{trial_key}/fold/{fold}", f"fold {fold} (failed)",
            {KIND_TAG: "fold", EXPERIMENT_KEY_TAG: self.info.experiment_key, "fold": fold, "phase": self.ctx.phase,
             "fold_key": key, "error": error[:4000]}, parent=trial_run)
        self.tracker.end_run(run, "FAILED")

    def _log_fold(self, trial_run: str, trial_key: str, fold: str, key: str, config: dict[str, Any]) -> None:
        run_key = f"{trial_key}/fold/{fold}"
        if self.tracker.is_finished(run_key):
            return  # logged by an earlier driver
        stored = FoldStorage(self.ctx.storage).load(key)
        assert stored is not None, f"fold {fold} reported but not stored under {key}"
        summary, predictions = stored
        resolved = self.ctx.fold_params(config, fold)
        own = self.ctx.per_fold.get(fold, {})  # a nested evaluation's fold: the choice of its own search
        run, _ = self.tracker.open_run(
            run_key, f"fold {fold} ({run_label(summary.protocol, summary.leaky)})",
            {KIND_TAG: "fold", EXPERIMENT_KEY_TAG: self.info.experiment_key, "fold": fold, "phase": self.ctx.phase,
             "fold_key": key, **leak_tags(summary.protocol, summary.leaky),
             **({"nested.chosen": json.dumps(own, sort_keys=True)} if own else {})},
            parent=trial_run, start_time=summary.started_at)
        self.tracker.log_params_of(run, resolved, self.info.base_params | {
            **{f"chosen.{k}": json.dumps(v) for k, v in own.items()},
            "fold.test_subjects": ",".join(summary.test_subjects),
            "fold.val_subjects": ",".join(summary.val_subjects),
            "fold.n_train_subjects": str(len(summary.train_subjects)),
            "fold.device": summary.device,
            **({"fold.member_seeds": ",".join(map(str, summary.member_seeds)),
                "fold.member_epochs": ",".join(map(str, summary.member_epochs))} if summary.member_seeds else {})})
        self.tracker.log_metrics(run, [(name, value, int(entry["epoch"])) for entry in summary.history
                                       for name, value in entry.items()
                                       if name != "epoch" and isinstance(value, (int, float))])
        # Optional figures (an AU F1 where no coded AU occurs, a class absent from the test subject) are None and
        # not logged: absent, never 0.
        recall = summary.test_metrics.get("per_class_recall") or {}
        self.tracker.log_metrics(run, [(k, summary.test_metrics.get(k), 0) for k in (*METRICS, "n", *OPTIONAL_METRICS)]
                                 + [(f"recall_{c}", v, 0) for c, v in recall.items()] + [
            ("selected_epoch", summary.selected_epoch, 0), ("wall_time_s", summary.wall_time, 0),
            ("val_score", summary.val_score, 0)])
        with tempfile.TemporaryDirectory(prefix="mer-fold-") as tmp:
            paths = [Path(tmp) / "predictions.csv", Path(tmp) / "history.csv"]
            write_csv(paths[0], predictions)
            write_csv(paths[1], pd.DataFrame(summary.history))
            self.tracker.log_files(run, paths)
        self.tracker.end_run(run, "FINISHED", end_time=summary.finished_at)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._trial_run(trial)
        keys = [j.key for j in self.ctx.jobs(trial.config)]
        summaries, predictions = stored_folds(self.ctx.storage, keys)
        failed = failed_folds(self.ctx.storage, keys)
        self.tracker.log_metrics(run, [("failed_folds", len(failed), 0)])
        if not summaries:  # every fold failed: nothing to pool
            self.tracker.end_run(run, "FAILED")
            return
        leaky = result_verdict(summaries)
        log_pooled(self.tracker, run, predictions, summaries[0].class_names,
                   f"{trial.trial_id} ({run_label(self.ctx.protocol, leaky)})", leaky)
        last = trial.last_result or {}
        if OBJECTIVE in last and not math.isnan(last[OBJECTIVE]):
            self.tracker.log_metrics(run, [(OBJECTIVE, last[OBJECTIVE], 0)])
        self.tracker.end_run(run, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.tracker.end_run(self._trial_run(trial), "FAILED")


def stored_folds(storage: str, keys: list[str]) -> tuple[list[FoldSummary], pd.DataFrame]:
    """The summaries and pooled test predictions of the finished folds among `keys` (in order); ([], an empty
    frame) when none finished."""
    fold_storage = FoldStorage(storage)
    loaded = [s for s in (fold_storage.load(k) for k in keys) if s is not None]
    if not loaded:
        return [], pd.DataFrame()
    return [s for s, _ in loaded], pd.concat([p for _, p in loaded], ignore_index=True)


def failed_folds(storage: str, keys: list[str]) -> list[dict[str, str]]:
    """{"fold", "error"} of each fold among `keys` that failed (FoldFailure) and has not finished since."""
    fold_storage = FoldStorage(storage)
    return [f for f in (fold_storage.failure(k) for k in keys) if f is not None]


class FoldProgress(Callback):
    """Folds done/total and an ETA for one phase (Tune itself runs with verbose=0): a tqdm bar on a terminal;
    elsewhere (`dvc repro`, `ray job` logs, files) one log line per finished fold, since a redrawn bar turns into one
    unreadable line there. Shown from the start (0/N when the phase starts), so a long first fold is not silence
    (the fold tasks themselves log epoch progress, tasks.py). Folds read back from storage count as done at once."""

    def __init__(self, phase: str, total: int, interactive: bool | None = None) -> None:
        self.phase = phase
        self.total = total
        self.interactive = interactive
        self.done = 0
        self.start: float | None = time.monotonic()
        self.bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "bar": None, "start": None, "done": 0}

    def _bar(self) -> Any:
        if self.bar is None:
            tty = sys.stderr.isatty() if self.interactive is None else self.interactive
            self.bar = tqdm(total=self.total, desc=self.phase, unit="fold", disable=not tty, dynamic_ncols=True)
            self.start = self.start or time.monotonic()  # None after a restore: count from the first fold
        return self.bar

    def setup(self, **info: Any) -> None:
        bar = self._bar()
        if bar.disable:
            log.info("%s: 0/%d folds done", self.phase, self.total)
        else:
            bar.refresh()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not result.get("fold_key"):
            return
        bar = self._bar()
        self.done += 1
        bar.update(1)
        if result.get("fold_failed"):
            log.warning("%s: fold %s FAILED (not pooled): %s", self.phase, result.get("fold"), result["fold_failed"])
        if bar.disable:
            assert self.start is not None
            elapsed = time.monotonic() - self.start
            eta = elapsed / self.done * max(0, self.total - self.done)
            log.info("%s: %d/%d folds done (fold %s), elapsed %s, ETA %s", self.phase, self.done, self.total,
                     result.get("fold"), tqdm.format_interval(elapsed), tqdm.format_interval(eta))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.bar is not None:
            self.bar.close()
