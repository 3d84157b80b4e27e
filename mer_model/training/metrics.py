"""Evaluation metrics of the MER field, computed the same way everywhere in the platform.

UF1 is the MEGC definition: the unweighted mean over classes of F1_c = 2TP_c / (2TP_c + FP_c + FN_c). A class with no
true and no predicted sample has an undefined F1 (0/0) and is left out of the mean; every other class counts, so a class
the model never predicts scores 0. On predictions pooled over all LOSO folds every class is present in the ground truth,
and UF1 equals scikit-learn's macro F1 with `labels` = all classes. UAR is the mean recall over classes that have true
samples. Metrics are computed on POOLED predictions (not averaged per fold): single-subject folds are too small for
per-fold F1 to mean anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mer.model.config import IntervalConfig
from mer.model.training.stats import metric_intervals

# The metric names of every model, stage and report (metrics.json, MLflow, tables): pooled over the folds.
METRICS = ("uf1", "uar", "accuracy", "weighted_f1")
SCALARS = ("n", *METRICS)  # with the sample count
LABELS = {"uf1": "UF1", "uar": "UAR", "accuracy": "accuracy", "weighted_f1": "weighted F1", "n": "samples"}
# Per-fold figures a fold may not have: an AU F1 where no coded AU occurs on the test subject (or the dataset has no AU
# coding), flow / landmark errors where the model predicts none. Absent (None or missing) is never a zero: every
# aggregation averages the folds that define it (`mean_defined`) and says how many those are.
OPTIONAL_METRICS = ("au_f1", "flow_epe", "landmark_nme")

# 68-point (iBUG/dlib) indices of the two eyes; their centres define the inter-ocular distance.
_EYE_A = slice(36, 42)
_EYE_B = slice(42, 48)


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """UF1, UAR, accuracy, weighted F1, per-class recall (None where a class has no true sample) and the confusion
    matrix (rows = true class, columns = predicted) over `num_classes` classes."""
    from sklearn.metrics import confusion_matrix, f1_score, recall_score  # seconds to import: on first use

    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.shape} entries, y_pred {y_pred.shape}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    labels = list(range(num_classes))
    n = int(y_true.size)
    if n == 0:
        return {"n": 0, "uf1": None, "uar": None, "accuracy": None, "weighted_f1": None,
                "per_class_recall": dict.fromkeys(names), "confusion": [[0] * num_classes for _ in labels]}
    defined = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    present = sorted(set(y_true.tolist()))
    recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "n": n,
        "uf1": float(f1_score(y_true, y_pred, labels=defined, average="macro", zero_division=0)),
        "uar": float(np.mean([recalls[c] for c in present])),
        "accuracy": float(np.mean(y_true == y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "per_class_recall": {names[c]: (float(recalls[c]) if c in present else None) for c in labels},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def pooled_metrics(predictions: pd.DataFrame, class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics on predictions pooled over folds: `overall`, `per_dataset` (by the `dataset` column, which separates the
    sources of a composite) and `per_subject`. `predictions` has at least `label`, `pred`, `dataset`, `subject`."""
    missing = {"label", "pred", "dataset", "subject"} - set(predictions.columns)
    if missing:
        raise ValueError(f"predictions lack columns {sorted(missing)}")
    num_classes = len(class_names)

    def of(frame: pd.DataFrame) -> dict[str, Any]:
        return classification_metrics(frame["label"].to_numpy(), frame["pred"].to_numpy(), num_classes, class_names)

    return {
        "overall": of(predictions),
        "per_dataset": {str(k): of(g) for k, g in predictions.groupby("dataset", sort=True)},
        "per_subject": {str(k): of(g) for k, g in predictions.groupby("subject", sort=True)},
    }


def flat_metrics(predictions: pd.DataFrame, class_names: Sequence[str], intervals: IntervalConfig | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """({"uf1": .., "n": .., "casme2/uf1": .., ...}, the full pooled_metrics result): the numbers every stage logs.
    Per-dataset entries (`<dataset>/<metric>`) appear only when the predictions mix datasets (a composite; under the
    leave-one-dataset-out split, one entry per held-out dataset). With `intervals`, the subject-bootstrap bounds
    of UF1, UAR and accuracy beside them (`uf1_ci_low`, `uf1_ci_high`, `casme2/uf1_ci_low`, ...: stats.py)."""
    pooled = pooled_metrics(predictions, class_names)
    flat = {k: pooled["overall"][k] for k in SCALARS}
    if len(pooled["per_dataset"]) > 1:
        for dataset, values in pooled["per_dataset"].items():
            flat.update({f"{dataset}/{k}": values[k] for k in SCALARS})
    if intervals is not None:
        flat.update(metric_intervals(predictions, class_names, intervals))
    return flat, pooled


def defined(value: Any) -> bool:
    """`value` is a number that exists: not None, not NaN/inf (an optional metric's absence, however written)."""
    if value is None or isinstance(value, bool):
        return False
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def mean_defined(values: Sequence[Any]) -> float | None:
    """Mean of the defined entries of `values` (`defined`), None when there is none: how an optional metric is
    aggregated over ensemble members, folds or runs, never turning an absent value into 0."""
    kept = [float(v) for v in values if defined(v)]
    return float(np.mean(kept)) if kept else None


def au_f1(
    au_true: np.ndarray, au_pred: np.ndarray, au_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """F1 per action unit of a multi-label prediction (both (N, K) 0/1 arrays); `au_f1` is the mean over AUs that
    occur in the ground truth (an AU nobody shows has no meaningful F1)."""
    from sklearn.metrics import f1_score  # seconds to import: on first use

    au_true = np.asarray(au_true).astype(int)
    au_pred = np.asarray(au_pred).astype(int)
    if au_true.shape != au_pred.shape or au_true.ndim != 2:
        raise ValueError(f"AU arrays must both be (N, K); got {au_true.shape} and {au_pred.shape}")
    names = list(au_names) if au_names is not None else [str(k) for k in range(au_true.shape[1])]
    scores = f1_score(au_true, au_pred, average=None, zero_division=0)
    occurring = au_true.sum(axis=0) > 0
    return {
        "au_f1": float(np.mean(scores[occurring])) if occurring.any() else None,
        "per_au_f1": {names[k]: float(scores[k]) for k in range(len(names)) if occurring[k]},
    }


def flow_epe(pred: np.ndarray, target: np.ndarray) -> float:
    """Average end-point error: mean Euclidean distance between predicted and true flow vectors, in the flow's units.
    Arrays (..., 2, H, W) with u, v on axis -3."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim < 3 or pred.shape[-3] != 2:
        raise ValueError(f"flow arrays must both be (..., 2, H, W); got {pred.shape} and {target.shape}")
    return float(np.sqrt(((pred - target) ** 2).sum(axis=-3)).mean())


def landmark_nme(pred: np.ndarray, target: np.ndarray) -> float:
    """Normalised mean error of 68-point landmarks: per face, the mean point-to-point distance divided by the distance
    between the two TRUE eye centres (points 36-41 and 42-47), averaged over faces. Arrays (..., 68, 2)."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.shape[-2:] != (68, 2):
        raise ValueError(f"landmark arrays must both be (..., 68, 2); got {pred.shape} and {target.shape}")
    inter_ocular = np.linalg.norm(target[..., _EYE_A, :].mean(-2) - target[..., _EYE_B, :].mean(-2), axis=-1)
    errors = np.linalg.norm(pred - target, axis=-1).mean(-1)
    return float((errors / np.maximum(inter_ocular, 1e-6)).mean())
