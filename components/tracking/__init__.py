"""Experiment tracking behind one small interface (`Tracker`, components/tracking/base.py).

`make_tracker(cfg, source)` returns the backend `tracking.backend` names: `mlflow` (every MLflow import of the
platform lives in this package: mlflow_tracker.py and the pyfunc model, pyfunc.py) or `none`. The MLflow modules are
imported only when that backend is chosen (MLflow takes seconds to import).
"""

from __future__ import annotations

from pathlib import Path

from components.settings import TrackingConfig
from components.tracking.base import (
    CHAMPION_ALIAS,
    EXPERIMENT_KEY_TAG,
    FINAL_MODEL_TAG,
    KEY_TAG,
    KIND_TAG,
    DatasetInfo,
    NullTracker,
    Registration,
    Terminated,
    Tracker,
    check_tracking_server,
    config_hash,
    data_version,
    flatten,
    git_commit,
    redact,
    run_params,
    tracking_uri,
)

REPO = Path(__file__).resolve().parents[2]

__all__ = [
    "CHAMPION_ALIAS", "EXPERIMENT_KEY_TAG", "FINAL_MODEL_TAG", "KEY_TAG", "KIND_TAG", "DatasetInfo", "NullTracker",
    "Registration", "Terminated", "Tracker", "check_tracking_server", "config_hash", "data_version", "flatten",
    "git_commit", "make_tracker", "redact", "run_params", "tracking_uri",
]


def make_tracker(cfg: TrackingConfig, source: str = "mer") -> Tracker:
    """The tracker `tracking.backend` selects; `source` (the entry point, e.g. `mer tune`) is shown with each run."""
    if cfg.backend == "none":
        return NullTracker()
    from components.tracking.mlflow_tracker import MlflowTracker  # mlflow: seconds to import, only when used

    return MlflowTracker(cfg, source, git_commit(REPO))
