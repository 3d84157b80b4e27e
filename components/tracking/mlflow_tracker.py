"""The MLflow tracker: one place that knows the tracking URI, the run hierarchy and how runs are found again.

Runs are created and found through `MlflowClient` with explicit run ids (never the fluent "active run" stack), because
the engine keeps a parent, several trial runs and many fold runs open at once. Every run carries a unique `mer.key`
tag, so a restarted driver finds the runs of the killed one instead of duplicating them (`open_run`). Runs left
RUNNING by a driver that died without cleanup are marked FAILED on the next start (`fail_stale_runs`); a SIGTERM ends
the open runs of the process as KILLED (`install_sigterm_handler`).

What a user sees in the MLflow UI: the experiment is created as a model-training experiment (tag
`mlflow.experimentKind = custom_model_development`, so it opens on its training runs, not on the GenAI traces
overview); each parent run records its dataset as an MLflow dataset input whose digest is the DVC data version, and
its source (entry point and git commit); the final model is a pyfunc with an input example; the registry alias
`champion` only ever points at an honest model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import mlflow
import pandas as pd
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from components.tracking.base import (
    CHAMPION_ALIAS,
    EXPERIMENT_KEY_TAG,
    KEY_TAG,
    KIND_TAG,
    DatasetInfo,
    Registration,
    Terminated,
    Tracker,
    artifact_location,
    check_tracking_server,
    comparable_settings,
    redact,
    tracking_uri,
)
from components.tracking.pyfunc import log_pyfunc_model
from mer_model.config import TrackingConfig
from mer_model.errors import ConfigError, DataError
from mer_model.training.metrics import defined

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"  # MLflow 3's "model training" experiment type
# MLflow limits of one log_batch call.
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000


# Modules whose calls must not be unwound by the SIGTERM handler's exception (they hold the tracking store's lock).
_STORE_MODULES = ("sqlalchemy.", "sqlite3", "mlflow.store.")


def _inside_store_call(frame: FrameType | None) -> bool:
    """True when the interrupted Python stack is inside a tracking-store (database) call."""
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_STORE_MODULES):
            return True
        frame = frame.f_back
    return False


class MlflowTracker(Tracker):
    """`tracking.backend: mlflow`. Holds the configuration and the resolved URI; the client is created on first use
    (so the tracker pickles into Tune's experiment state)."""

    backend = "mlflow"
    stores_models = True
    # The runs this PROCESS has open, over every tracker instance (signal handlers are per process too).
    _open: ClassVar[dict[str, str]] = {}  # run id -> tracking URI
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, cfg: TrackingConfig, source: str, commit: str) -> None:
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.source = source  # the entry point and the git commit: the runs' Source in the UI
        self.commit = commit
        self.experiment_id: str | None = None
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        """A client of this tracker's store (explicit URIs: the process-wide ones are left to the fluent calls)."""
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _experiment(self) -> str:
        if self.experiment_id is None:
            self.check()
        assert self.experiment_id is not None
        return self.experiment_id

    def check(self) -> str:
        check_tracking_server(self.uri)  # seconds, not MLflow's minutes of retries, when the server is down
        name = self.cfg.experiment
        found = self.client.get_experiment_by_name(name)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                name, artifact_location(self.cfg, self.uri, name), tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        else:
            self.experiment_id = found.experiment_id
            if EXPERIMENT_KIND_TAG not in found.tags:  # created before the kind existed: make it a training one
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        text = f"MLflow: {redact(self.uri)}, experiment {name!r} ({self.experiment_id}), runs at {self.ui_link()}"
        log.info("%s", text)
        return text

    def ui_link(self) -> str:
        """The experiment's training runs in the MLflow UI. MLflow 3.17's UI opens an experiment on the page of its
        browser-wide "GenAI | Model training" switch (GenAI by default) whatever the experiment's kind tag, unless the
        URL names the workflow: so this link does."""
        page = f"#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
        return f"{redact(self.uri).rstrip('/')}/{page}" if self.uri.startswith(("http://", "https://")) else page

    # ---------------------------------------------------------------------------------------------------- runs

    def _find(self, key: str) -> Any | None:
        runs = self.client.search_runs([self._experiment()], filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                                       max_results=2)
        if len(runs) > 1:
            log.warning("more than one MLflow run tagged %s=%s; using the first", KEY_TAG, key)
        return runs[0] if runs else None

    def fail_stale_runs(self, experiment_key: str) -> int:
        runs = self.client.search_runs(
            [self._experiment()],
            filter_string=f"tags.`{EXPERIMENT_KEY_TAG}` = '{experiment_key}' and attributes.status = 'RUNNING'",
            max_results=10000)
        for run in runs:
            self.client.set_terminated(run.info.run_id, status="FAILED")
        if runs:
            log.warning("marked %d stale RUNNING MLflow run(s) of %s as FAILED", len(runs), experiment_key)
        return len(runs)

    def open_run(self, key: str, name: str, tags: Mapping[str, str], parent: str | None = None,
                 start_time: float | None = None) -> tuple[str, bool]:
        existing = self._find(key)
        if existing is not None:
            run_id, created = existing.info.run_id, False
            if existing.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {KEY_TAG: key, MLFLOW_SOURCE_NAME: self.source, MLFLOW_SOURCE_TYPE: "LOCAL",
                        MLFLOW_GIT_COMMIT: self.commit, **tags}
            if parent:
                all_tags[MLFLOW_PARENT_RUN_ID] = parent
            started = None if start_time is None else int(start_time * 1000)
            run = self.client.create_run(self._experiment(), start_time=started, tags=all_tags, run_name=name)
            run_id, created = run.info.run_id, True
        with self._open_lock:
            self._open[run_id] = self.uri
        return run_id, created

    def is_finished(self, key: str) -> bool:
        found = self._find(key)
        return found is not None and found.info.status == "FINISHED"

    def end_run(self, run: str, status: str = "FINISHED", end_time: float | None = None) -> None:
        with self._open_lock:
            self._open.pop(run, None)
        self.client.set_terminated(run, status=status, end_time=None if end_time is None else int(end_time * 1000))

    def end_all(self, status: str) -> None:
        with self._open_lock:
            runs, MlflowTracker._open = dict(self._open), {}
        for run, uri in sorted(runs.items()):
            for attempt in range(5):  # a SQLite store may be locked by a callback's write for a moment
                try:
                    MlflowClient(tracking_uri=uri).set_terminated(run, status=status)
                    break
                except Exception:  # noqa: BLE001 - best effort while the process is going down
                    if attempt == 4:
                        log.exception("could not end MLflow run %s", run)
                    else:
                        time.sleep(0.5)

    def install_sigterm_handler(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            if _inside_store_call(frame):
                # Unwinding out of the middle of a database write leaves that connection holding the SQLite lock, and
                # `end_all` then waits out the busy timeout for every run it marks KILLED: deliver the signal again a
                # moment later, outside the write.
                retry = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
                retry.daemon = True
                retry.start()
                return
            log.warning("SIGTERM: ending; %d open MLflow run(s) will be marked KILLED", len(self._open))
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.terminated = True
            raise Terminated

        signal.signal(signal.SIGTERM, handler)

    # --------------------------------------------------------------------------------------------------- logging

    def log_params(self, run: str, params: Mapping[str, str]) -> None:
        logged = self.client.get_run(run).data.params
        todo = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(todo), _BATCH_PARAMS):
            self.client.log_batch(run, params=todo[start:start + _BATCH_PARAMS])

    def log_metrics(self, run: str, rows: Iterable[tuple[str, float | None, int]]) -> None:
        now = int(time.time() * 1000)
        todo = [Metric(k, float(v), now, int(step)) for k, v, step in rows if defined(v)]  # absent: not logged
        for start in range(0, len(todo), _BATCH_METRICS):
            self.client.log_batch(run, metrics=todo[start:start + _BATCH_METRICS])

    def log_files(self, run: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).is_dir():
                self.client.log_artifacts(run, str(path), artifact_path)
            else:
                self.client.log_artifact(run, str(path), artifact_path)

    def log_dataset(self, run: str, dataset: DatasetInfo) -> None:
        """An MLflow dataset input: name = data.source, digest = the DVC version's hash, source = where the cache is,
        as a source type MLflow resolves (`mlflow.data.get_source`: LocalArtifactDatasetSource for a path,
        S3ArtifactDatasetSource for s3://, ...), profile = its size and the full data version."""
        _, _, digest = dataset.version.partition(":")
        location = dataset.source if "://" in dataset.source else str(Path(dataset.source).resolve())
        with warnings.catch_warnings():
            # MLflow 3.17 registers LocalArtifactDatasetSource twice and warns that a path is ambiguous between them.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            source = resolve_dataset_source(location)
        profile = {"num_samples": dataset.samples, "num_subjects": dataset.subjects, "data_version": dataset.version}
        entity = Dataset(name=dataset.name, digest=digest[:8] or dataset.version[:8],
                         source_type=source._get_source_type(), source=source.to_json(),
                         profile=json.dumps(profile))
        self.client.log_inputs(run, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, "training")])])

    def get_tag(self, run: str, name: str) -> str | None:
        return self.client.get_run(run).data.tags.get(name)

    def set_tag(self, run: str, name: str, value: str) -> None:
        self.client.set_tag(run, name, value)

    def rename_run(self, run: str, name: str) -> None:
        self.client.update_run(run, name=name)

    def run_predictions(self, run: str) -> pd.DataFrame:
        with tempfile.TemporaryDirectory(prefix="mer-predictions-") as tmp:
            try:
                path = self.client.download_artifacts(run, "predictions.csv", tmp)
            except (MlflowException, OSError) as err:
                raise DataError(f"run {run}: no pooled predictions.csv artifact ({type(err).__name__})") from None
            return pd.read_csv(path, keep_default_na=False)

    # ---------------------------------------------------------------------------------------------------- models

    def log_model(self, run: str, model: Any, class_names: list[str], preprocess: Any, leaky: bool,
                  name: str = "final_model") -> str | None:
        # MLflow's model logging is fluent: point the process-wide store and experiment at this run's.
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(experiment_id=self._experiment())
        with mlflow.start_run(run_id=run):
            return log_pyfunc_model(model, class_names, preprocess, name=name, leaky=leaky).model_uri

    def register_model(self, uri: str, run: str, name: str, tags: Mapping[str, str], honest: bool) -> Registration:
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        existing = [v for v in self.client.search_model_versions(f"name = '{name}'") if v.run_id == run]
        if existing:
            version = max(existing, key=lambda v: int(v.version))
            log.info("model %s version %s already registered from run %s", name, version.version, run)
        else:
            version = mlflow.register_model(uri, name, tags=dict(tags))
            log.info("registered %s as %s version %s", uri, name, version.version)
        if honest:
            self.client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
            log.info("alias %s@%s -> version %s", name, CHAMPION_ALIAS, version.version)
        else:
            log.warning("%s version %s is leaky: the %r alias is not moved to it", name, version.version,
                        CHAMPION_ALIAS)
        return Registration(name, int(version.version), honest)

    # ---------------------------------------------------------------------------------------------- comparison

    def finished_experiments(self, experiment: str) -> pd.DataFrame:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(f"--experiment {experiment}: no such MLflow experiment at {redact(self.uri)}")
        runs = self.client.search_runs([found.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'parent' and "
                                       "attributes.status = 'FINISHED'", max_results=10000)
        rows = []
        for run in runs:
            tags, logged = run.data.tags, run.data.params
            # The leak verdict stored with the result (tag set by the driver from the configuration that trained
            # it), never one recomputed from logged params: a parent logs params.yaml's values, not a search's choice.
            rows.append({"run_id": run.info.run_id, "model": tags.get("model", logged.get("model.name", "?")),
                         "dataset": tags.get("dataset", "?"), "protocol": tags.get("protocol", "?"),
                         "leaky": tags.get("leaky") == "true", "start_time": run.info.start_time,
                         "split": tags.get("split", logged.get("train.split", "loso")),
                         "data_version": tags.get("data_version", logged.get("data_version", "")),
                         "settings": comparable_settings(logged), **run.data.metrics})
        return pd.DataFrame(rows)

