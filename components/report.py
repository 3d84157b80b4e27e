"""`mer report`: the HTML report of the last experiment, or (`--compare`) the table across all experiments.

    mer report                                # tune.results -> <evaluate.report>/<experiment>/report.html
    mer report --compare [--experiment mer]   # finished parent runs of the tracker -> <evaluate.report>/compare.html
    mer report --compare --runs A B [C ...]   # those runs only, each paired with A over the same samples

The experiment report reads only the tune stage's outputs (`tune.results`: pooled predictions, the experiment summary
and every fold's history for the learning curves), writes HTML + PNGs, and attaches them to the experiment's parent
run in the tracker under `report/`. The comparison reads every finished parent run of a tracked experiment (tags
`model`, `dataset`, `protocol`, `split`, the stored `leaky` verdict; the settings that trained it; pooled metrics with
their intervals), one row per set of comparable runs (mer.model.reporting.compare); `--runs` adds paired differences
from the runs' logged predictions.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mer.components.common import check_output_dir
from mer.components.settings import Params
from mer.components.tracking import TRACKERS, Tracker, make_tracker, redact, tracking_uri
from mer.model.errors import ConfigError
from mer.model.reporting import comparison_table, paired_table, write_comparison_report, write_experiment_report
from mer.model.training.protocols import run_label
from mer.model.training.repeats import spread_columns
from mer.model.training.results import ExperimentSummary, Results, read_results

log = logging.getLogger(__name__)


def tracked_run(params: Params, summary: ExperimentSummary) -> Tracker | None:
    """The tracker holding the experiment's parent run, which the report is attached to, or None when untracked;
    checked BEFORE anything is written, so a run missing from the store (another tracking.uri, a reset store) is one
    line and leaves no metrics.json or report behind that the tracker would not have."""
    if not summary.parent_run_id or not TRACKERS[params.tracking.backend].keeps_runs:
        return None
    tracker = make_tracker(params.tracking, "mer report")
    tracker.check()
    if not tracker.run_exists(summary.parent_run_id):
        raise ConfigError(f"tracking.uri: {redact(tracking_uri(params.tracking))}: no run {summary.parent_run_id} "
                          f"(the parent run of {params.tune.results}/summary.json): point tracking.uri at the store "
                          "`mer tune` logged to, or run `mer tune` again")
    return tracker


def results_report(params: Params, out: str | None = None, results: Results | None = None,
                      tracker: Tracker | None = None) -> Path:
    """Report of the experiment in `tune.results` (`results`, when the caller read them and checked `tracker` with
    `tracked_run`); returns the HTML path."""
    parent = check_output_dir(Path(out or params.evaluate.report), "evaluate.report")  # before any work
    if results is None:
        results = read_results(params.tune.results)
        tracker = tracked_run(params, results.summary)
    summary = results.summary
    out_dir = check_output_dir(parent / summary.experiment, "evaluate.report")
    leaky = summary.leaky  # the verdict stored with the result, never one from the current params.yaml
    details = {"experiment": summary.experiment, "protocol": summary.protocol, "split": summary.split,
               "folds": summary.folds, "data_version": summary.data_version, "parent_run_id": summary.parent_run_id,
               "model_uri": summary.model_uri}
    details = {k: v for k, v in details.items() if v not in (None, "")}
    details |= {f"chosen {k}": v for k, v in summary.chosen.items()}
    path = write_experiment_report(results.predictions, results.history(),
                                   {**details, **summary.metrics, **spread_columns(summary.repeats)},
                                   summary.class_names, out_dir, leaky,
                                   title=f"{summary.experiment}: {run_label(summary.protocol, leaky)}",
                                   intervals=params.evaluate.intervals)
    if tracker is not None and summary.parent_run_id:
        tracker.log_files(summary.parent_run_id, [out_dir], "report")
        log.info("report attached to run %s under report/", summary.parent_run_id)
    return path


def compare_report(params: Params, experiment: str | None = None, out: str | None = None,
                   run_ids: Sequence[str] = ()) -> Path:
    """Comparison across the finished experiments of tracked experiment `experiment` (default tracking.experiment):
    one row per set of comparable runs. With `run_ids` (full ids or unique prefixes), only those runs, and the paired
    differences of each to the first (DataError, exit 2, when two of them are not over the same samples)."""
    name = experiment or params.tracking.experiment
    out_dir = check_output_dir(Path(out or params.evaluate.report), "evaluate.report")
    tracker = make_tracker(params.tracking, "mer report")
    runs = tracker.finished_experiments(name)
    paired = None
    if run_ids:
        chosen = [_find_run(runs, run_id, name) for run_id in run_ids]
        runs = runs.loc[chosen].reset_index(drop=True)
        predictions = {r: tracker.run_predictions(r) for r in runs["run_id"]}
        paired = paired_table(runs, predictions, params.evaluate.intervals)
    table = comparison_table(runs)
    log.info("compare: %d finished experiment(s) of %r -> %d row(s)", len(runs), name, len(table))
    return write_comparison_report(table, out_dir, f"experiment {name}: models x protocols", paired)


def _find_run(runs: pd.DataFrame, run_id: str, experiment: str) -> int:
    """Index of the finished parent run `run_id` (or a unique prefix of it); ConfigError naming it otherwise."""
    hits = runs.index[runs["run_id"].astype(str).str.startswith(run_id)] if not runs.empty else []
    if len(hits) != 1:
        what = "no" if len(hits) == 0 else f"{len(hits)}"
        raise ConfigError(f"--runs {run_id}: {what} finished parent run(s) of experiment {experiment!r} match")
    return int(hits[0])


def report_command(params: Params, args: argparse.Namespace) -> int:
    """`mer report [--compare ...]` (add_arguments); returns the exit code."""
    if args.compare:
        path = compare_report(params, args.experiment, args.out, args.runs or ())
    else:
        if args.experiment or args.runs:
            raise ConfigError(f"{'--experiment' if args.experiment else '--runs'}: only with --compare (the single "
                              "report reads tune.results)")
        path = results_report(params, args.out)
    log.info("wrote %s", path)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`mer report`'s own options."""
    parser.add_argument("--compare", action="store_true",
                        help="table of every finished experiment (models x protocols), leaky rows marked")
    parser.add_argument("--experiment", help="tracked experiment to compare (default: tracking.experiment)")
    parser.add_argument("--runs", nargs="+", metavar="RUN_ID",
                        help="with --compare: only these parent runs, each paired with the first over the same "
                             "samples (difference, subject-bootstrap interval, permutation p-value)")
    parser.add_argument("--out", help="output directory (default: evaluate.report)")
