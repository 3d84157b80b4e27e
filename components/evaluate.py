"""The `evaluate` step: the tune stage's results -> metrics.json and plot files for `dvc metrics` / `dvc plots`, and
the HTML experiment report (`mer report`'s, written by the same function) under `evaluate.report`.

It reads only `tune.results` (mer.model.training.results), so the DVC stage depends on nothing DVC does not track.
The evaluation files come from `mer.model.reporting.artifacts`, the function the engine uses for what it logs to the
tracker, so a number in metrics.json and the same number in the MLflow UI come from one computation. Metric names are
the same for every model (mer.model.training.metrics.METRICS; per dataset `<dataset>/uf1`, ...), each of UF1, UAR
and accuracy with its subject-bootstrap interval (`uf1_ci_low`, `uf1_ci_high`, ...; `evaluate.intervals`, the seed
fixed, so they equal summary.json's and the MLflow parent run's); with `tune.repeats` > 1, the spread over the
repeats' seeds beside them (`repeats`, `uf1_repeat_mean`, `uf1_repeat_sd`, ...; repeats.spread_columns).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mer.components.report import results_report, tracked_run
from mer.components.settings import Params
from mer.model.io import write_json
from mer.model.reporting.artifacts import write_artifacts
from mer.model.training.metrics import flat_metrics
from mer.model.training.protocols import run_label
from mer.model.training.repeats import spread_columns
from mer.model.training.results import read_results

log = logging.getLogger(__name__)


def write_metrics_and_report(params: Params) -> dict[str, Any]:
    """Write metrics.json, the plot files and the HTML report from the tune stage's results; returns the metrics
    written."""
    results = read_results(params.tune.results)
    summary = results.summary
    tracker = tracked_run(params, summary)  # the run the report goes to exists: checked before anything is written
    flat, pooled = flat_metrics(results.predictions, summary.class_names, params.evaluate.intervals)
    metrics = {"protocol": summary.protocol, "split": summary.split, "leaky": summary.leaky, **flat,
               **spread_columns(summary.repeats), "per_class_recall": pooled["overall"]["per_class_recall"]}
    metrics_path = write_json(params.evaluate.metrics, metrics)
    write_artifacts(results.predictions, summary.class_names, Path(params.evaluate.plots),
                    title=f"{summary.experiment}: {run_label(summary.protocol, summary.leaky)}",
                    leaky=summary.leaky, with_predictions=False)
    log.info("%s: UF1 %.4f, UAR %.4f, accuracy %.4f over %d samples (%s)", metrics_path, flat["uf1"], flat["uar"],
             flat["accuracy"], flat["n"], run_label(summary.protocol, summary.leaky))
    log.info("report: %s", results_report(params, results=results, tracker=tracker))
    return metrics
