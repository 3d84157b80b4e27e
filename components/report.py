"""`mer report`: the HTML report of the last experiment, or (`--compare`) the table across all experiments.

    mer report                                # tune.results -> <evaluate.report>/<experiment>/report.html
    mer report --compare [--experiment mer]   # finished parent runs of the tracker -> <evaluate.report>/compare.html

The experiment report reads only the tune stage's outputs (`tune.results`: pooled predictions, the experiment summary
and every fold's history for the learning curves), writes HTML + PNGs, and attaches them to the experiment's parent
run in the tracker under `report/`. The comparison reads every finished parent run of a tracked experiment (tags
`model`, `dataset`, `protocol`, `leaky`; pooled metrics).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from components.common import add_params_arguments, check_output_dir, params_from_args
from components.tracking import make_tracker
from mer_model.config import Params
from mer_model.errors import ConfigError
from mer_model.reporting import comparison_table, write_comparison_report, write_experiment_report
from mer_model.training.protocols import is_leaky, run_label
from mer_model.training.results import read_results

log = logging.getLogger(__name__)


def experiment_report(params: Params, out: str | None = None) -> Path:
    """Report of the experiment in `tune.results`; returns the HTML path."""
    parent = check_output_dir(Path(out or params.evaluate.report), "evaluate.report")  # before any work
    results = read_results(params.tune.results)
    summary = results.summary
    out_dir = check_output_dir(parent / summary.experiment, "evaluate.report")
    leaky = summary.leaky or is_leaky(summary.protocol, params.model)
    details = {"experiment": summary.experiment, "protocol": summary.protocol, "split": summary.split,
               "folds": summary.folds, "data_version": summary.data_version, "parent_run_id": summary.parent_run_id,
               "model_uri": summary.model_uri}
    details = {k: v for k, v in details.items() if v not in (None, "")}
    details |= {f"chosen {k}": v for k, v in summary.chosen.items()}
    path = write_experiment_report(results.predictions, results.history(), {**details, **summary.metrics},
                                   summary.class_names, out_dir, leaky,
                                   title=f"{summary.experiment}: {run_label(summary.protocol, leaky)}")
    if summary.parent_run_id and params.tracking.backend != "none":
        tracker = make_tracker(params.tracking, "mer report")
        tracker.check()
        tracker.log_files(summary.parent_run_id, [out_dir], "report")
        log.info("report attached to run %s under report/", summary.parent_run_id)
    return path


def compare_report(params: Params, experiment: str | None = None, out: str | None = None) -> Path:
    """Comparison across the finished experiments of tracked experiment `experiment` (default tracking.experiment)."""
    name = experiment or params.tracking.experiment
    out_dir = check_output_dir(Path(out or params.evaluate.report), "evaluate.report")
    runs = make_tracker(params.tracking, "mer report").finished_experiments(name)
    table = comparison_table(runs)
    log.info("compare: %d finished experiment(s) of %r -> %d row(s)", len(runs), name, len(table))
    return write_comparison_report(table, out_dir, f"experiment {name}: models x protocols")


def _run(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    if args.compare:
        path = compare_report(params, args.experiment, args.out)
    else:
        if args.experiment:
            raise ConfigError("--experiment: only with --compare (the single report reads tune.results)")
        path = experiment_report(params, args.out)
    log.info("wrote %s", path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="HTML report of the last experiment, or --compare across runs")
    parser.add_argument("--compare", action="store_true",
                        help="table of every finished experiment (models x protocols), leaky rows marked")
    parser.add_argument("--experiment", help="tracked experiment to compare (default: tracking.experiment)")
    parser.add_argument("--out", help="output directory (default: evaluate.report)")
    add_params_arguments(parser)
    parser.set_defaults(func=_run)
