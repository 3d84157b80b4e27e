"""Optional per-fold figures are absent, never a crash and never a zero, on every aggregation path.

An AU F1 is undefined for a test subject on whom no coded AU occurs, or whose dataset has no AU coding at all; the
recall of a class is undefined for a test subject who shows no sample of it. The main system's two-seed run on the
full composite died after 41 of 68 folds on the first of these (`_ensemble_result` averaged None). The matrix: each
path that aggregates or logs these figures (one model, an ensemble of two seeds, a fold group, pooled predictions,
the tracker, the HTML report, the comparison table, results.csv) x each kind of fold that lacks one. The folds are
trained for real (the CVA+FPF+AU network with its AU head, one epoch, on a tiny cache); everything else is pure
Python. A fold that fails is one line naming it, and the rest is kept: `group_outcomes` on the session's Ray.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_training_data import CLASSES, write_cache

from mer.components.settings import BenchmarkConfig, BenchmarkModel, load_params
from mer.model.config import ModelConfig, TrainConfig
from mer.model.training.data import SampleStore
from mer.model.training.folds import Fold, loso_folds
from mer.model.training.metrics import OPTIONAL_METRICS, flat_metrics, mean_defined, pooled_metrics
from mer.model.training.results import ExperimentSummary, FoldResult, Results
from mer.model.training.trainer import FoldSpec, _mean_extra, train_fold, train_fold_group

REPO = Path(__file__).resolve().parents[1]
# The kinds of test subject that leave an optional figure undefined (subjects of the cache below).
SCENARIOS = {
    "dataset without AU coding": "synthetic/s00",  # au_coded 0 (SMIC in the composite)
    "no coded AU occurs": "synthetic/s01",  # coded, every AU vector zero
    "one class only": "synthetic/s02",  # recall of the two other classes undefined
}
PATHS = ("single", "ensemble", "fold group")
# The main system with its AU head, at a size that trains one epoch in a fraction of a second.
MODEL = ModelConfig(name="cva_fpf", config="flow_small",
                    kwargs={"au_mode": "predicted", "img_size": 32, "stage_channels": [8, 8, 8, 8],
                            "act_channels": 8, "fc_dim": 16, "fc2_dim": 8})


@pytest.fixture(scope="module")
def matrix_store(tmp_path_factory: pytest.TempPathFactory) -> SampleStore:
    root = write_cache(tmp_path_factory.mktemp("optional"), subjects=4, per_subject=6, uncoded=(0,), silent=(1,),
                       one_class=(2,))
    return SampleStore.open(root)


def _spec(store: SampleStore, subject: str, ensemble: int = 1) -> FoldSpec:
    fold = next(f for f in loso_folds(store.index) if f.test_subjects == (subject,))
    train = TrainConfig(epochs=1, batch_size=8, lr=0.01, device="cpu", protocol="inner", val_fraction=0.34,
                        ensemble=ensemble)
    return FoldSpec(MODEL, train, fold, CLASSES)


@pytest.fixture(scope="module")
def folds(matrix_store: SampleStore) -> dict[tuple[str, str], FoldResult]:
    """(path, scenario) -> the fold's result, trained by that path (one torch thread: tiny networks)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_matrix(matrix_store)
    finally:
        torch.set_num_threads(threads)


def _train_matrix(matrix_store: SampleStore) -> dict[tuple[str, str], FoldResult]:
    out: dict[tuple[str, str], FoldResult] = {}
    for scenario, subject in SCENARIOS.items():
        out["single", scenario] = train_fold(_spec(matrix_store, subject), matrix_store)
        out["ensemble", scenario] = train_fold(_spec(matrix_store, subject, ensemble=2), matrix_store)
    group = train_fold_group([_spec(matrix_store, s) for s in SCENARIOS.values()], matrix_store)
    out.update({("fold group", scenario): r for scenario, r in zip(SCENARIOS, group, strict=True)})
    return out


def _undefined(scenario: str) -> set[str]:
    """What the scenario leaves undefined in a fold's test metrics."""
    return {"au_f1"} if scenario != "one class only" else {"recall"}


def _no_zero_stands_for_absent(metrics: dict[str, Any], scenario: str) -> None:
    if "au_f1" in _undefined(scenario):
        assert "au_f1" not in metrics and "per_au_f1" not in metrics, metrics
    recall = metrics["per_class_recall"]
    if scenario == "one class only":
        assert recall["negative"] is not None and recall["positive"] is None and recall["surprise"] is None
    for value in metrics.values():
        assert value is None or not (isinstance(value, float) and math.isnan(value)), metrics


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("path", PATHS)
def test_fold_results_leave_undefined_figures_absent(folds: dict, path: str, scenario: str) -> None:
    result = folds[path, scenario]
    _no_zero_stands_for_absent(result.test_metrics, scenario)
    stored = result.summary("key", False, "loso").to_json()  # storable as JSON, as the engine stores it
    assert "au_f1" not in stored["test_metrics"] or "au_f1" not in _undefined(scenario)
    assert all("au_f1" not in entry for entry in result.history), result.history  # nor in the learning curve
    if scenario != "one class only":
        assert len(result.predictions) == 6


