"""The `register` step: put the final model logged by `mer tune` into the MLflow model registry.

Registration is idempotent: a version already registered from the same source run is reused, so `dvc repro` after an
interruption does not create a second version of the same model. The version carries the experiment's protocol and
`leaky` flag as tags, so an oracle-selected model is never mistaken for an honestly evaluated one.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from components import tracking
from components.common import add_params_arguments, params_from_args
from components.evaluate import load_results
from mer_model.config import Params
from mer_model.errors import ConfigError

log = logging.getLogger(__name__)


def register_final_model(params: Params) -> dict[str, Any]:
    """Register `summary.json`'s model URI under `tracking.registered_model`; writes and returns
    {name, version, model_uri, run_id, ...} to `tracking.registered_info`."""
    import mlflow

    _, summary = load_results(Path(params.tune.results))
    model_uri = summary.get("model_uri")
    if not model_uri:
        raise ConfigError(f"{params.tune.results}/summary.json: no final model; set tune.final_model: true")
    client, _ = tracking.connect(params.tracking)
    name = params.tracking.registered_model
    run_id = summary["parent_run_id"]
    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        log.info("model %s version %s already registered from run %s", name, version.version, run_id)
    else:
        version = mlflow.register_model(model_uri, name, tags={
            "protocol": summary["protocol"], "leaky": str(summary["leaky"]).lower(),
            "experiment": summary["experiment"], "data_version": summary["data_version"]})
        log.info("registered %s as %s version %s", model_uri, name, version.version)
    info = {"name": name, "version": int(version.version), "model_uri": model_uri, "run_id": run_id,
            "protocol": summary["protocol"], "leaky": summary["leaky"], "metrics": summary["metrics"],
            "tracking_uri": tracking.redact(tracking.tracking_uri(params.tracking))}
    out = Path(params.tracking.registered_info)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    return info


def _run(args: argparse.Namespace) -> int:
    register_final_model(params_from_args(args))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("register", help="register the final model of `mer tune` in the MLflow registry")
    add_params_arguments(parser)
    parser.set_defaults(func=_run)
