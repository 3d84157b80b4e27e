"""The LOSO driver end to end on a tiny synthetic set: MLflow hierarchy, honest search objective, registry, leaky tags.

The tiny set (4 subjects x 3 clips, cheap preprocessing settings) is built once per session by the real stages
(`synthesize`, `ingest`, `preprocess`); the other end-to-end tests reuse it. The `oracle` protocol's leaky tags are
checked on the run the Kubeflow tune step submits as a Ray job (test_kfp_pipeline.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import mlflow_client, runs_by_kind, tiny_data, tiny_params


@pytest.mark.slow
def test_search_evaluate_register_logs_the_run_hierarchy(tiny_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mer.components.evaluate import write_metrics_and_report
    from mer.components.register import register_final_model
    from mer.components.settings import load_params
    from mer.components.tracking import OPERATIONAL
    from mer.pipelines.engine.driver import run_tune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(tiny_params(tmp_path, tiny_data(tmp_path), **{
        "tune.num_samples": 2, "tune.search_space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "tune.final_model": True}))
    summary = run_tune(params)
    assert summary.protocol == "fixed" and summary.leaky is False and summary.folds == 4
    assert set(summary.chosen) == {"train.lr"}
    # summary.json alone says how the numbers were made: the folds' train section (the chosen lr applied) and the
    # search.
    assert summary.train["lr"] == pytest.approx(summary.chosen["train.lr"]) and summary.train["protocol"] == "fixed"
    assert summary.train["epochs"] == params.train.epochs and summary.train["ema_decay"] == params.train.ema_decay
    assert summary.search["num_samples"] == 2 and set(summary.search["search_space"]) == {"train.lr"}
    assert summary.search["search_space"]["train.lr"] == {"type": "loguniform", "low": 1e-4, "high": 1e-2}

    runs = runs_by_kind(tmp_path)
    (parent,) = runs["parent"]
    assert parent.data.metrics["search_objective"] == pytest.approx(summary.search["best_inner_score"])
    trials = {r.info.run_id: r for r in runs["trial"]}
    assert len(trials) == 3  # two search trials + the evaluation of the chosen config
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials.values())
    assert all(r.data.tags["mlflow.parentRunId"] in trials for r in runs["fold"])
    assert all(r.info.status == "FINISHED" for kind in runs.values() for r in kind)

    # Parent: named with its settings hash (the experiment key's), resolved config, data version, git commit; pooled
    # metrics; evaluation artifacts.
    assert parent.info.run_name.endswith(f"[{parent.data.tags['mer.experiment_key'][-12:-4]}]"), parent.info.run_name
    assert parent.info.run_name.count("fixed") == 1, parent.info.run_name  # the experiment name already says it
    assert parent.data.params["model.name"] == "ststnet"
    assert parent.data.params["data_version"].startswith(("dvc:", "files:"))
    assert parent.data.params["git_commit"]
    # Only settings that can change the result are logged: nothing of the benchmark's catalogue, the tracker, where
    # Tune keeps its state or how many workers ran (params.yaml's whole tree once made 237 columns, 141 benchmark.*).
    logged = {k for run in (parent, *trials.values(), *runs["fold"]) for k in run.data.params}
    assert not {k for k in logged if k.startswith(("benchmark.", "tracking.", "tune.storage_path", "tune.results",
                                                   "tune.max_concurrent", "tune.fold_", "evaluate.report",
                                                   "preprocess.num_workers", "train.num_workers"))}
    assert {"train.lr", "train.seed", "data.class_set", "preprocess.flow.tau", "tune.search_space.train.lr.high",
            "evaluate.intervals.resamples"} <= logged, sorted(logged)
    assert not logged & OPERATIONAL and {"train.protocol", "train.split"} <= logged  # mer.components.tracking
    assert parent.data.tags["protocol"] == "fixed" and parent.data.tags["leaky"] == "false"
    assert parent.data.metrics["uf1"] == pytest.approx(summary.metrics["uf1"])
    client, _ = mlflow_client(tmp_path)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "confusion_matrix.png", "per_subject.csv", "predictions.csv"} <= artifacts

    # Search trials: objective = mean INNER validation score of their folds (protocol inner), never test metrics.
    search = [r for r in trials.values() if r.data.tags["phase"] == "search"]
    assert len(search) == 2
    for trial in search:
        folds = [r for r in runs["fold"] if r.data.tags["mlflow.parentRunId"] == trial.info.run_id]
        assert len(folds) == 2 and all(r.data.tags["protocol"] == "inner" for r in folds)
        assert all(r.data.params["fold.val_subjects"] for r in folds)
        mean_val = sum(r.data.metrics["val_score"] for r in folds) / len(folds)
        assert trial.data.metrics["objective"] == pytest.approx(mean_val)
        history = client.get_metric_history(folds[0].info.run_id, "train_loss")
        assert sorted(m.step for m in history) == [1, 2]  # per-epoch metrics
    # Fold runs are created after their fold finished, yet carry the fold's real start and end (its training time).
    for fold in runs["fold"]:
        duration_s = (fold.info.end_time - fold.info.start_time) / 1000
        assert duration_s == pytest.approx(fold.data.metrics["wall_time_s"], abs=0.01), fold.info.run_name

    (chosen,) = [r for r in trials.values() if r.data.tags["phase"] == "evaluate"]
    chosen_folds = [r for r in runs["fold"] if r.data.tags["mlflow.parentRunId"] == chosen.info.run_id]
    assert len(chosen_folds) == 4
    assert float(chosen.data.params["train.lr"]) == pytest.approx(summary.chosen["train.lr"])

    info = register_final_model(params)
    assert info["version"] == 1 and info["run_id"] == parent.info.run_id
    assert register_final_model(params)["version"] == 1  # idempotent
    version = client.get_model_version(params.tracking.registered_model, "1")
    assert version.tags["leaky"] == "false"
    # The registered final model is the servable pyfunc, and `mer predict` loads it as such.
    import mlflow.data
    from mlflow.models import get_model_info

    from mer.components.tracking.pyfunc import load_for_inference

    registered = f"models:/{params.tracking.registered_model}/1"
    flavors = get_model_info(registered).flavors
    assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "pytorch" not in flavors
    loaded = load_for_inference(registered, params)
    assert loaded.source == "mlflow pyfunc" and loaded.class_names == summary.class_names and not loaded.leaky
    # What the MLflow UI shows: a model-training experiment (not the GenAI traces overview), the run's dataset with
    # its DVC data version, its source, a model with an input example, and the champion alias on the honest model.
    assert client.get_experiment_by_name("mer").tags["mlflow.experimentKind"] == "custom_model_development"
    (data_input,) = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert data_input.dataset.name == params.data.source
    assert data_input.dataset.digest in parent.data.params["data_version"]
    source = mlflow.data.get_source(data_input)  # a source type MLflow resolves, pointing at the cache
    assert Path(source.uri) == Path(params.preprocess.out).resolve()
    assert json.loads(data_input.dataset.profile)["data_version"] == parent.data.params["data_version"]
    assert parent.data.tags["mlflow.source.name"] and parent.data.tags["mlflow.source.git.commit"]
    assert get_model_info(registered).saved_input_example_info is not None
    assert str(client.get_model_version_by_alias(params.tracking.registered_model, "champion").version) == "1"

    metrics = write_metrics_and_report(params)
    written = json.loads(Path(params.evaluate.metrics).read_text())
    assert written["uf1"] == pytest.approx(summary.metrics["uf1"]) == pytest.approx(metrics["uf1"])
    for name in ("confusion.csv", "per_class_recall.csv", "per_subject.csv", "confusion_matrix.png"):
        assert (Path(params.evaluate.plots) / name).is_file()
    # The evaluate stage also writes the experiment report (the function `mer report` runs), with its learning curves.
    report = Path(params.evaluate.report) / summary.experiment
    text = (report / "report.html").read_text()
    assert f"{summary.metrics['uf1']:.4f}" in text and "LEAKY" not in text
    assert (report / "learning_curves.png").is_file()


@pytest.mark.slow
def test_parent_run_names_say_the_protocol_once_and_the_ensemble_size() -> None:
    from mer.pipelines.engine.driver import parent_run_name

    assert parent_run_name("synthetic-ststnet-fixed", "fixed", False, "e889274d99") == \
        "synthetic-ststnet-fixed [e889274d]"
    assert parent_run_name("benchmark-megc2019-a-inner", "inner", True, "e889274d") == \
        "benchmark-megc2019-a-inner (leaky) [e889274d]"
    assert parent_run_name("mine", "oracle", True, "e889274d", ensemble=3) == \
        "mine oracle (leaky) 3-seed ensemble [e889274d]"


def test_a_search_that_chooses_annotated_aus_marks_every_output_leaky(tiny_root: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29, one leak verdict: params.yaml's model is honest (AUs predicted), the search space has annotated AUs
    as input and chooses them. The verdict of the configuration that trained each result marks every output leaky:
    the parent's tags and name (opened before the search), search trials and their folds, the evaluation, stored
    folds, summary.json with its reason, metrics.json, the report, the comparison. A model fed the annotated AUs is
    leaky under an honest protocol too. (Trained as a 2-seed ensemble, whose members' seeds and epochs the fold runs
    record.)"""
    from mer.components.evaluate import write_metrics_and_report
    from mer.components.tracking import make_tracker
    from mer.components.settings import load_params
    from mer.pipelines.engine.driver import run_tune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(tiny_params(tmp_path, tiny_data(tmp_path), **{
        "model.name": "cva_fpf", "model.config": "flow_small", "model.kwargs": {"au_mode": "predicted"},
        "tune.num_samples": 1, "tune.search_space": {"model.kwargs.au_mode": {"type": "choice",
                                                                              "values": ["annotated"]}},
        "train.epochs": 1, "train.ensemble": 2, "tune.final_model": False}))
    summary = run_tune(params)
    assert summary.chosen == {"model.kwargs.au_mode": "annotated"}
    assert summary.protocol == "fixed" and summary.leaky is True
    assert summary.leak_reasons == ["annotated AUs as input"]

    runs = runs_by_kind(tmp_path)
    every = [r for kind in runs.values() for r in kind]
    assert len(runs["parent"]) == 1 and len(runs["trial"]) == 2 and len(runs["fold"]) == 4 + 2
    assert all(r.data.tags["leaky"] == "true" for r in every)
    evaluated = [r for r in every if r.data.tags.get("phase") != "search"]
    assert all(r.data.tags["protocol"] == "fixed" and "(leaky)" in r.info.run_name for r in evaluated)
    assert all("inner (leaky)" in r.info.run_name for r in every if r.data.tags.get("phase") == "search")
    assert "2-seed ensemble" in runs["parent"][0].info.run_name
    # The parent carries the pooled metrics' subject-bootstrap intervals (the MLflow compare view shows them).
    logged = runs["parent"][0].data.metrics
    assert logged["uf1_ci_low"] == pytest.approx(summary.metrics["uf1_ci_low"]) and "accuracy_ci_high" in logged
    eval_folds = [r for r in runs["fold"] if r.data.tags["phase"] == "evaluate"]
    assert all(r.data.params["fold.member_seeds"].startswith(f"{params.train.seed},")
               and r.data.params["fold.member_epochs"] == "1,1" for r in eval_folds)
    assert json.loads((Path(params.tune.results) / "summary.json").read_text())["leaky"] is True
    folds = list(Path(params.tune.storage_path).glob("*/folds/*/result.json"))  # not Tune's own result.json
    assert len(folds) == 6 and all(json.loads(f.read_text())["leaky"] is True for f in folds)
    metrics = write_metrics_and_report(params)
    assert metrics["leaky"] is True and json.loads(Path(params.evaluate.metrics).read_text())["leaky"] is True
    assert metrics["uf1_ci_low"] <= metrics["uf1"] <= metrics["uf1_ci_high"]
    assert {k: metrics[k] for k in summary.metrics} == pytest.approx(summary.metrics)  # one computation, fixed seed
    assert "LEAKY RESULT" in (Path(params.evaluate.report) / summary.experiment / "report.html").read_text()
    assert make_tracker(params.tracking).finished_experiments("mer")["leaky"].tolist() == [True]


