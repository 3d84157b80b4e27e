"""The report of one experiment (one model x dataset x protocol): metrics, confusion matrices, per-subject and
per-dataset results, learning curves, as `report.html` plus the PNGs beside it.

Every number is recomputed from the pooled LOSO predictions with `pooled_metrics`, the same function the evaluate
stage uses, so the report cannot disagree with metrics.json.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mer.model.io import atomic_write, write_csv
from mer.model.reporting import html, plots
from mer.model.config import IntervalConfig
from mer.model.training.metrics import LABELS, SCALARS, pooled_metrics
from mer.model.training.repeats import SPREAD_METRICS
from mer.model.training.stats import INTERVAL_METRICS, metric_intervals

log = logging.getLogger(__name__)

LEAKY_TEXT = ("LEAKY RESULT: test labels influenced these numbers (oracle epoch selection on the test subject, or "
              "the dataset's annotated AUs as a model input). They are an upper bound, not an estimate of "
              "performance on unseen subjects.")


def _scores_table(pooled: Mapping[str, Any], bounds: Mapping[str, float]) -> pd.DataFrame:
    """Scores pooled and per dataset; with `bounds` (stats.metric_intervals) a 95% CI column after each metric that
    has one."""
    scopes = [("pooled (all folds)", "", pooled["overall"])]
    if len(pooled["per_dataset"]) > 1:
        scopes += [(name, f"{name}/", values) for name, values in pooled["per_dataset"].items()]
    rows = []
    for name, prefix, values in scopes:
        row: dict[str, Any] = {"set": name}
        for k in SCALARS:
            row[LABELS[k]] = values[k]
            if bounds and k in INTERVAL_METRICS:
                low, high = bounds.get(f"{prefix}{k}_ci_low"), bounds.get(f"{prefix}{k}_ci_high")
                known = low is not None and high is not None
                row[f"{LABELS[k]} 95% CI"] = f"[{low:.3f}, {high:.3f}]" if known else None
        rows.append(row)
    return pd.DataFrame(rows)


def _repeats_table(metrics: Mapping[str, Any]) -> pd.DataFrame | None:
    """With `tune.repeats` > 1 (repeats.spread_columns in `metrics`): per metric, the mean and sd over the repeats'
    seeds (the scores above are the first repeat's, the single run); None for a single run."""
    if int(metrics.get("repeats", 1) or 1) < 2:
        return None
    rows = [{"metric": LABELS[k], "mean over repeats": metrics.get(f"{k}_repeat_mean"),
             "sd over repeats": metrics.get(f"{k}_repeat_sd")} for k in SPREAD_METRICS]
    return pd.DataFrame(rows)


def _details(metrics: Mapping[str, Any], computed: pd.DataFrame) -> pd.DataFrame:
    """Entries of the caller's metrics that the scores table does not already show (protocol, experiment, ...)."""
    shown = {f"{p}{k}{suffix}" for p in ("", *(f"{d}/" for d in computed["set"])) for k in SCALARS
             for suffix in ("", "_ci_low", "_ci_high")}
    shown |= {"repeats", *(f"{k}_repeat_{stat}" for k in SPREAD_METRICS for stat in ("mean", "sd"))}
    rows = [{"key": k, "value": v} for k, v in metrics.items()
            if k not in shown and not isinstance(v, (Mapping, list, tuple))]
    return pd.DataFrame(rows, columns=["key", "value"])


def write_experiment_report(predictions: pd.DataFrame, history: pd.DataFrame | None, metrics: Mapping[str, Any],
                            class_names: Sequence[str], out_dir: str | Path, leaky: bool, title: str = "",
                            intervals: IntervalConfig | None = None) -> Path:
    """Write `out_dir/report.html` and its PNGs; returns the HTML path.

    `predictions`: pooled test predictions (sample_id, subject, dataset, fold, label, pred, ...); `history`: one row
    per fold and epoch (`fold`, `epoch`, `train_loss`, `val_*`/`test_*`), or None; `metrics`: the run's metrics
    and descriptors (protocol, experiment, ...), shown where not recomputed here; `intervals`: the subject-bootstrap
    intervals to show beside UF1, UAR and accuracy (recomputed like the numbers; None = none)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    pooled = pooled_metrics(predictions, names)
    title = title or str(metrics.get("experiment", "experiment report"))
    scores = _scores_table(pooled, metric_intervals(predictions, names, intervals) if intervals else {})
    sections = []
    if leaky:
        sections.append(f'<p class="banner">{html.escape(LEAKY_TEXT)}</p>')
    sections += ["<h2>Metrics</h2>", html.table(scores, leaky_rows=[leaky] * len(scores)),
                 '<p class="note">UF1 = macro F1 over classes, UAR = mean per-class recall, on test predictions '
                 "pooled over all evaluation folds (the split is named under Run); 95% CI: percentile interval of a "
                 "bootstrap over subjects (subjects resampled with replacement, the pooled metric recomputed).</p>"]
    repeats = _repeats_table(metrics)
    if repeats is not None:
        sections += [f"<h3>Seed repeats ({int(metrics['repeats'])} runs)</h3>", html.table(repeats),
                     '<p class="note">The same configuration trained again with other seeds (tune.repeats), every '
                     "fold of every repeat as independent Ray work: the run-to-run spread. The scores and intervals "
                     "above are the first repeat's.</p>"]
    recall = pooled["overall"]["per_class_recall"]
    sections += ["<h3>Recall per class</h3>",
                 html.table(pd.DataFrame([{"class": c, "recall": recall[c],
                                           "samples": int((predictions["label"] == i).sum())}
                                          for i, c in enumerate(names)]))]
    details = _details(metrics, scores)
    if not details.empty:
        sections += ["<h3>Run</h3>", html.table(details)]

    sections.append("<h2>Confusion matrices</h2>")
    plots.confusion_matrix(pooled["overall"]["confusion"], names, out / "confusion.png",
                           f"{title}: all folds" if title else "", leaky)
    sections.append(html.figure("confusion.png", "pooled confusion matrix"))
    if len(pooled["per_dataset"]) > 1:
        for dataset, values in pooled["per_dataset"].items():
            file = f"confusion_{dataset}.png"
            plots.confusion_matrix(values["confusion"], names, out / file, f"{dataset}", leaky)
            sections.append(html.figure(file, f"confusion matrix {dataset}"))
        sections.append("<h2>Per-dataset breakdown</h2>")
        plots.per_dataset_bars(pooled["per_dataset"], out / "per_dataset.png", leaky=leaky)
        sections.append(html.figure("per_dataset.png", "per-dataset scores"))

    sections.append("<h2>Per-subject results</h2>")
    plots.per_subject_bars(pooled["per_subject"], out / "per_subject.png", leaky=leaky)
    sections.append(html.figure("per_subject.png", "per-subject accuracy"))
    subject_table = pd.DataFrame([{"subject": s, **{k: v[k] for k in SCALARS}}
                                  for s, v in sorted(pooled["per_subject"].items())])
    write_csv(out / "per_subject.csv", subject_table)
    sections.append('<p class="note">Per-subject values: per_subject.csv (a subject\'s UF1 over few samples is '
                    "noisy; the pooled numbers above are the ones to compare).</p>")

    sections.append("<h2>Learning curves</h2>")
    if history is not None and not history.empty and "epoch" in history:
        plots.learning_curves(history, out / "learning_curves.png", leaky=leaky)
        sections.append(html.figure("learning_curves.png", "learning curves"))
    else:
        sections.append('<p class="note">No training history was available for this run.</p>')

    path = out / "report.html"
    atomic_write(path, html.page(title, sections))
    log.info("report: %s", path)
    return path
