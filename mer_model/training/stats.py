"""The uncertainty of pooled metrics: subject-bootstrap confidence intervals and paired comparisons of two runs.

Why subjects: LOSO generalises over people, and a subject's samples are not independent of each other (one face, one
session, one coder). Resampling SAMPLES would pretend 442 independent draws where there are 68 subjects and give
intervals far too narrow. So every interval here resamples subjects with replacement and recomputes the POOLED metric
from the predictions of the drawn subjects (a subject drawn twice counts twice), the cluster bootstrap of Field &
Welsh (2007, JRSS B 69(3)); the percentile interval of `scipy.stats.bootstrap`.

Paired comparisons (two runs over the same samples): the difference of a pooled metric with the same subject
bootstrap applied to both runs at once (`scipy.stats.bootstrap`, one resample for both), and a two-sided p-value from
a permutation test that swaps the two runs' predictions subject by subject (`scipy.stats.permutation_test`,
permutation_type='samples': under the null hypothesis that the runs are exchangeable, each subject's pair of
prediction sets may be swapped).

Speed: a pooled metric is a function of the summed confusion matrix, so each subject is reduced once to its (C, C)
confusion matrix and a resample is a sum of those; the metrics are computed for all resamples at once (vectorised),
in the definitions of `metrics.classification_metrics` (UF1 leaves out classes with neither true nor predicted
samples; UAR averages recall over classes with true samples). `benchmarks/stats.py` prints the cost and the stability
of the bounds for the resample count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mer.model.config import IntervalConfig
from mer.model.errors import DataError

INTERVAL_METRICS = ("uf1", "uar", "accuracy")  # metrics that get an interval (weighted F1 is not a field metric)
PAIRED_METRICS = ("uf1", "uar")  # metrics of paired comparisons
NOT_DISTINGUISHABLE = "not distinguishable"
BATCH = 1000  # resamples evaluated at once: (BATCH, subjects, C, C) floats, 30 MB for 68 subjects and 7 classes


def subject_confusions(predictions: pd.DataFrame, num_classes: int) -> tuple[list[str], np.ndarray]:
    """(subjects in sorted order, their confusion matrices (S, C, C) with rows = true class), from predictions with
    `subject`, `label`, `pred`."""
    subjects, codes = np.unique(predictions["subject"].astype(str).to_numpy(), return_inverse=True)
    label = predictions["label"].to_numpy(dtype=int)
    pred = predictions["pred"].to_numpy(dtype=int)
    flat = (codes * num_classes + label) * num_classes + pred
    counts = np.bincount(flat, minlength=len(subjects) * num_classes * num_classes)
    return [str(s) for s in subjects], counts.reshape(len(subjects), num_classes, num_classes).astype(np.float64)


def confusion_scores(confusion: np.ndarray) -> np.ndarray:
    """UF1, UAR and accuracy (in INTERVAL_METRICS order) of confusion matrices (..., C, C): array (3, ...). An
    undefined value (no sample at all) is NaN."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    true = confusion.sum(axis=-1)
    predicted = confusion.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1_den = true + predicted
        f1 = np.where(f1_den > 0, 2 * tp / np.where(f1_den > 0, f1_den, 1), np.nan)
        recall = np.where(true > 0, tp / np.where(true > 0, true, 1), np.nan)
        total = true.sum(axis=-1)
        accuracy = np.where(total > 0, tp.sum(axis=-1) / np.where(total > 0, total, 1), np.nan)
        defined_f1 = (f1_den > 0).sum(axis=-1)
        defined_recall = (true > 0).sum(axis=-1)
        uf1 = np.where(defined_f1 > 0, np.nansum(f1, axis=-1) / np.maximum(defined_f1, 1), np.nan)
        uar = np.where(defined_recall > 0, np.nansum(recall, axis=-1) / np.maximum(defined_recall, 1), np.nan)
    return np.stack([uf1, uar, accuracy])


def _pooled(confusions: np.ndarray) -> Callable[..., np.ndarray]:
    """scipy statistic: subject indices (..., S) -> the pooled scores (3, ...) of those subjects' predictions."""
    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        return confusion_scores(confusions[np.moveaxis(index, axis, -1)].sum(axis=-3))
    return statistic