def test_fold_progress_counts_folds_and_estimates_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    from mer.pipelines.engine.callbacks import FoldProgress

    caplog.set_level(logging.INFO, logger="mer.pipelines.engine.callbacks")
    progress = FoldProgress("search", 6, interactive=False)
    progress.setup(stop=None, num_samples=1, total_num_samples=1)  # Tune calls it when the phase starts
    progress.on_trial_result(0, [], None, {"objective": 0.5})  # not a fold result: not counted
    for n in range(1, 3):
        progress.on_trial_result(n, [], None, {"fold_key": f"k{n}", "fold": f"s{n}"})
    progress.on_experiment_end([])
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == [
        "search: 0/6 folds done", "search: 1/6 folds done", "search: 2/6 folds done"]  # shown from the start
    assert all("elapsed" in line and "ETA" in line for line in lines[1:])
    assert progress.done == 2


def test_sqlite_uri_is_made_absolute_and_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mer.components.settings import TrackingConfig
    from mer.components.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri(TrackingConfig()) == "http://mlflow:5000"


def test_a_run_logs_what_determines_its_result_and_compares_on_it() -> None:
    """mer.components.tracking: the logged params are the DETERMINING sections less OPERATIONAL (every OPERATIONAL key a
    real setting of those sections, so a renamed key cannot silently be logged again); the comparison of runs uses the
    logged `model.*` / `train.*` less the protocol and split (rows of their own)."""
    from mer.components.settings import Params
    from mer.components.tracking import COMPARED_APART, DETERMINING, OPERATIONAL, flatten, run_params
    from mer.components.tracking.base import comparable_settings

    params = Params()
    every = flatten(params.model_dump(mode="json", by_alias=True))
    determining = {k for k in every if k.startswith(tuple(f"{d}." for d in DETERMINING)) or k in DETERMINING}
    assert (OPERATIONAL | COMPARED_APART) <= determining
    logged = run_params(params.model_copy(update={"data": params.data.model_copy(update={"source": "casme2"})}))
    assert set(logged) == determining - OPERATIONAL
    compared = comparable_settings(logged)
    assert set(compared) == {k for k in logged if k.startswith(("model.", "train."))} - COMPARED_APART


