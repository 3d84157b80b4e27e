"""The `evaluate` step: pooled LOSO predictions -> metrics.json and plot files for `dvc metrics` / `dvc plots`, and
the HTML experiment report (`mer report`'s, written by the same function) under `evaluate.report`.

The same functions produce the evaluation artifacts the LOSO driver logs to MLflow (confusion matrix PNG, per-subject
CSV, predictions CSV), so a number in metrics.json and the same number in the MLflow UI come from one computation.
Metric names are the same for every model: uf1, uar, accuracy, weighted_f1 (per dataset: `<dataset>/uf1`, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from components.common import add_params_arguments, params_from_args
from mer_model.config import Params
from mer_model.errors import DataError

log = logging.getLogger(__name__)

SCALARS = ("uf1", "uar", "accuracy", "weighted_f1", "n")


def flat_metrics(predictions: pd.DataFrame, class_names: Sequence[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """({"uf1": .., "casme2/uf1": .., ...}, the full pooled_metrics result). Per-dataset entries appear only when the
    predictions mix datasets (a composite)."""
    from mer_model.training.metrics import pooled_metrics  # sklearn: imported on use, so `mer --help` stays fast

    pooled = pooled_metrics(predictions, class_names)
    flat = {k: pooled["overall"][k] for k in SCALARS}
    if len(pooled["per_dataset"]) > 1:
        for dataset, values in pooled["per_dataset"].items():
            flat.update({f"{dataset}/{k}": values[k] for k in SCALARS})
    return flat, pooled


def per_subject_table(pooled: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"subject": s, **{k: v[k] for k in SCALARS}} for s, v in pooled["per_subject"].items()]
    )


def write_artifacts(predictions: pd.DataFrame, class_names: Sequence[str], directory: Path, title: str = "",
                    with_predictions: bool = True) -> dict[str, Path]:
    """per_subject.csv, confusion.csv (one row per sample, for the dvc confusion template), per_class_recall.csv,
    confusion_matrix.png and (`with_predictions`) predictions.csv under `directory`; returns them by name."""
    directory.mkdir(parents=True, exist_ok=True)
    _, pooled = flat_metrics(predictions, class_names)
    names = list(class_names)
    paths = {
        "per_subject": directory / "per_subject.csv",
        "confusion": directory / "confusion.csv",
        "per_class_recall": directory / "per_class_recall.csv",
        "confusion_png": directory / "confusion_matrix.png",
    }
    if with_predictions:
        paths["predictions"] = directory / "predictions.csv"
        predictions.to_csv(paths["predictions"], index=False)
    per_subject_table(pooled).to_csv(paths["per_subject"], index=False)
    pd.DataFrame({
        "actual": [names[int(i)] for i in predictions["label"]],
        "predicted": [names[int(i)] for i in predictions["pred"]],
    }).to_csv(paths["confusion"], index=False)
    recall = pooled["overall"]["per_class_recall"]
    pd.DataFrame({"class": list(recall), "recall": list(recall.values())}).to_csv(
        paths["per_class_recall"], index=False)
    _plot_confusion(pooled["overall"]["confusion"], names, paths["confusion_png"], title)
    return paths


def _plot_confusion(matrix: list[list[int]], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.0 + 0.6 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_results(results_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The tune stage's pooled LOSO predictions and summary.json."""
    summary_path = results_dir / "summary.json"
    predictions_path = results_dir / "predictions.csv"
    for path in (summary_path, predictions_path):
        if not path.is_file():
            raise DataError("missing; run `mer tune` first", file=str(path))
    return pd.read_csv(predictions_path, keep_default_na=False), json.loads(summary_path.read_text())


def evaluate(params: Params) -> dict[str, Any]:
    """Write metrics.json, the plot files and the HTML report from the tune stage's results; returns the metrics
    written."""
    from components.report import experiment_report  # report imports this module's loaders

    predictions, summary = load_results(Path(params.tune.results))
    flat, pooled = flat_metrics(predictions, summary["class_names"])
    metrics = {"protocol": summary["protocol"], "leaky": summary["leaky"], **flat,
               "per_class_recall": pooled["overall"]["per_class_recall"]}
    metrics_path = Path(params.evaluate.metrics)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    title = f"{summary['experiment']} ({summary['protocol']}{', leaky' if summary['leaky'] else ''})"
    plots = Path(params.evaluate.plots)
    write_artifacts(predictions, summary["class_names"], plots, title=title, with_predictions=False)
    log.info("%s: UF1 %.4f, UAR %.4f, accuracy %.4f over %d samples (%s)", metrics_path, flat["uf1"], flat["uar"],
             flat["accuracy"], flat["n"], summary["protocol"])
    log.info("report: %s", experiment_report(params))
    return metrics


def _run(args: argparse.Namespace) -> int:
    evaluate(params_from_args(args))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate",
                                   help="pooled LOSO metrics -> metrics.json, plots/ (dvc) and the HTML report")
    add_params_arguments(parser)
    parser.set_defaults(func=_run)
