"""MLflow helpers: one place that knows the tracking URI, the run hierarchy and how runs are found again.

Runs are created and found through `MlflowClient` with explicit run ids (never the fluent "active run" stack), because
the LOSO driver keeps a parent, several trial runs and many fold runs open at once. Every run carries a unique
`mer.key` tag, so a restarted driver finds the runs of the killed one instead of duplicating them
(`get_or_create_run`). Runs left RUNNING by a driver that died without cleanup are marked FAILED on the next start
(`fail_stale_runs`); a SIGTERM ends the open runs as KILLED (`OpenRuns.install_sigterm_handler`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from mer_model.config import Params, TrackingConfig

log = logging.getLogger(__name__)

KEY_TAG = "mer.key"  # unique per run: experiment key + kind + identity
EXPERIMENT_KEY_TAG = "mer.experiment_key"  # dataset x model x protocol (+ config hash): groups one driver's runs
KIND_TAG = "mer.kind"  # parent | trial | fold | final
PARENT_TAG = "mlflow.parentRunId"

# Parameter names or values that must never reach the tracking server.
_SECRET_NAME = re.compile(r"(secret|password|passwd|token|credential|access_key|private_key)", re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
# MLflow limits of one log_batch call.
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000


def tracking_uri(cfg: TrackingConfig, base: Path | None = None) -> str:
    """The tracking URI: MLFLOW_TRACKING_URI wins over `tracking.uri`; a relative SQLite path is made absolute
    (relative to `base`, default the working directory) so that Ray workers and `ray job submit` drivers, which run
    in other directories, write to the same database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):])
        uri = prefix + str(((base or Path.cwd()) / path).resolve())
    return uri


def artifact_location(cfg: TrackingConfig, uri: str, experiment: str) -> str | None:
    """Where a new experiment stores artifacts: `tracking.artifact_location`, else next to an SQLite database
    (`<db dir>/mlartifacts/<experiment>`), else the server's default."""
    if cfg.artifact_location:
        return cfg.artifact_location
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix):]).parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


def connect(cfg: TrackingConfig) -> tuple[Any, str]:
    """Point MLflow at the configured store; return (client, experiment id), creating the experiment if needed."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(cfg.experiment, artifact_location(cfg, uri, cfg.experiment))
    else:
        experiment_id = experiment.experiment_id
    log.info("MLflow: %s, experiment %r (%s)", redact(uri), cfg.experiment, experiment_id)
    return client, experiment_id


def redact(value: str) -> str:
    """Remove user:password@ from URIs."""
    return _URI_USERINFO.sub(r"\g<scheme>***@", value)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b": "value"} with secrets left out and URI credentials redacted."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if _SECRET_NAME.search(str(key)):
            continue
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = redact(text)
    return out


def config_hash(tree: Any, length: int = 12) -> str:
    """A stable short hash of a JSON-able structure (keys sorted)."""
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def data_version(cache_dir: str | Path, dvc_lock: str | Path = "dvc.lock") -> str:
    """The DVC hash of the preprocessed cache (dvc.lock's `outs` md5 of that path), or, without dvc.lock, a hash of
    its index.csv and manifest.json -- the files that change whenever any sample does."""
    cache_dir = Path(cache_dir)
    lock = Path(dvc_lock)
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []) or []:
                if Path(out.get("path", "")) == cache_dir and out.get("md5"):
                    return f"dvc:{out['md5']}"
    digest = hashlib.md5()
    for name in ("index.csv", "manifest.json"):
        path = cache_dir / name
        if path.is_file():
            digest.update(path.read_bytes())
    return f"files:{digest.hexdigest()}"


def git_commit(repo: str | Path = ".") -> str:
    """HEAD of the repository (suffix `-dirty` when tracked files changed), or `unknown` outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def run_params(params: Params, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The parameters logged on every run: the full resolved config, flattened, plus `extra`."""
    tree = params.model_dump(mode="json", by_alias=True)
    return flatten(tree) | flatten(dict(extra or {}))


class OpenRuns:
    """The runs this process has open; a SIGTERM ends them as KILLED instead of leaving them RUNNING forever."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, run_id: str) -> None:
        with self._lock:
            self._ids.add(run_id)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        with self._lock:
            self._ids.discard(run_id)
        self.client.set_terminated(run_id, status=status)

    def end_all(self, status: str) -> None:
        with self._lock:
            ids, self._ids = sorted(self._ids), set()
        for run_id in ids:
            try:
                self.client.set_terminated(run_id, status=status)
            except Exception:  # noqa: BLE001 - best effort while the process is going down
                log.exception("could not end MLflow run %s", run_id)

    def install_sigterm_handler(self) -> None:
        """On SIGTERM: end open runs as KILLED, then die of SIGTERM as the default handler would."""
        def handler(signum: int, frame: FrameType | None) -> None:
            log.warning("SIGTERM: marking %d open MLflow run(s) KILLED", len(self._ids))
            self.end_all("KILLED")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, handler)


def find_run(client: Any, experiment_id: str, key: str) -> Any | None:
    """The run tagged `mer.key = key`, or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=2)
    if len(runs) > 1:
        log.warning("more than one MLflow run tagged %s=%s; using the first", KEY_TAG, key)
    return runs[0] if runs else None


def get_or_create_run(
    client: Any,
    experiment_id: str,
    key: str,
    name: str,
    tags: Mapping[str, str],
    parent_id: str | None = None,
) -> tuple[str, bool]:
    """(run id, created): the run tagged `key`, re-opened as RUNNING if it exists, else a new run."""
    existing = find_run(client, experiment_id, key)
    if existing is not None:
        if existing.info.status != "RUNNING":
            client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, False
    all_tags = {KEY_TAG: key, **tags}
    if parent_id:
        all_tags[PARENT_TAG] = parent_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=name)
    return run.info.run_id, True


def fail_stale_runs(client: Any, experiment_id: str, experiment_key: str) -> int:
    """Mark RUNNING runs of `experiment_key` FAILED: they belong to a driver that was killed without cleanup
    (SIGKILL, lost node). Only one driver per experiment key may run at a time."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{EXPERIMENT_KEY_TAG}` = '{experiment_key}' and attributes.status = 'RUNNING'",
        max_results=10000,
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status="FAILED")
    if runs:
        log.warning("marked %d stale RUNNING MLflow run(s) of %s as FAILED", len(runs), experiment_key)
    return len(runs)


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    """Log parameters in batches; values already logged (a resumed run) are left alone."""
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params
    todo = [Param(k, v) for k, v in params.items() if k not in logged]
    for start in range(0, len(todo), _BATCH_PARAMS):
        client.log_batch(run_id, params=todo[start:start + _BATCH_PARAMS])


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
    """Log numeric metrics (None values, e.g. an undefined F1, are skipped)."""
    log_metric_rows(client, run_id, [(k, v, step) for k, v in metrics.items()])


def log_metric_rows(client: Any, run_id: str, rows: Iterable[tuple[str, float | None, int]]) -> None:
    """Log (name, value, step) rows in batches."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    todo = [Metric(k, float(v), now, int(step)) for k, v, step in rows if v is not None]
    for start in range(0, len(todo), _BATCH_METRICS):
        client.log_batch(run_id, metrics=todo[start:start + _BATCH_METRICS])


def log_config_artifact(client: Any, run_id: str, params: Params, directory: Path) -> None:
    """The resolved configuration as `config.yaml` (credentials redacted like the params)."""
    tree = params.model_dump(mode="json", by_alias=True)
    path = directory / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(redact(yaml.safe_dump(tree, sort_keys=False)))
    client.log_artifact(run_id, str(path))
