"""Experiment tracking behind one small interface (`Tracker`, components/tracking/base.py).

The trackers are a registry (`TRACKERS`, the project's one mechanism mer.model.registry.Registry): each entry is a
factory that builds the Tracker from the `tracking` section, registered below. `tracking.backend` names one, and is
validated against these names (components/settings.py) without importing any tracker's own module: `mlflow` (every
MLflow import of the platform lives in this package: mlflow_tracker.py and the pyfunc model, pyfunc.py) is imported
only when it is chosen (MLflow takes seconds to import); `none` tracks nothing. `make_tracker(cfg, source)` returns
the chosen one. A new tracker is one entry here (its Tracker subclass in its own module when it imports a heavy
client, like mlflow_tracker.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mer.components.tracking.base import (
    CHAMPION_ALIAS,
    COMPARED_APART,
    DETERMINING,
    EXPERIMENT_KEY_TAG,
    FINAL_MODEL_TAG,
    KEY_TAG,
    KIND_TAG,
    OPERATIONAL,
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
from mer.model.registry import Registry

if TYPE_CHECKING:
    from mer.components.settings import TrackingConfig

REPO = Path(__file__).resolve().parents[2]

__all__ = [
    "CHAMPION_ALIAS", "COMPARED_APART", "DETERMINING", "EXPERIMENT_KEY_TAG", "FINAL_MODEL_TAG", "KEY_TAG",
    "KIND_TAG", "OPERATIONAL", "DatasetInfo", "NullTracker", "Registration", "Terminated", "Tracker",
    "check_tracking_server", "config_hash", "data_version", "flatten", "git_commit", "make_tracker", "redact",
    "run_params", "tracking_uri", "TRACKERS", "TrackerEntry",
]


@dataclass(frozen=True)
class TrackerEntry:
    """A tracking backend: `create(cfg, source)` builds its Tracker from the `tracking` section and the entry point
    shown with each run (e.g. `mer tune`); `keeps_runs`: it stores runs that a summary can point at and a report be
    attached to (known before the tracker, and its client library, is created); `what`: one line for the docs."""

    create: Callable[[TrackingConfig, str], Tracker]
    keeps_runs: bool
    what: str


TRACKERS: Registry[TrackerEntry] = Registry("tracker", "tracking.backend", "components/tracking/__init__.py")


def _mlflow(cfg: TrackingConfig, source: str) -> Tracker:
    from mer.components.tracking.mlflow_tracker import MlflowTracker  # mlflow: seconds to import, only when chosen

    return MlflowTracker(cfg, source, git_commit(REPO))


TRACKERS.add("mlflow", TrackerEntry(_mlflow, True, "MLflow: runs, params, metrics, artifacts, the model registry"))
TRACKERS.add("none", TrackerEntry(lambda cfg, source: NullTracker(), False, "nothing tracked; tune.results complete"))


def make_tracker(cfg: TrackingConfig, source: str = "mer") -> Tracker:
    """The tracker `tracking.backend` selects; `source` (the entry point, e.g. `mer tune`) is shown with each run."""
    return TRACKERS.get(cfg.backend).create(cfg, source)
