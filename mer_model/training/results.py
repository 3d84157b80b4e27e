"""Typed results of the training stages: one fold's result, its stored summary, and an experiment's summary.

These are the contracts between stages. The tune stage writes an experiment into `tune.results` as

* `summary.json`   - ExperimentSummary (class names stored explicitly, metric names of `metrics.METRICS`);
* `predictions.csv` - pooled test predictions of every fold (sample_id, subject, dataset, fold, label, pred,
  prob_0..prob_{C-1});
* `folds.json`     - one FoldSummary per fold, with its per-epoch history (the report's learning curves).

`evaluate`, `report`, `register` and `benchmark` read only these files (`read_results`), so the DVC `evaluate` stage
depends on nothing DVC does not track. A missing or malformed file is a DataError naming it.

A truncated or edited predictions.csv still parses, and metrics over half the samples look like a result; so
summary.json records each data file's rows and SHA-256 (`files`), and `read_results` refuses a file that no longer
matches them (DataError naming it).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.model.errors import DataError
from mer.model.io import atomic_write, digest

SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.csv"
FOLDS_FILE = "folds.json"
# A fold's resumable training state (model, optimizer, epoch) in its checkpoint directory: what a retried fold task
# continues from (mer.model.training.trainer writes it, the engine's fold storage moves it).
CHECKPOINT_NAME = "last.pt"


def _plain(value: Any) -> Any:
    """JSON-able copy: numpy scalars to Python, tuples to lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class _Json:
    """to_json / from_json for the dataclasses below; unknown keys are an error naming them."""

    def to_json(self) -> dict[str, Any]:
        return _plain(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "") -> Any:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise DataError(f"unknown {cls.__name__} field(s) {unknown}", file=source or None)
        try:
            return cls(**dict(data))
        except TypeError as err:  # a required field missing
            raise DataError(f"{cls.__name__}: {err}", file=source or None) from None