@pytest.mark.usefixtures("one_torch_thread")
def test_the_au_f1_is_kept_where_it_is_defined(matrix_store: SampleStore) -> None:
    """The other side: a coded subject who shows AUs has its AU F1, in [0, 1], on every path."""
    result = train_fold(_spec(matrix_store, "synthetic/s03", ensemble=2), matrix_store)
    assert 0.0 <= result.test_metrics["au_f1"] <= 1.0 and result.test_metrics["per_au_f1"]


def test_ensemble_members_combine_only_the_figures_they_define() -> None:
    """The members' extras: None, NaN or missing are absent; a figure only some members define is their mean."""
    assert _mean_extra([{"loss": 1.0}, {"loss": 3.0}]) == {"loss": 2.0}
    assert _mean_extra([{"loss": 1.0, "au_f1": None}, {"loss": 1.0, "au_f1": None}]) == {"loss": 1.0}
    assert _mean_extra([{"au_f1": 0.4, "per_au_f1": {"4": 0.5}}, {"au_f1": float("nan")}, {}]) == {
        "au_f1": 0.4, "per_au_f1": {"4": 0.5}}
    assert mean_defined([None, float("nan"), 0.2, 0.4]) == pytest.approx(0.3) and mean_defined([None]) is None


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pooled_results_of_such_folds(folds: dict, scenario: str) -> None:
    predictions = pd.concat([r.predictions for (path, _), r in folds.items() if path == "single"],
                            ignore_index=True)
    flat, pooled = flat_metrics(predictions, CLASSES)
    subject = pooled["per_subject"][SCENARIOS[scenario]]
    assert flat["n"] == len(predictions) and subject["n"] == len(folds["single", scenario].predictions)
    if scenario == "one class only":
        assert subject["per_class_recall"]["surprise"] is None and subject["uar"] == subject["accuracy"]


