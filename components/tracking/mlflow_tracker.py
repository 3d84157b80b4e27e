"""The MLflow tracker: one place that knows the tracking URI, the run hierarchy and how runs are found again.

Runs are created and found through `MlflowClient` with explicit run ids (never the fluent "active run" stack), because
the engine keeps a parent, several trial runs and many fold runs open at once. Every run carries a unique `mer.key`
tag, so a restarted driver finds the runs of the killed one instead of duplicating them (`open_run`). Runs left
RUNNING by a driver that died without cleanup are marked FAILED on the next start (`fail_stale_runs`); a SIGTERM ends
the open runs of the process as KILLED, and so does a Ctrl-C (`install_interrupt_handlers`).

What a user sees in the MLflow UI: the experiment is created as a model-training experiment (tag
`mlflow.experimentKind = custom_model_development`, so it opens on its training runs, not on the GenAI traces
overview); each parent run records its dataset as an MLflow dataset input whose digest is the DVC data version, and
its source (entry point and git commit); the final model is a pyfunc with an input example; the registry alias
`champion` only ever points at an honest model.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

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
from requests.exceptions import RequestException

from mer.components.tracking.base import (
    CHAMPION_ALIAS,
    EXPERIMENT_KEY_TAG,
    KEY_TAG,
    KIND_TAG,
    DatasetInfo,
    Registration,
    Tracker,
    artifact_location,
    check_tracking_server,
    comparable_settings,
    redact,
    tracking_uri,
)
from mer.components.tracking.pyfunc import log_pyfunc_model
from mer.model.errors import (
    FULL_DISK,
    SQLITE_FULL,
    ConfigError,
    DataError,
    MerError,
    ServiceError,
    StorageError,
)
from mer.model.io import atomic_write
from mer.model.logging_utils import one_line_user_errors
from mer.model.training.metrics import defined

if TYPE_CHECKING:  # the settings validate `tracking.backend` against this package's registry
    from mer.components.settings import TrackingConfig

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"  # MLflow 3's "model training" experiment type
# MLflow limits of one log_batch call.
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000


STORE_LOCK_S = 120.0  # creating and migrating an SQLite store takes seconds; beyond this the holder is stuck


@contextlib.contextmanager
def store_lock(uri: str, timeout: float = STORE_LOCK_S) -> Iterator[None]:
    """For an SQLite store: hold `<database>.lock` (flock, released by the kernel if the holder dies) while the
    store is created, migrated or its experiment created. MLflow does both without a lock of its own: six commands
    opening a new store at once gave five tracebacks, and two concurrent `mer tune` left it unusable. Other stores
    (a server, PostgreSQL) serialise this themselves."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    path = Path(uri[len(prefix):] + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServiceError(f"tracking.uri: {redact(uri)}: the store is being created by another process "
                                       f"for more than {timeout:.0f} s (lock {path})") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Space kept free beside an SQLite store (`<database>.reserve`) and given up when its disk is full, so that the runs
# of a process that fails for that very reason can still be ended FAILED / KILLED instead of staying RUNNING.
RESERVE_BYTES = 1 << 20


def _reserve(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri[len(prefix):] + ".reserve") if uri.startswith(prefix) else None


def keep_reserve(uri: str) -> None:
    """Write the reserve beside an SQLite store if it is not there (nothing when the disk has no room for it)."""
    path = _reserve(uri)
    if path is not None and not path.exists():
        with contextlib.suppress(MerError, OSError):
            atomic_write(path, bytes(RESERVE_BYTES))


def release_reserve(uri: str) -> bool:
    """Give the reserve's space back to the store's disk; False when there was none."""
    path = _reserve(uri)
    if path is None or not path.exists():
        return False
    path.unlink()
    log.warning("tracking store's disk is full: released its %d KiB reserve to end the runs", RESERVE_BYTES >> 10)
    return True


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _translated(method: Callable[..., Any]) -> Callable[..., Any]:
    """A tracker call whose store failure (a server that died, an artifact store behind it that died, a full SQLite
    disk) is one ServiceError / StorageError line naming the store, after MLflow's own bounded retries."""
    @functools.wraps(method)
    def call(self: MlflowTracker, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except MerError:
            raise
        except (MlflowException, OSError, RequestException) as err:
            where = f"tracking store {redact(self.uri)}"
            if SQLITE_FULL in str(err):
                raise StorageError(f"{where}: its disk is full ({SQLITE_FULL}); free space and run again") from err
            if isinstance(err, OSError) and err.errno in FULL_DISK:
                raise StorageError(f"{where}: its disk is full ({err.filename or ''}: {err.strerror}); free space "
                                   "and run again") from err
            raise ServiceError(f"{where}: {method.__name__} failed: {redact(_first_line(err))}") from err

    return call


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
        one_line_user_errors("mlflow.store.db.utils")  # it logs each database error it raises with a traceback

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        """A client of this tracker's store (explicit URIs: the process-wide ones are left to the fluent calls). Its
        store is opened (an SQLite database created and migrated) here, under `store_lock`."""
        if self._client is None:
            with store_lock(self.uri):
                client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                client.search_experiments(max_results=1)  # opens, creates and migrates the store
            self._client = client
        return self._client

    def _experiment(self) -> str:
        if self.experiment_id is None:
            self.check()
        assert self.experiment_id is not None
        return self.experiment_id

    def check(self) -> str:
        check_tracking_server(self.uri)  # seconds, not MLflow's minutes of retries, when the server is down
        name = self.cfg.experiment
        client = self.client
        with store_lock(self.uri):  # two commands creating the experiment at once: the second finds it
            found = client.get_experiment_by_name(name)
            if found is None:
                self.experiment_id = client.create_experiment(
                    name, artifact_location(self.cfg, self.uri, name),
                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        if found is not None:
            self.experiment_id = found.experiment_id
            if EXPERIMENT_KIND_TAG not in found.tags:  # created before the kind existed: make it a training one
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        text = f"MLflow: {redact(self.uri)}, experiment {name!r} ({self.experiment_id}), runs at {self.ui_link()}"
        keep_reserve(self.uri)
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

    def run_exists(self, run: str) -> bool:
        try:
            self.client.get_run(run)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

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
                except Exception as err:  # noqa: BLE001 - best effort while the process is going down
                    if SQLITE_FULL in str(err) and release_reserve(uri):
                        continue  # the store's disk is full: the reserve's space lets the runs be ended
                    if attempt == 4:  # one line: the error that ended the process is the one to read
                        log.warning("could not end MLflow run %s as %s: %s", run, status, _first_line(err))
                    else:
                        time.sleep(0.5)

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

    def add_model_version(self, uri: str, run: str, name: str, tags: Mapping[str, str], honest: bool) -> Registration:
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
        check_tracking_server(self.uri)  # seconds, not MLflow's minutes of retries, when the server is down
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


for _name in ("check", "fail_stale_runs", "open_run", "run_exists", "is_finished", "end_run", "log_params",
              "log_metrics", "log_files", "log_dataset", "get_tag", "set_tag", "log_model", "add_model_version",
              "finished_experiments"):
    setattr(MlflowTracker, _name, _translated(getattr(MlflowTracker, _name)))