@dataclass
class FoldSummary(_Json):
    """What is stored for one finished fold (its predictions sit beside it as CSV)."""

    key: str  # folds.fold_fingerprint of the fold's configuration and data version
    fold: str
    protocol: str
    leaky: bool
    selected_epoch: int  # 1-based
    val_score: float | None  # `inner`: best validation UF1; None otherwise
    history: list[dict[str, Any]]  # one entry per epoch (`epoch`, `train_loss`, `val_*` / `test_*`, `time_s`)
    test_metrics: dict[str, Any]  # classification_metrics of this fold's test subjects (+ au_f1, flow_epe, ...)
    class_names: list[str]
    wall_time: float
    device: str
    train_subjects: list[str] = field(default_factory=list)
    val_subjects: list[str] = field(default_factory=list)
    test_subjects: list[str] = field(default_factory=list)
    split: str = "loso"
    # Seed ensemble (train.ensemble > 1): each member's seed and kept epoch (selected_epoch is their median); [] for one
    # model.
    member_seeds: list[int] = field(default_factory=list)
    member_epochs: list[int] = field(default_factory=list)
    # SHA-256 of the predictions.csv stored beside it (the engine's fold storage checks it when reading the fold
    # back); "" where not recorded.
    predictions_sha256: str = ""
    # When the fold's training ended (Unix seconds; it started `wall_time` earlier): the tracked fold run, created
    # after the fold finished, carries these as its start and end. None in results stored before it was recorded.
    finished_at: float | None = None

    @property
    def started_at(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.wall_time


@dataclass
class FoldResult:
    """The trainer's outcome of one fold, in memory: the summary's fields plus the test predictions (DataFrame:
    sample_id, subject, dataset, fold, label, pred, prob_0..prob_{C-1}). Persisted as its `summary()` (JSON) +
    `predictions` (CSV); a fold's weights are not kept (the served model is trained by `train_final`)."""

    fold: str
    predictions: pd.DataFrame
    history: list[dict[str, Any]]
    selected_epoch: int
    val_score: float | None
    protocol: str
    leaky: bool
    wall_time: float
    device: str
    test_metrics: dict[str, Any] = field(default_factory=dict)
    train_subjects: tuple[str, ...] = ()
    val_subjects: tuple[str, ...] = ()
    test_subjects: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    member_seeds: tuple[int, ...] = ()  # seed ensemble: each member's seed and kept epoch; () for one model
    member_epochs: tuple[int, ...] = ()

    def summary(self, key: str, leaky: bool, split: str) -> FoldSummary:
        """The storable part; `leaky` is the platform's leak rule (protocol or model inputs), not only the
        protocol's."""
        return FoldSummary(
            key=key, fold=self.fold, protocol=self.protocol, leaky=leaky, selected_epoch=int(self.selected_epoch),
            val_score=self.val_score, history=_plain(self.history), test_metrics=_plain(self.test_metrics),
            class_names=list(self.class_names), wall_time=float(self.wall_time), device=self.device,
            train_subjects=list(self.train_subjects), val_subjects=list(self.val_subjects),
            test_subjects=list(self.test_subjects), split=split, member_seeds=[int(x) for x in self.member_seeds],
            member_epochs=[int(x) for x in self.member_epochs])


@dataclass
class ExperimentSummary(_Json):
    """One experiment (dataset x model x protocol x split) as the tune stage leaves it."""

    experiment: str
    protocol: str
    leaky: bool  # the stored leak verdict (protocols.result_verdict of the folds); outputs read it
    class_names: list[str]
    metrics: dict[str, float | None] = field(default_factory=dict)  # metrics.flat_metrics of the pooled predictions
    split: str = "loso"
    experiment_key: str = ""
    chosen: dict[str, Any] = field(default_factory=dict)  # hyperparameters chosen by the inner-validation search
    data_version: str = ""
    folds: int = 0  # pooled (finished) folds
    # {"fold", "error"} of each fold that failed (e.g. its loss became non-finite): counted, never pooled
    failed_folds: list[dict[str, str]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)  # name, config, kwargs
    # The `train` section every evaluated fold ran with (the chosen values applied, `protocol` the evaluation's), and
    # the search that chose them (num_samples, search_folds, metric, search_space): without MLflow, these files alone
    # say how the numbers were made. Empty in summaries written before they were recorded.
    train: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    # tune.nested: per evaluation fold, the values its own search chose (`chosen`), that search's best mean inner
    # validation score (`inner_score`) and the fold's stored leak verdict (`leaky`); {} without a nested search.
    chosen_per_fold: dict[str, dict[str, Any]] = field(default_factory=dict)
    # tune.repeats > 1: repeats.repeat_spread of the repeats' pooled metrics (n, seeds, per_repeat, <metric>_mean,
    # <metric>_sd); `metrics` above are repeat 0's, the single run. {} for one run.
    repeats: dict[str, Any] = field(default_factory=dict)
    tracking_experiment: str | None = None
    parent_run_id: str | None = None
    model_uri: str | None = None
    # {file name: {"rows", "sha256"}} of predictions.csv and folds.json as written with this summary (`read_results`
    # checks them); empty in summaries written before it was recorded.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    leak_reasons: list[str] = field(default_factory=list)  # why `leaky` (protocols.leak_reasons), [] when honest


@dataclass
class Results:
    """The contents of `tune.results`."""

    summary: ExperimentSummary
    predictions: pd.DataFrame
    folds: list[FoldSummary]

    def history(self) -> pd.DataFrame | None:
        """Every fold's history in long format (a `fold` column), or None when no fold has one."""
        frames = [pd.DataFrame(f.history).assign(fold=f.fold) for f in self.folds if f.history]
        return pd.concat(frames, ignore_index=True) if frames else None


def write_results(directory: str | Path, results: Results) -> Path:
    """Write the three files of `tune.results` (summary last: its presence marks a complete directory, and it records
    the other two files' rows and SHA-256 in `files`)."""
    out = Path(directory)
    data = {PREDICTIONS_FILE: (results.predictions.to_csv(index=False).encode(), len(results.predictions)),
            FOLDS_FILE: ((json.dumps([f.to_json() for f in results.folds], indent=2) + "\n").encode(),
                         len(results.folds))}
    for name, (payload, _) in data.items():
        atomic_write(out / name, payload)
    results.summary.files = {name: {"rows": rows, "sha256": digest(payload)} for name, (payload, rows) in data.items()}
    atomic_write(out / SUMMARY_FILE, json.dumps(results.summary.to_json(), indent=2) + "\n")
    return out


def _verified(path: Path, summary: ExperimentSummary) -> bytes:
    """The bytes of a results file, checked against the rows and SHA-256 its summary recorded (when it did)."""
    if not path.is_file():
        raise DataError("missing; run `mer tune` first", file=str(path))
    data = path.read_bytes()
    recorded = summary.files.get(path.name)
    if recorded is not None and digest(data) != recorded.get("sha256"):
        raise DataError(f"does not match {SUMMARY_FILE} (written with {recorded.get('rows')} rows and SHA-256 "
                        f"{str(recorded.get('sha256'))[:12]}...): truncated or edited; run `mer tune` again",
                        file=str(path))
    return data


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError("missing; run `mer tune` first", file=str(path))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err.msg}, line {err.lineno})", file=str(path)) from None


def read_summary(directory: str | Path) -> ExperimentSummary:
    path = Path(directory) / SUMMARY_FILE
    return ExperimentSummary.from_json(_read_json(path), str(path))


def read_results(directory: str | Path) -> Results:
    """`tune.results` back as typed objects; DataError naming a missing or malformed file."""
    directory = Path(directory)
    summary = read_summary(directory)
    predictions_path = directory / PREDICTIONS_FILE
    predictions = pd.read_csv(io.BytesIO(_verified(predictions_path, summary)), keep_default_na=False)
    folds_path = directory / FOLDS_FILE
    _verified(folds_path, summary)
    folds = [FoldSummary.from_json(f, str(folds_path)) for f in _read_json(folds_path)]
    return Results(summary, predictions, folds)