def _interval(confusions: np.ndarray, statistic: Any, cfg: IntervalConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """Percentile interval of a subject-bootstrap of `statistic` (None with fewer than two subjects)."""
    from scipy.stats import bootstrap  # scipy.stats: on first use

    if len(confusions) < 2:
        return None
    result = bootstrap((np.arange(len(confusions)),), statistic, n_resamples=cfg.resamples, vectorized=True,
                       batch=BATCH, confidence_level=cfg.confidence, method="percentile",
                       rng=np.random.default_rng(cfg.seed))
    return np.asarray(result.confidence_interval.low), np.asarray(result.confidence_interval.high)


def metric_intervals(predictions: pd.DataFrame, class_names: Sequence[str], cfg: IntervalConfig) -> dict[str, float]:
    """Subject-bootstrap intervals of the pooled UF1, UAR and accuracy: {"uf1_ci_low": .., "uf1_ci_high": .., ...},
    plus `<dataset>/<metric>_ci_low|high` (each source dataset's subjects resampled on their own) when the
    predictions mix datasets, as `metrics.flat_metrics` names them. Keys are left out where undefined (one subject)."""
    num_classes = len(class_names)
    scopes: list[tuple[str, pd.DataFrame]] = [("", predictions)]
    if "dataset" in predictions and predictions["dataset"].nunique() > 1:
        scopes += [(f"{d}/", g) for d, g in predictions.groupby("dataset", sort=True)]
    out: dict[str, float] = {}
    for prefix, frame in scopes:
        _, confusions = subject_confusions(frame, num_classes)
        bounds = _interval(confusions, _pooled(confusions), cfg)
        if bounds is None:
            continue
        for i, metric in enumerate(INTERVAL_METRICS):
            if np.isfinite(bounds[0][i]) and np.isfinite(bounds[1][i]):
                out[f"{prefix}{metric}_ci_low"] = float(bounds[0][i])
                out[f"{prefix}{metric}_ci_high"] = float(bounds[1][i])
    return out


def check_same_samples(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str] = ("A", "B")) -> None:
    """DataError in one line naming what differs when two runs' predictions are not over the same samples (sample
    ids, their subjects and their true labels): a paired comparison of such runs would mean nothing."""
    left = a.set_index("sample_id")[["subject", "label"]]
    right = b.set_index("sample_id")[["subject", "label"]]
    for frame, name in ((left, names[0]), (right, names[1])):
        if frame.index.has_duplicates:
            raise DataError(f"not comparable: {name} predicts sample {frame.index[frame.index.duplicated()][0]} "
                            "more than once")
    only_a = left.index.difference(right.index)
    only_b = right.index.difference(left.index)
    if len(only_a) or len(only_b):
        raise DataError(f"not comparable: different samples ({len(only_a)} only in {names[0]}, e.g. "
                        f"{list(only_a[:1]) or '-'}; {len(only_b)} only in {names[1]}, e.g. "
                        f"{list(only_b[:1]) or '-'})")
    right = right.loc[left.index]
    for column in ("subject", "label"):
        differs = left[column].astype(str) != right[column].astype(str)
        if differs.any():
            raise DataError(f"not comparable: {differs.sum()} sample(s) have another {column} in {names[1]} than in "
                            f"{names[0]}, e.g. {left.index[differs.to_numpy()][0]}")


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, class_names: Sequence[str], cfg: IntervalConfig,
                      names: tuple[str, str] = ("A", "B")) -> dict[str, dict[str, float | None]]:
    """A minus B for UF1 and UAR over the same samples: {"uf1": {"diff", "ci_low", "ci_high", "p"}, "uar": ...}.

    `a`, `b`: pooled predictions (sample_id, subject, label, pred) of two runs; DataError naming what differs when
    they are not over the same samples (`check_same_samples`). The interval is the paired subject bootstrap (the same
    resampled subjects for both runs); `p` the two-sided permutation p-value of swapping the runs' predictions within
    subjects (`cfg.resamples` random swaps, scipy's (k + 1) / (n + 1) estimate). Undefined entries are None."""
    from scipy.stats import permutation_test  # scipy.stats: on first use

    check_same_samples(a, b, names)
    num_classes = len(class_names)
    b = b.set_index("sample_id").loc[a["sample_id"]].reset_index()
    _, conf_a = subject_confusions(a, num_classes)
    _, conf_b = subject_confusions(b, num_classes)
    rows = [INTERVAL_METRICS.index(m) for m in PAIRED_METRICS]
    diff = (confusion_scores(conf_a.sum(axis=0)) - confusion_scores(conf_b.sum(axis=0)))[rows]

    def paired(index: np.ndarray, axis: int = -1) -> np.ndarray:
        index = np.moveaxis(index, axis, -1)
        return (confusion_scores(conf_a[index].sum(axis=-3)) - confusion_scores(conf_b[index].sum(axis=-3)))[rows]

    bounds = _interval(conf_a, paired, cfg)
    both = np.concatenate([conf_a, conf_b])
    subjects = len(conf_a)

    def swapped(row: int) -> Callable[..., np.ndarray]:
        def statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
            x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
            return confusion_scores(both[x].sum(axis=-3))[row] - confusion_scores(both[y].sum(axis=-3))[row]
        return statistic

    p = None
    if subjects >= 2:  # scipy's permutation_test takes one statistic at a time
        p = [permutation_test((np.arange(subjects), np.arange(subjects) + subjects), swapped(row),
                              permutation_type="samples", vectorized=True, n_resamples=cfg.resamples, batch=BATCH,
                              alternative="two-sided", rng=np.random.default_rng(cfg.seed)).pvalue
             for row in rows]

    def value(x: Any) -> float | None:
        return float(x) if x is not None and np.isfinite(x) else None

    return {metric: {"diff": value(diff[i]),
                     "ci_low": value(bounds[0][i]) if bounds else None,
                     "ci_high": value(bounds[1][i]) if bounds else None,
                     "p": value(p[i]) if p is not None else None}
            for i, metric in enumerate(PAIRED_METRICS)}