def test_params_never_carry_credentials() -> None:
    from mer.components.tracking import flatten

    flat = flatten({"tracking": {"uri": "postgresql://mer:hunter2@db:5432/mlflow"},
                    "s3": {"secret_access_key": "abc", "endpoint": "http://minio:9000"}})
    assert flat == {"tracking.uri": "postgresql://***@db:5432/mlflow", "s3.endpoint": "http://minio:9000"}
    assert "hunter2" not in json.dumps(flat)


@pytest.mark.slow
def test_leave_one_dataset_out_through_mer_tune_without_a_tracker(tiny_root: Path, tmp_path: Path) -> None:
    """`mer tune` with train.split=lodo on the tiny two-dataset set, tracking.backend none: one fold per source
    dataset, inner validation subjects drawn from the training dataset only, results per held-out dataset, and
    evaluate + report working from tune.results alone (no tracking store exists)."""
    from mer.components.evaluate import write_metrics_and_report
    from mer.components.settings import load_params
    from mer.model.training.results import read_results
    from mer.pipelines.cli import main

    path = tiny_params(tmp_path, tiny_data(tmp_path), **{"train.split": "lodo", "train.protocol": "inner",
                                                         "tracking.backend": "none"})
    assert main(["tune", "--params", str(path)]) == 0
    params = load_params(path)
    results = read_results(params.tune.results)
    summary = results.summary
    assert summary.split == "lodo" and summary.leaky is False and summary.folds == 2
    assert summary.parent_run_id is None and summary.model_uri is None  # nothing tracked, no model stored
    assert sorted(f.fold for f in results.folds) == ["synthetic1", "synthetic2"]
    for fold in results.folds:
        assert {s.split("/")[0] for s in fold.test_subjects} == {fold.fold}
        assert fold.val_subjects and {s.split("/")[0] for s in fold.train_subjects + fold.val_subjects} == (
            {"synthetic1", "synthetic2"} - {fold.fold})
    assert {"synthetic1/uf1", "synthetic2/uf1"} <= set(summary.metrics)  # reported per held-out dataset
    assert not (tmp_path / "mlflow.db").exists()
    metrics = write_metrics_and_report(params)
    assert metrics["split"] == "lodo" and metrics["synthetic1/n"] + metrics["synthetic2/n"] == metrics["n"] == 12
    assert (Path(params.evaluate.report) / summary.experiment / "learning_curves.png").is_file()



