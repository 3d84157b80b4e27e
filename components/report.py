"""`mer report`: the HTML report of the last experiment, or (`--compare`) the table across all experiments.

    mer report                                # tune.results -> <evaluate.report>/<experiment>/report.html
    mer report --compare [--experiment mer]   # finished MLflow parent runs -> <evaluate.report>/compare.html

The experiment report reads the tune stage's pooled predictions (`tune.results`) and the per-fold training histories
the LOSO driver logged to MLflow (`history.csv` of each evaluation fold run), writes HTML + PNGs, and logs them to the
experiment's MLflow parent run under `report/`. The comparison reads every FINISHED parent run of the MLflow
experiment (tags `model`, `dataset`, `protocol`, `leaky`; pooled metrics) with `search_runs`.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from components.common import add_params_arguments, check_output_dir, params_from_args
from mer_model.config import ModelConfig, Params
from mer_model.errors import ConfigError

log = logging.getLogger(__name__)


def reads_annotated_aus(model: ModelConfig | dict[str, Any]) -> bool:
    """True when the model configuration takes the dataset's AU coding as an input (labels derive from it)."""
    from mer_model.models import model_inputs

    cfg = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
    return "aus" in model_inputs(cfg.name, cfg.config, **cfg.kwargs)


def fold_history(client: Any, experiment_id: str, experiment_key: str) -> pd.DataFrame | None:
    """Per-epoch history of every evaluation fold run of one experiment (long format with a `fold` column)."""
    from components.tracking import EXPERIMENT_KEY_TAG, KIND_TAG

    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{EXPERIMENT_KEY_TAG}` = '{experiment_key}' and tags.`{KIND_TAG}` = 'fold' "
                      "and tags.phase = 'evaluate'",
        max_results=10000)
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            try:
                path = client.download_artifacts(run.info.run_id, "history.csv", tmp)
            except Exception as err:  # noqa: BLE001 - a fold without a history only loses its curve
                log.warning("fold run %s: no history.csv (%s)", run.info.run_id, str(err).splitlines()[0])
                continue
            frames.append(pd.read_csv(path).assign(fold=run.data.tags.get("fold", run.info.run_id)))
    return pd.concat(frames, ignore_index=True) if frames else None


def experiment_report(params: Params, out: str | None = None) -> Path:
    """Report of the experiment in `tune.results`; returns the HTML path."""
    from components import tracking
    from components.evaluate import load_results
    from mer_model.reporting import write_experiment_report

    predictions, summary = load_results(Path(params.tune.results))
    out_dir = check_output_dir(Path(out or params.evaluate.report) / summary["experiment"], "evaluate.report")
    leaky = bool(summary["leaky"]) or reads_annotated_aus(params.model)
    history, client = None, None
    try:
        client, experiment_id = tracking.connect(params.tracking)
        history = fold_history(client, experiment_id, summary["experiment_key"])
    except Exception as err:  # noqa: BLE001 - the report is still useful without curves
        log.warning("no learning curves: cannot read fold histories from MLflow (%s)", str(err).splitlines()[0])
    details = {k: summary.get(k) for k in ("experiment", "protocol", "folds", "data_version", "parent_run_id",
                                            "model_uri") if summary.get(k) is not None}
    details |= {f"chosen {k}": v for k, v in (summary.get("chosen") or {}).items()}
    path = write_experiment_report(predictions, history, {**details, **summary.get("metrics", {})},
                                   summary["class_names"], out_dir, leaky,
                                   title=f"{summary['experiment']} ({summary['protocol']}{', leaky' if leaky else ''})")
    if client is not None and summary.get("parent_run_id"):
        client.log_artifacts(summary["parent_run_id"], str(out_dir), "report")
        log.info("report logged to MLflow run %s under report/", summary["parent_run_id"])
    return path


def runs_table(client: Any, experiment_id: str) -> pd.DataFrame:
    """One row per FINISHED parent run: model, dataset, protocol, leaky, start_time and its pooled metrics."""
    from components.tracking import KIND_TAG

    runs = client.search_runs([experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'parent' and "
                                                             "attributes.status = 'FINISHED'", max_results=10000)
    rows = []
    for run in runs:
        tags, logged = run.data.tags, run.data.params
        model = {"name": logged.get("model.name", tags.get("model", "?")), "config": logged.get("model.config", "paper"),
                 "kwargs": {k[len("model.kwargs."):]: v for k, v in logged.items() if k.startswith("model.kwargs.")}}
        try:
            annotated = reads_annotated_aus(model)
        except ConfigError:
            annotated = model["kwargs"].get("au_mode") == "annotated"
        rows.append({"run_id": run.info.run_id, "model": tags.get("model", model["name"]),
                     "dataset": tags.get("dataset", "?"), "protocol": tags.get("protocol", "?"),
                     "leaky": tags.get("leaky") == "true" or annotated, "start_time": run.info.start_time,
                     **run.data.metrics})
    return pd.DataFrame(rows)


def compare_report(params: Params, experiment: str | None = None, out: str | None = None) -> Path:
    """Comparison across the finished experiments of MLflow experiment `experiment` (default tracking.experiment)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from components import tracking
    from mer_model.reporting import comparison_table, write_comparison_report

    name = experiment or params.tracking.experiment
    out_dir = check_output_dir(Path(out or params.evaluate.report), "evaluate.report")
    uri = tracking.tracking_uri(params.tracking)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        raise ConfigError(f"--experiment {name}: no such MLflow experiment at {tracking.redact(uri)}")
    runs = runs_table(client, found.experiment_id)
    table = comparison_table(runs)
    log.info("compare: %d finished experiment(s) of %r -> %d row(s)", len(runs), name, len(table))
    return write_comparison_report(table, out_dir, f"MLflow experiment {name}: models x protocols")


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
    parser.add_argument("--experiment", help="MLflow experiment to compare (default: tracking.experiment)")
    parser.add_argument("--out", help="output directory (default: evaluate.report)")
    add_params_arguments(parser)
    parser.set_defaults(func=_run)
