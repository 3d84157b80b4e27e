"""Reports: the per-experiment HTML (numbers = pooled_metrics, figures present and readable, leaky banner), the
comparison table (latest run wins, leaky rows marked), and the real `mer report` CLI against an MLflow store laid out
the way the LOSO driver writes it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import CliResult
from mer.model.reporting import comparison_table, write_comparison_report, write_experiment_report
from mer.model.training.metrics import pooled_metrics

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["negative", "positive", "surprise"]


def _predictions(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, subjects in (("casme2", 5), ("smic", 4)):
        for s in range(1, subjects + 1):
            subject = f"{dataset}/s{s}"
            for c in range(4):
                label = int(rng.integers(0, 3))
                pred = label if rng.random() < 0.6 else int(rng.integers(0, 3))
                rows.append({"sample_id": f"{subject}/{c}", "subject": subject, "dataset": dataset, "fold": subject,
                             "label": label, "pred": pred})
    return pd.DataFrame(rows)


def _history(folds: int = 3, epochs: int = 4) -> pd.DataFrame:
    return pd.DataFrame([{"fold": f"f{f}", "epoch": e, "train_loss": 1.0 / e + 0.01 * f, "val_loss": 1.2 / e,
                          "val_uf1": 0.2 + 0.1 * e} for f in range(folds) for e in range(1, epochs + 1)])


def test_experiment_report_numbers_and_figures(tmp_path: Path) -> None:
    predictions = _predictions()
    path = write_experiment_report(predictions, _history(), {"experiment": "megc2019-htnet-inner",
                                                             "protocol": "inner"}, CLASSES, tmp_path, leaky=False)
    text = path.read_text()
    overall = pooled_metrics(predictions, CLASSES)["overall"]
    assert f"{overall['uf1']:.4f}" in text and f"{overall['uar']:.4f}" in text
    for figure in ("confusion.png", "confusion_casme2.png", "confusion_smic.png", "per_dataset.png",
                   "per_subject.png", "learning_curves.png"):
        image = cv2.imread(str(tmp_path / figure))
        assert image is not None and min(image.shape[:2]) > 200, figure
        assert f'src="{figure}"' in text
    assert all(name in text for name in CLASSES)
    assert "LEAKY" not in text and "protocol" in text and "inner" in text
    assert pd.read_csv(tmp_path / "per_subject.csv")["subject"].nunique() == 9


def test_leaky_report_is_flagged_and_missing_history_is_said(tmp_path: Path) -> None:
    predictions = _predictions()[lambda d: d["dataset"] == "casme2"]
    path = write_experiment_report(predictions, None, {}, CLASSES, tmp_path, leaky=True, title="oracle run")
    text = path.read_text()
    assert "LEAKY RESULT" in text and 'class="leaky"' in text
    assert "No training history" in text and not (tmp_path / "per_dataset.png").exists()


def _runs() -> pd.DataFrame:
    return pd.DataFrame([
        {"model": "htnet", "dataset": "megc2019", "protocol": "oracle", "leaky": True, "start_time": 1,
         "uf1": 0.86, "uar": 0.85, "casme2/uf1": 0.95, "casme2/uar": 0.95, "smic/uf1": 0.80, "smic/uar": 0.79},
        {"model": "htnet", "dataset": "megc2019", "protocol": "inner", "leaky": False, "start_time": 1,
         "uf1": 0.50, "uar": 0.49},
        {"model": "htnet", "dataset": "megc2019", "protocol": "inner", "leaky": False, "start_time": 5,
         "uf1": 0.61, "uar": 0.60, "casme2/uf1": 0.7, "casme2/uar": 0.69, "smic/uf1": 0.55, "smic/uar": 0.54},
        {"model": "cva_fpf", "dataset": "megc2019", "protocol": "fixed", "leaky": True, "start_time": 2,
         "uf1": 0.9, "uar": 0.9},
    ])


def test_comparison_table_latest_run_and_leaky_rows(tmp_path: Path) -> None:
    table = comparison_table(_runs())
    honest = table[~table["leaky"]]
    assert honest[["model", "protocol"]].values.tolist() == [["htnet", "inner"]]
    assert honest["UF1"].item() == 0.61 and honest["smic UAR"].item() == 0.54 and honest["runs"].item() == 2
    assert table["leaky"].tolist() == [False, True, True]  # honest rows first
    html = write_comparison_report(table, tmp_path, "comparison").read_text()
    assert html.count('<tr class="leaky">') == 2 and "htnet†" in html and "cva_fpf†" in html
    assert pd.read_csv(tmp_path / "compare.csv").shape[0] == 3


def _run(run_id: str, split: str, start: int, lr: str = "0.001", data: str = "files:abc", **metrics: float) -> dict:
    return {"run_id": run_id, "model": "ststnet", "dataset": "synthetic", "protocol": "fixed", "leaky": False,
            "start_time": start, "split": split, "data_version": data,
            "settings": {"model.name": "ststnet", "model.config": "small", "train.lr": lr, "train.epochs": "2"},
            "uf1": 0.5, "uar": 0.5, **metrics}


def test_comparison_never_merges_unlike_runs_and_says_what_differs(tmp_path: Path) -> None:
    """Issue 31: a LOSO and a subject_5fold run of one model, another learning rate, another data version: four
    rows (only a repeat of identical settings is merged, the latest winning), each saying what sets it apart."""
    runs = pd.DataFrame([
        _run("loso1", "loso", 1, uf1=0.40), _run("loso2", "loso", 2, uf1=0.55, uf1_ci_low=0.41, uf1_ci_high=0.68),
        _run("fold5", "subject_5fold", 3, uf1=0.52), _run("lr", "loso", 4, lr="0.01", uf1=0.3),
        _run("data", "loso", 5, data="files:def", uf1=0.6),
    ])
    table = comparison_table(runs).set_index("run_id")
    assert sorted(table.index) == ["data", "fold5", "loso2", "lr"]
    assert table.loc["loso2", "runs"] == 2 and table.loc["loso2", "UF1"] == 0.55
    assert table.loc["loso2", "UF1 95% CI"] == "[0.410, 0.680]"
    assert table.loc["fold5", "split"] == "subject_5fold" and "split=subject_5fold" in table.loc["fold5", "differs"]
    assert "train.lr=0.01" in table.loc["lr", "differs"] and "train.lr=0.001" in table.loc["loso2", "differs"]
    assert "data_version=files:def" in table.loc["data", "differs"]
    assert table.loc["lr", "settings"] != table.loc["loso2", "settings"] == table.loc["fold5", "settings"]


def test_paired_comparison_of_a_loso_and_a_5fold_run_and_refusal_of_other_samples(tmp_path: Path) -> None:
    from mer.model.config import IntervalConfig
    from mer.model.errors import DataError
    from mer.model.reporting import paired_table

    cfg = IntervalConfig(resamples=300)
    loso, fold5 = _predictions(0), _predictions(0)
    fold5["pred"] = np.where(np.arange(len(fold5)) % 4 == 0, (fold5["pred"] + 1) % 3, fold5["pred"])
    runs = pd.DataFrame([_run("loso", "loso", 1), _run("fold5", "subject_5fold", 2)])
    paired = paired_table(runs, {"loso": loso, "fold5": fold5}, cfg)
    (row,) = paired.to_dict("records")
    assert row["run"] == "fold5" and row["reference"] == "loso" and row["differs"] == "split: loso -> subject_5fold"
    assert row["uf1_ci_low"] <= row["uf1_diff"] <= row["uf1_ci_high"] and 0 < row["uf1_p"] <= 1
    assert row["Δ UF1"].startswith(f"{row['uf1_diff']:+.3f} [")
    html = write_comparison_report(comparison_table(runs), tmp_path, "c", paired).read_text()
    assert "Paired differences to run loso" in html and (tmp_path / "compare_paired.csv").is_file()
    other = _predictions(0)[lambda d: d["dataset"] == "casme2"]
    with pytest.raises(DataError, match=r"^not comparable: different samples \(0 only in run other"):
        paired_table(pd.DataFrame([_run("loso", "loso", 1), _run("other", "loso", 2)]),
                     {"loso": loso, "other": other}, cfg)


@pytest.mark.slow
def test_mer_report_cli_single_and_compare(tmp_path: Path, mer: Callable[..., CliResult]) -> None:
    """Tune results (summary, pooled predictions, fold histories) + MLflow parent runs as the driver leaves them ->
    `mer report` (reads only tune.results; attaches the report to the parent run) and `mer report --compare`."""
    from mlflow.tracking import MlflowClient

    from mer.components.tracking import EXPERIMENT_KEY_TAG, KIND_TAG
    from mer.model.training.results import ExperimentSummary, FoldSummary, Results, write_results

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("mer", artifact_location=(tmp_path / "artifacts").as_uri())
    key = "megc2019-htnet-inner-abc"
    parent = client.create_run(experiment_id, tags={KIND_TAG: "parent", EXPERIMENT_KEY_TAG: key, "model": "htnet",
                                                    "dataset": "megc2019", "protocol": "inner", "leaky": "false"})
    for name, value in {"uf1": 0.61, "uar": 0.6, "uf1_ci_low": 0.5, "uf1_ci_high": 0.7}.items():
        client.log_metric(parent.info.run_id, name, value)
    # params.yaml as the parent logs it said annotated AUs, a search chose otherwise: the stored verdict (tag) rules.
    client.log_param(parent.info.run_id, "model.kwargs.au_mode", "annotated")
    client.log_param(parent.info.run_id, "chosen.model.kwargs.au_mode", '"none"')
    oracle = client.create_run(experiment_id, tags={KIND_TAG: "parent", "model": "htnet", "dataset": "megc2019",
                                                    "protocol": "oracle", "leaky": "true"})
    client.log_metric(oracle.info.run_id, "uf1", 0.86)
    # The same model on five subject-grouped folds of the same samples: another row, and a paired comparison.
    fold5 = client.create_run(experiment_id, tags={KIND_TAG: "parent", "model": "htnet", "dataset": "megc2019",
                                                   "protocol": "inner", "leaky": "false", "split": "subject_5fold"})
    client.log_metric(fold5.info.run_id, "uf1", 0.55)
    fold5_predictions = _predictions().assign(pred=lambda d: (d["pred"] + (d.index % 3 == 0)) % 3)
    for run, predictions in ((parent, _predictions()), (fold5, fold5_predictions), (oracle, _predictions(1))):
        (tmp_path / run.info.run_id).mkdir()
        predictions.to_csv(tmp_path / run.info.run_id / "predictions.csv", index=False)
        client.log_artifact(run.info.run_id, str(tmp_path / run.info.run_id / "predictions.csv"))
        client.set_terminated(run.info.run_id)
    folds = [FoldSummary(key=f"k{fold}", fold=str(fold), protocol="inner", leaky=False, selected_epoch=2,
                         val_score=0.4, history=history.drop(columns="fold").to_dict("records"), test_metrics={},
                         class_names=CLASSES, wall_time=1.0, device="cpu")
             for fold, history in _history(folds=2).groupby("fold")]
    results = tmp_path / "results"
    write_results(results, Results(ExperimentSummary(
        experiment="megc2019-htnet-inner", experiment_key=key, protocol="inner", leaky=False, class_names=CLASSES,
        metrics={"uf1": 0.61}, parent_run_id=parent.info.run_id, folds=9), _predictions(), folds))
    assert json.loads((results / "summary.json").read_text())["class_names"] == CLASSES  # stored explicitly
    env = {"MLFLOW_TRACKING_URI": uri}
    # Today's params.yaml reads annotated AUs; the honest result is still reported honest (its stored verdict).
    common = ["--params", str(REPO / "params.yaml"), "-S", f"tune.results={results}", "-S", "model.name=cva_fpf",
              "-S", "model.config=flow_small", "-S", "model.kwargs={au_mode: annotated}"]
    single = mer("report", *common, "--out", str(tmp_path / "reports"), cwd=tmp_path, env=env)
    assert single.returncode == 0, single.stderr
    page = (tmp_path / "reports" / "megc2019-htnet-inner" / "report.html").read_text()
    assert 'src="learning_curves.png"' in page and "LEAKY" not in page
    assert "UF1 95% CI" in page  # intervals beside the scores
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/confusion.png", "report/learning_curves.png"} <= logged

    compare = mer("report", "--compare", "--experiment", "mer", *common, "--out", str(tmp_path / "reports"),
                   cwd=tmp_path, env=env)
    assert compare.returncode == 0, compare.stderr
    table = pd.read_csv(tmp_path / "reports" / "compare.csv", keep_default_na=False)
    assert table[["protocol", "split", "leaky"]].values.tolist() == [
        ["inner", "loso", False], ["inner", "subject_5fold", False], ["oracle", "loso", True]]
    assert table["UF1 95% CI"].tolist()[0] == "[0.500, 0.700]"
    assert '<tr class="leaky">' in (tmp_path / "reports" / "compare.html").read_text()

    paired = mer("report", "--compare", "--runs", parent.info.run_id, fold5.info.run_id[:8], *common, "--out",
                 str(tmp_path / "paired"), cwd=tmp_path, env=env)
    assert paired.returncode == 0, paired.stderr
    (row,) = pd.read_csv(tmp_path / "paired" / "compare_paired.csv").to_dict("records")
    assert row["run"] == fold5.info.run_id and row["differs"].startswith("split: loso -> subject_5fold; ")
    assert row["uf1_ci_low"] <= row["uf1_diff"] < 0 and 0 < row["uf1_p"] <= 1
    unlike = mer("report", "--compare", "--runs", parent.info.run_id, oracle.info.run_id, *common, cwd=tmp_path,
                 env=env)
    assert unlike.returncode == 2 and unlike.stderr.strip().splitlines()[-1].startswith(
        "mer report: error: not comparable: ") and "have another label" in unlike.stderr

    missing = mer("report", "--compare", "--experiment", "nope", *common, cwd=tmp_path, env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"mer report: error: --experiment nope: no such MLflow experiment at {uri}")


def test_evaluate_refuses_a_parent_run_missing_from_the_store_before_writing(tmp_path: Path,
                                                                             mer: Callable[..., CliResult]) -> None:
    """tune.results naming a parent run the tracking store does not hold (another tracking.uri, a reset store): one
    line naming the store and the run, exit 2, checked BEFORE anything is written (metrics.json was written first,
    then the report's attachment failed with a traceback)."""
    from mer.model.training.results import ExperimentSummary, Results, write_results

    missing = "f" * 32
    results = write_results(tmp_path / "results", Results(ExperimentSummary(
        experiment="x", experiment_key="x-1", protocol="inner", leaky=False, class_names=CLASSES, metrics={},
        parent_run_id=missing, folds=1), _predictions(), []))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outputs = {"evaluate.metrics": tmp_path / "metrics.json", "evaluate.plots": tmp_path / "plots",
               "evaluate.report": tmp_path / "reports"}
    args = [f"-S{k}={v}" for k, v in {**outputs, "tune.results": results, "tracking.uri": uri}.items()]
    for command in ("evaluate", "report"):
        result = mer(command, "--params", str(REPO / "params.yaml"), *args, cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": ""})
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"mer {command}: error: tracking.uri: {uri}: no run {missing} (the parent run of {results}/summary.json): "
            "point tracking.uri at the store `mer tune` logged to, or run `mer tune` again")
        if command == "evaluate":
            assert not any(path.exists() for path in outputs.values())
    assert not list((tmp_path / "reports").rglob("*.*"))  # `mer report` checked its (empty) output dir first