def test_tune_callbacks_pickle_with_their_tracker_and_reconnect(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The callbacks go into RunConfig and so into Tune's pickled experiment state, which Tuner.restore reads back:
    they must pickle after the tracker connected, and the copy must reach the same store."""
    import pickle

    from mer.components.settings import TrackingConfig
    from mer.components.tracking.mlflow_tracker import MlflowTracker
    from mer.pipelines.engine.callbacks import FoldProgress, RunInfo, TrackingCallback
    from mer.pipelines.engine.trial import TrialContext

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # another test's mlflow.set_tracking_uri sets it
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "test", "unknown")
    tracker.check()
    run, _ = tracker.open_run("k", "parent", {})
    ctx = TrialContext(phase="evaluate", params={}, protocol="fixed", folds=[], cache_dir="", storage="",
                       data_version="", fold_cpus=1, fold_gpus=0, max_retries=0)
    progress = FoldProgress("evaluate", 3, interactive=False)
    progress.on_trial_result(0, [], None, {"fold_key": "a", "fold": "s1"})
    callback, restored_progress = pickle.loads(pickle.dumps([TrackingCallback(tracker, RunInfo("k", run), ctx),
                                                             progress]))
    assert restored_progress.done == 0 and restored_progress.bar is None  # counts again from the restored state
    assert callback.tracker.experiment_id == tracker.experiment_id
    assert callback.tracker.get_tag(run, "mer.key") == "k"
    tracker.end_run(run)


def test_flip_tta_without_augmentation_is_warned_about() -> None:
    from mer.components.settings import parse_params
    from mer.pipelines.engine.preflight import setting_warnings

    def warnings(**train: object) -> list[str]:
        return setting_warnings(parse_params({"train": train}))

    [line] = warnings(tta="flip", augment=False)
    assert line.startswith("train.tta: flip with train.augment false")
    assert warnings(tta="flip", augment=True) == [] and warnings(tta="none", augment=False) == []


@pytest.mark.slow
def test_a_failed_fold_is_named_counted_and_never_pooled(tiny_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """One sample of a copy of the tiny cache holds an extreme flow value (3e37, finite): the fold testing on it
    gets NaN probabilities. Before, such folds were stored FINISHED and pooled. Now that fold's run ends FAILED
    with its reason, summary.json counts it under failed_folds, the pooled predictions hold only the other folds',
    and the run completes."""
    import shutil

    import numpy as np
    import pandas as pd
    from test_failures import _poison_entry

    from mer.components.settings import load_params
    from mer.model.training.data import SampleStore
    from mer.pipelines.engine.driver import run_tune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cache = shutil.copytree(tiny_data(tmp_path) / "preprocessed", tmp_path / "cache")
    store = SampleStore.open(cache)
    sid, subject = store.index.iloc[0][["sample_id", "subject"]]
    flow = store.arrays(sid, ("flow28",))["flow28"].copy()
    flow[0, 14, 14] = 3e37
    _poison_entry(cache, sid, "flow28", {"flow28": flow})
    params = load_params(tiny_params(tmp_path, tiny_data(tmp_path), **{
        "preprocess.out": str(cache), "train.epochs": 1, "tune.final_model": False}))
    summary = run_tune(params)
    error = f"fold {subject}: outputs became non-finite on the test set (epoch 1) (1 of 3 samples)"
    assert summary.folds == 3 and summary.failed_folds == [{"fold": subject, "error": error}]
    written = json.loads((Path(params.tune.results) / "summary.json").read_text())
    assert written["failed_folds"] == summary.failed_folds and written["folds"] == 3
    predictions = pd.read_csv(Path(params.tune.results) / "predictions.csv")
    assert subject not in set(predictions["subject"]) and len(predictions) == 9
    assert np.isfinite(predictions.filter(like="prob_").to_numpy()).all()
    runs = runs_by_kind(tmp_path)
    status = {r.data.tags["fold"]: r.info.status for r in runs["fold"]}
    assert status.pop(subject) == "FAILED" and set(status.values()) == {"FINISHED"} and len(status) == 3
    [failed] = [r for r in runs["fold"] if r.info.status == "FAILED"]
    assert failed.data.tags["error"] == error
    (parent,) = runs["parent"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_folds"] == 1


def test_a_long_fold_logs_epoch_progress_at_a_bounded_rate(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Inside a fold (a Ray worker, forwarded to the driver's console): "fold X: epoch e/E" at most every
    EPOCH_PROGRESS_S seconds, so a long fold is not silent and a short one adds no line."""
    from mer.model.training.folds import Fold
    from mer.pipelines.engine import tasks

    clock = iter([0.0, 10.0, 31.0, 40.0, 62.0])  # the logger's start, then one reading per epoch
    monkeypatch.setattr(tasks.time, "monotonic", lambda: next(clock))
    job = tasks.FoldJob(key="k", fold=Fold("sub01", ("sub02",), ("sub01",)), model={}, train={"epochs": 4},
                        leaky=False, cache_dir="", storage="")
    caplog.set_level(logging.INFO, logger="mer.pipelines.engine.tasks")
    on_epoch = tasks._epoch_logger(job, None, None)  # noqa: SLF001 - no storage: no checkpoint to push
    for epoch in range(1, 5):
        on_epoch(epoch, {"epoch": epoch, "train_loss": 1.0 / epoch})
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == ["fold sub01: epoch 2/4, train_loss 0.5, 00:31 elapsed",
                     "fold sub01: epoch 4/4, train_loss 0.25, 01:02 elapsed"], lines
