"""The evaluation files of one experiment: what `mer evaluate` writes for `dvc metrics` / `dvc plots` and what the
engine logs to the tracker, from ONE computation (`metrics.flat_metrics`), so a number in metrics.json and the same
number in the MLflow UI cannot differ."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mer.model.io import write_csv
from mer.model.reporting import plots
from mer.model.training.metrics import SCALARS, flat_metrics


def write_artifacts(predictions: pd.DataFrame, class_names: Sequence[str], directory: Path, title: str = "",
                    leaky: bool = False, with_predictions: bool = True) -> dict[str, Path]:
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
        write_csv(paths["predictions"], predictions)
    write_csv(paths["per_subject"],
              pd.DataFrame([{"subject": s, **{k: v[k] for k in SCALARS}} for s, v in pooled["per_subject"].items()]))
    write_csv(paths["confusion"], pd.DataFrame({
        "actual": [names[int(i)] for i in predictions["label"]],
        "predicted": [names[int(i)] for i in predictions["pred"]],
    }))
    recall = pooled["overall"]["per_class_recall"]
    write_csv(paths["per_class_recall"], pd.DataFrame({"class": list(recall), "recall": list(recall.values())}))
    plots.confusion_matrix(pooled["overall"]["confusion"], names, paths["confusion_png"], title, leaky)
    return paths