def verdict(low: float | None, high: float | None) -> str:
    """"better" / "worse" when the interval of a difference lies on one side of zero, else NOT_DISTINGUISHABLE."""
    if low is None or high is None or low <= 0 <= high:
        return NOT_DISTINGUISHABLE
    return "better" if low > 0 else "worse"


def paired_columns(result: dict[str, dict[str, float | None]], prefix: str = "diff_") -> dict[str, Any]:
    """A paired_difference result as flat table columns: `diff_uf1`, `diff_uf1_ci_low`, `diff_uf1_ci_high`,
    `diff_uf1_p`, `diff_uf1_verdict` (and the same for UAR)."""
    out: dict[str, Any] = {}
    for metric, values in result.items():
        out[f"{prefix}{metric}"] = values["diff"]
        out[f"{prefix}{metric}_ci_low"] = values["ci_low"]
        out[f"{prefix}{metric}_ci_high"] = values["ci_high"]
        out[f"{prefix}{metric}_p"] = values["p"]
        out[f"{prefix}{metric}_verdict"] = verdict(values["ci_low"], values["ci_high"])
    return out


def format_difference(diff: float | None, low: float | None, high: float | None, p: float | None) -> str:
    """"+0.023 [-0.010, +0.055], p 0.18, not distinguishable" for tables."""
    if diff is None:
        return "–"
    text = f"{diff:+.3f}"
    if low is not None and high is not None:
        text += f" [{low:+.3f}, {high:+.3f}]"
    if p is not None:
        text += f", p {p:.2g}"
    return text + (f", {NOT_DISTINGUISHABLE}" if verdict(low, high) == NOT_DISTINGUISHABLE else "")


def format_interval(value: float | None, low: float | None, high: float | None) -> str:
    """"0.764 [0.701, 0.822]" for tables."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if low is None or high is None or (isinstance(low, float) and np.isnan(low)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"
