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
from mer_model.reporting import comparison_table, write_comparison_report, write_experiment_report
from mer_model.training.metrics import pooled_metrics

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
    assert honest["megc2019 UF1"].item() == 0.61 and honest["megc2019:smic UAR"].item() == 0.54
    assert table["leaky"].tolist() == [False, True, True]  # honest rows first
    html = write_comparison_report(table, tmp_path, "comparison").read_text()
    assert html.count('<tr class="leaky">') == 2 and "htnet†" in html and "cva_fpf†" in html
    assert pd.read_csv(tmp_path / "compare.csv").shape[0] == 3


@pytest.mark.slow
def test_mer_report_cli_single_and_compare(tmp_path: Path, mer: Callable[..., CliResult]) -> None:
    """Tune results (summary, pooled predictions, fold histories) + MLflow parent runs as the driver leaves them ->
    `mer report` (reads only tune.results; attaches the report to the parent run) and `mer report --compare`."""
    from mlflow.tracking import MlflowClient

    from components.tracking import EXPERIMENT_KEY_TAG, KIND_TAG
    from mer_model.training.results import ExperimentSummary, FoldSummary, Results, write_results

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("mer", artifact_location=(tmp_path / "artifacts").as_uri())
    key = "megc2019-htnet-inner-abc"
    parent = client.create_run(experiment_id, tags={KIND_TAG: "parent", EXPERIMENT_KEY_TAG: key, "model": "htnet",
                                                    "dataset": "megc2019", "protocol": "inner", "leaky": "false"})
    for name, value in {"uf1": 0.61, "uar": 0.6}.items():
        client.log_metric(parent.info.run_id, name, value)
    client.set_terminated(parent.info.run_id)
    oracle = client.create_run(experiment_id, tags={KIND_TAG: "parent", "model": "htnet", "dataset": "megc2019",
                                                    "protocol": "oracle", "leaky": "true"})
    client.log_metric(oracle.info.run_id, "uf1", 0.86)
    client.set_terminated(oracle.info.run_id)
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
    common = ["--params", str(REPO / "params.yaml"), "-S", f"tune.results={results}", "-S", "model.name=htnet",
              "-S", "model.config=small"]
    single = mer("report", *common, "--out", str(tmp_path / "reports"), cwd=tmp_path, env=env)
    assert single.returncode == 0, single.stderr
    page = (tmp_path / "reports" / "megc2019-htnet-inner" / "report.html").read_text()
    assert 'src="learning_curves.png"' in page and "LEAKY" not in page
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/confusion.png", "report/learning_curves.png"} <= logged

    compare = mer("report", "--compare", "--experiment", "mer", *common, "--out", str(tmp_path / "reports"),
                   cwd=tmp_path, env=env)
    assert compare.returncode == 0, compare.stderr
    table = pd.read_csv(tmp_path / "reports" / "compare.csv")
    assert table[["protocol", "leaky"]].values.tolist() == [["inner", False], ["oracle", True]]
    assert '<tr class="leaky">' in (tmp_path / "reports" / "compare.html").read_text()

    missing = mer("report", "--compare", "--experiment", "nope", *common, cwd=tmp_path, env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"mer report: error: --experiment nope: no such MLflow experiment at {uri}")