class RecordingTracker:
    """The tracker seam's log_metrics, recording what the engine hands it."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, Any, int]] = []

    def log_metrics(self, run: str, rows: Any) -> None:
        self.rows.extend(rows)

    def is_finished(self, key: str) -> bool:
        return False

    def open_run(self, *args: Any, **kwargs: Any) -> tuple[str, bool]:
        return "run", True

    def __getattr__(self, name: str) -> Any:  # parameters, files, end of run: not looked at here
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("path", PATHS)
def test_the_tracker_logs_only_defined_figures(folds: dict, path: str, scenario: str, tmp_path: Path) -> None:
    """The fold run's metrics: the engine hands undefined ones over as None, and the MLflow tracker drops None and
    NaN (absent in the UI, never 0); defined ones, AU F1 and per-class recall included, are logged."""
    from mer.components.tracking.mlflow_tracker import MlflowTracker
    from mer.pipelines.engine.callbacks import TrackingCallback
    from mer.pipelines.engine.storage import FoldStorage

    result = folds[path, scenario]
    FoldStorage(str(tmp_path)).save(result.summary("key", False, "loso"), result.predictions)
    tracker = RecordingTracker()
    params = load_params(REPO / "params.yaml")
    ctx = SimpleNamespace(storage=str(tmp_path), phase="evaluate", per_fold={},
                          fold_params=lambda config, fold, trial=None: params)
    callback = TrackingCallback(tracker, SimpleNamespace(experiment_key="x", base_params={}), ctx)  # type: ignore
    callback._log_fold("trial", "trial-key", result.fold, "key", {})
    logged = dict((name, value) for name, value, _ in tracker.rows)
    assert "recall_negative" in logged and "uf1" in logged
    sent: list[Any] = []
    client = SimpleNamespace(log_batch=lambda run, metrics: sent.extend(metrics))
    MlflowTracker.log_metrics(SimpleNamespace(client=client), "run", tracker.rows)  # type: ignore[arg-type]
    names = {m.key for m in sent}
    assert all(math.isfinite(m.value) for m in sent)
    if "au_f1" in _undefined(scenario):
        assert "au_f1" not in names
    if scenario == "one class only":
        assert "recall_negative" in names and not {"recall_positive", "recall_surprise"} & names


def test_the_html_report_and_the_comparison_keep_undefined_figures_absent(folds: dict, tmp_path: Path) -> None:
    from mer.model.reporting import comparison_table, write_experiment_report

    results = [r for (path, _), r in folds.items() if path == "ensemble"]
    predictions = pd.concat([r.predictions for r in results], ignore_index=True)
    history = Results(None, predictions, [r.summary("k", False, "loso") for r in results]).history()  # type: ignore
    path = write_experiment_report(predictions, history, {"experiment": "optional"}, CLASSES, tmp_path / "r", False)
    assert path.is_file() and (tmp_path / "r" / "per_subject.png").is_file()
    subjects = pd.read_csv(tmp_path / "r" / "per_subject.csv")
    assert subjects.set_index("subject").loc[SCENARIOS["one class only"], "n"] == 6
    runs = pd.DataFrame([{"model": "a", "dataset": "megc2019", "protocol": "inner", "leaky": False, "start_time": 1,
                          "uf1": 0.5, "uar": 0.5, "smic/uf1": 0.4, "smic/uar": None, "samm/uf1": float("nan")}])
    table = comparison_table(runs)
    assert table.loc[0, "smic UF1"] == 0.4 and "smic UAR" not in table  # absent, not 0
    assert not any("samm" in c for c in table.columns)


def test_results_csv_row_averages_defined_figures_and_counts_the_folds(folds: dict, tmp_path: Path) -> None:
    """The benchmark row: optional figures are the mean over the folds that define them, with that count; a fold that
    failed is named in the notes and the row says how many folds it covers; results.csv leaves absent cells empty."""
    from mer.model.reporting.benchmark import write_outputs
    from mer.pipelines.benchmark import result_row, run_params

    results = [r for (path, _), r in folds.items() if path == "single"]
    summaries = [r.summary("k", False, "loso") for r in results]
    predictions = pd.concat([r.predictions for r in results], ignore_index=True)
    base = load_params(REPO / "params.yaml")
    entry = BenchmarkModel(name="cva_fpf", config="flow_small", kwargs=MODEL.kwargs)
    params = run_params(base, BenchmarkConfig(), "cva", entry, entry.kwargs, "inner", 1, "megc2019")
    failure = {"fold": "synthetic/s03", "error": "fold synthetic/s03: TypeError: unsupported operand"}
    summary = ExperimentSummary(experiment="e", protocol="inner", leaky=False, class_names=CLASSES,
                                folds=len(summaries), failed_folds=[failure])
    row = result_row("cva", entry, params, 10, {"au": "predicted"}, [], predictions, summaries, 1.0, summary)
    defined = [s.test_metrics["au_f1"] for s in summaries if "au_f1" in s.test_metrics]
    assert row["folds"] == "3/4" and row["au_f1_folds"] == len(defined)
    assert row["au_f1"] == (pytest.approx(np.mean(defined)) if defined else None)
    assert row["flow_epe"] is None and row["landmark_nme"] is None  # the model predicts neither
    assert "failed, not pooled: fold synthetic/s03: TypeError" in row["notes"]
    write_outputs(pd.DataFrame([{**row, "coverage": "18/24"}]), tmp_path,
                  {"collection": "megc2019", "samples": 24, "subjects": 4, "per_dataset": {}, "apex_crops": False,
                   "au_coded": {}, "git_commit": "x", "torch": "x", "cuda": False, "host": "h", "cpu": "c"})
    table = pd.read_csv(tmp_path / "results.csv", keep_default_na=False)
    assert table.loc[0, "flow_epe"] == "" and table.loc[0, "landmark_nme"] == ""
    assert f"{len(predictions)} / 3 (3/4 folds)" in (tmp_path / "results.md").read_text()


@pytest.mark.usefixtures("local_ray")
def test_a_failed_fold_task_is_one_line_per_fold_and_the_other_folds_are_kept(tmp_path: Path) -> None:
    """A fold task that raises (here the TypeError that killed the main system's run): its folds not stored yet fail
    with the task's own exception in one line naming each fold (not Ray's traceback), recorded beside the fold
    storage for the driver; a fold it had stored is kept."""
    import ray

    from mer.pipelines.engine.callbacks import failed_folds
    from mer.pipelines.engine.storage import FoldStorage
    from mer.pipelines.engine.tasks import FoldFailure, FoldJob
    from mer.pipelines.engine.trial import group_outcomes

    storage = str(tmp_path / "folds")
    jobs = [FoldJob(key=f"k{i}", fold=Fold(f"s{i}", ("a",), (f"s{i}",)), model={}, train={}, leaky=False,
                    cache_dir="", storage=storage) for i in range(3)]
    done = FoldResult(fold="s0", predictions=pd.DataFrame({"label": [0]}), history=[], selected_epoch=1,
                      val_score=None, protocol="fixed", leaky=False, wall_time=1.0, device="cpu")
    FoldStorage(storage).save(done.summary("k0", False, "loso"), done.predictions)

    @ray.remote(max_retries=0)
    def failing() -> None:
        raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'NoneType'")

    outcomes = group_outcomes(jobs, failing.remote())
    assert not isinstance(outcomes[0], FoldFailure) and outcomes[0].fold == "s0"
    assert [o.error for o in outcomes[1:]] == [  # type: ignore[union-attr]
        f"fold s{i}: TypeError: unsupported operand type(s) for +: 'NoneType' and 'NoneType'" for i in (1, 2)]
    assert [f["fold"] for f in failed_folds(storage, [j.key for j in jobs])] == ["s1", "s2"]
