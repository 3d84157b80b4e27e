"""The `register` step: put the final model logged by `mer tune` into the tracker's model registry.

Registration is idempotent: a version already registered from the same source run is reused, so `dvc repro` after an
interruption does not create a second version of the same model. The version carries the experiment's protocol and
`leaky` flag as tags, and the registry alias `champion` is moved only to honest models (mer.model.training.protocols
.is_leaky), so an oracle-selected model is never mistaken for an honestly evaluated one.
"""

from __future__ import annotations

import logging
from typing import Any

from mer.components.tracking import make_tracker, redact, tracking_uri
from mer.model.errors import ConfigError
from mer.model.io import write_json
from mer.model.training.results import read_summary

log = logging.getLogger(__name__)


def register_final_model(params: Params) -> dict[str, Any]:
    """Register `summary.json`'s model URI under `tracking.registered_model`; writes and returns
    {name, version, champion, model_uri, run_id, ...} to `tracking.registered_info`."""
    summary = read_summary(params.tune.results)
    if not summary.model_uri or not summary.parent_run_id:
        raise ConfigError(f"{params.tune.results}/summary.json: no final model; set tune.final_model: true "
                          "(and tracking.backend: mlflow)")
    tracker = make_tracker(params.tracking, "mer register")
    tracker.check()
    registration = tracker.add_model_version(
        summary.model_uri, summary.parent_run_id, params.tracking.registered_model,
        {"protocol": summary.protocol, "split": summary.split, "leaky": str(summary.leaky).lower(),
         "experiment": summary.experiment, "data_version": summary.data_version},
        honest=not summary.leaky)
    info = {"name": registration.name, "version": registration.version, "champion": registration.champion,
            "model_uri": summary.model_uri, "run_id": summary.parent_run_id, "protocol": summary.protocol,
            "split": summary.split, "leaky": summary.leaky, "metrics": summary.metrics,
            "tracking_uri": redact(tracking_uri(params.tracking))}
    write_json(params.tracking.registered_info, info)
    return info
