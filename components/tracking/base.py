"""The tracking seam: what the experiment engine and the stages need from an experiment tracker, and a no-op one.

The engine writes its complete results to `tune.results` whatever the tracker; a tracker MIRRORS them (runs, params,
per-epoch metrics, artifacts, the dataset, the final model) for browsing and the model registry. Implementations:
`mlflow` (components/tracking/mlflow_tracker.py: the only place MLflow is imported, with the pyfunc in pyfunc.py) and
`none` (NullTracker below). `tracking.backend` names one of the registered trackers (`TRACKERS`,
components/tracking/__init__.py: a new tracker is one entry there, its Tracker subclass in its own module when it
imports a heavy client); `make_tracker` builds it.

Runs are identified by a unique key (experiment key + kind + identity), so a restarted driver finds the runs of the
killed one instead of duplicating them. Trackers must pickle (Tune callbacks that hold one are pickled into the
experiment state and restored with it): they hold configuration and connect lazily.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
import yaml

from mer.model.errors import ConfigError
from mer.model.io import atomic_write

if TYPE_CHECKING:  # the settings validate `tracking.backend` against this package's registry
    from mer.components.settings import Params, TrackingConfig

log = logging.getLogger(__name__)


class Terminated(SystemExit):
    """Raised in the main thread by the interrupt handler on SIGTERM (Kubernetes, `ray job stop`, a user's kill) or
    SIGINT (Ctrl-C). The handler only raises: whatever tracker write the signal interrupted unwinds first and
    releases its store (an SQLite write lock), so that `end_all("KILLED")` can write afterwards; a handler that wrote
    itself waited on the lock of the very write it interrupted. Exit code 128 + the signal's number, like a process
    killed by it (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)


# Modules whose calls must not be unwound by the interrupt handler's exception (they hold the tracking store's lock).
_STORE_MODULES = ("sqlalchemy.", "sqlite3", "mlflow.store.")
INTERRUPTS = (signal.SIGTERM, signal.SIGINT)


def _inside_store_call(frame: FrameType | None) -> bool:
    """True when the interrupted Python stack is inside a tracking-store (database) call."""
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_STORE_MODULES):
            return True
        frame = frame.f_back
    return False


KEY_TAG = "mer.key"  # unique per run: experiment key + kind + identity
EXPERIMENT_KEY_TAG = "mer.experiment_key"  # dataset x model x protocol (+ config hash): groups one driver's runs
KIND_TAG = "mer.kind"  # parent | trial | fold
FINAL_MODEL_TAG = "mer.final_model_uri"
CHAMPION_ALIAS = "champion"  # registry alias: only ever points at an honest (non-leaky) model

# Parameter names or values that must never reach the tracking server.
_SECRET_NAME = re.compile(r"(secret|password|passwd|token|credential|access_key|private_key)", re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


@dataclass(frozen=True)
class DatasetInfo:
    """The data a run trained on: `name` (data.source), the DVC `version` of the preprocessed cache, where it is,
    and its size."""

    name: str
    version: str
    source: str
    samples: int
    subjects: int


@dataclass(frozen=True)
class Registration:
    """A registered model version; `champion`: the registry alias was moved to it (honest models only)."""

    name: str
    version: int
    champion: bool


class Tracker(ABC):
    """An experiment tracker as the engine and the stages use it. Run ids are the tracker's own strings."""

    backend: ClassVar[str]
    #: log_model stores a servable model (the engine trains the final model only when it does).
    stores_models: ClassVar[bool] = False
    #: set by the interrupt handler: Ray Tune may wrap the `Terminated` raised inside its loop in its own error, so the
    #: caller asks this rather than the exception's type alone.
    terminated: bool = False
    #: the signal that set `terminated` (SIGTERM or SIGINT)
    terminated_by: int = 0

    @abstractmethod
    def check(self) -> str:
        """Connect (create the experiment if needed); returns a one-line description; ConfigError when unusable."""

    @abstractmethod
    def fail_stale_runs(self, experiment_key: str) -> int:
        """Mark runs of `experiment_key` left RUNNING by a killed driver FAILED; returns how many."""

    @abstractmethod
    def open_run(self, key: str, name: str, tags: Mapping[str, str], parent: str | None = None,
                 start_time: float | None = None) -> tuple[str, bool]:
        """(run id, created): the run keyed `key`, re-opened if it exists, else a new one (child of `parent`).
        `start_time` (Unix seconds): when the work the run records began, for a run created after it (a fold)."""

    @abstractmethod
    def run_exists(self, run: str) -> bool:
        """The run `run` (an id this tracker gave) is in the store."""

    @abstractmethod
    def is_finished(self, key: str) -> bool:
        """A run keyed `key` exists and finished (logged completely by an earlier driver)."""

    @abstractmethod
    def log_params(self, run: str, params: Mapping[str, str]) -> None:
        """Log parameters; ones already logged (a resumed run) are left alone."""

    @abstractmethod
    def log_metrics(self, run: str, rows: Iterable[tuple[str, float | None, int]]) -> None:
        """Log (name, value, step) rows; None and NaN values (an undefined F1: absent, never 0) are skipped."""

    @abstractmethod
    def log_files(self, run: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        """Attach files (or whole directories) to the run."""

    @abstractmethod
    def log_dataset(self, run: str, dataset: DatasetInfo) -> None:
        """Record the run's training data as a dataset input carrying its DVC version."""

    @abstractmethod
    def get_tag(self, run: str, name: str) -> str | None: ...

    @abstractmethod
    def set_tag(self, run: str, name: str, value: str) -> None: ...

    @abstractmethod
    def rename_run(self, run: str, name: str) -> None:
        """Give the run another display name (the parent's leak marker, known only after a search)."""

    @abstractmethod
    def end_run(self, run: str, status: str = "FINISHED", end_time: float | None = None) -> None:
        """End a run: FINISHED, FAILED or KILLED; `end_time` (Unix seconds) when its work ended, default now."""

    @abstractmethod
    def end_all(self, status: str) -> None:
        """End every run this process still has open."""

    def install_interrupt_handlers(self) -> None:
        """On SIGTERM or SIGINT (one Ctrl-C) raise `Terminated` in the main thread; the caller's `except
        BaseException` ends the open runs as KILLED (`end_all`) and lets it propagate (exit code 143 / 130). Both
        signals are one path, so a Ctrl-C is never a graceful stop that goes on with the next phase. A signal that
        lands inside a tracking-store call is not unwound there (that left the write's connection holding the SQLite
        lock, so marking the runs KILLED waited out the busy timeout per run) but sent again 0.2 s later."""
        def handler(signum: int, frame: FrameType | None) -> None:
            if _inside_store_call(frame):
                retry = threading.Timer(0.2, os.kill, (os.getpid(), signum))
                retry.daemon = True
                retry.start()
                return
            log.warning("%s: ending; the open runs will be marked KILLED", signal.Signals(signum).name)
            for sig in INTERRUPTS:  # a second Ctrl-C while the runs are being ended ends the process at once
                signal.signal(sig, signal.SIG_DFL)
            self.terminated, self.terminated_by = True, signum
            raise Terminated(signum)

        for sig in INTERRUPTS:
            signal.signal(sig, handler)

    @abstractmethod
    def log_model(self, run: str, model: Any, class_names: list[str], preprocess: Any, leaky: bool,
                  name: str = "final_model") -> str | None:
        """Store `model` (a MERModel) servable with its class names and preprocessing; returns its URI or None."""

    @abstractmethod
    def add_model_version(self, uri: str, run: str, name: str, tags: Mapping[str, str], honest: bool) -> Registration:
        """Register the model at `uri` (idempotent per source run); the champion alias follows honest models only."""

    @abstractmethod
    def finished_experiments(self, experiment: str) -> pd.DataFrame:
        """One row per finished parent run of `experiment`: run_id, model, dataset, protocol, leaky (the stored
        verdict), start_time, split, data_version, settings (`comparable_settings`) and its pooled metrics
        (ConfigError naming `--experiment` when there is no such experiment)."""

    @abstractmethod
    def run_predictions(self, run: str) -> pd.DataFrame:
        """The pooled test predictions a finished parent run logged (predictions.csv); DataError naming the run
        when it has none."""

    def log_params_of(self, run: str, params: Params, extra: Mapping[str, Any] | None = None) -> None:
        """The full resolved configuration, flattened (credentials left out), plus `extra`."""
        self.log_params(run, run_params(params, extra))

    def log_config(self, run: str, params: Params, directory: Path) -> None:
        """The resolved configuration as `config.yaml` (credentials redacted like the params)."""
        path = atomic_write(directory / "config.yaml",
                            redact(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False)))
        self.log_files(run, [path])


class NullTracker(Tracker):
    """`tracking.backend: none`: tracks nothing. Runs get placeholder ids; everything else is a no-op."""

    backend = "none"

    def check(self) -> str:
        return "tracking off (tracking.backend: none)"

    def fail_stale_runs(self, experiment_key: str) -> int:
        return 0

    def open_run(self, key: str, name: str, tags: Mapping[str, str], parent: str | None = None,
                 start_time: float | None = None) -> tuple[str, bool]:
        return f"none:{key}", True

    def run_exists(self, run: str) -> bool:
        return True

    def is_finished(self, key: str) -> bool:
        return False

    def log_params(self, run: str, params: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, run: str, rows: Iterable[tuple[str, float | None, int]]) -> None:
        pass

    def log_files(self, run: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, run: str, dataset: DatasetInfo) -> None:
        pass

    def get_tag(self, run: str, name: str) -> str | None:
        return None

    def set_tag(self, run: str, name: str, value: str) -> None:
        pass

    def rename_run(self, run: str, name: str) -> None:
        pass

    def run_predictions(self, run: str) -> pd.DataFrame:
        raise ConfigError("tracking.backend none: no tracked runs to compare; set tracking.backend: mlflow")

    def end_run(self, run: str, status: str = "FINISHED", end_time: float | None = None) -> None:
        pass

    def end_all(self, status: str) -> None:
        pass

    def log_model(self, run: str, model: Any, class_names: list[str], preprocess: Any, leaky: bool,
                  name: str = "final_model") -> str | None:
        return None

    def add_model_version(self, uri: str, run: str, name: str, tags: Mapping[str, str], honest: bool) -> Registration:
        raise ConfigError("tracking.backend: none keeps no model registry; set tracking.backend: mlflow")

    def finished_experiments(self, experiment: str) -> pd.DataFrame:
        raise ConfigError("tracking.backend: none keeps no runs to compare; set tracking.backend: mlflow")


# --------------------------------------------------------------------------------------------------------------------
# What every tracker records, computed once


def tracking_uri(cfg: TrackingConfig, base: Path | None = None) -> str:
    """The tracking URI: MLFLOW_TRACKING_URI wins over `tracking.uri`; a relative SQLite path is made absolute
    (relative to `base`, default the working directory) so that Ray workers and `ray job submit` drivers, which run
    in other directories, write to the same database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(((base or Path.cwd()) / uri[len(prefix):]).resolve())
    # A bare postgresql:// makes SQLAlchemy 2.1 load psycopg (3), which is not installed: name the installed driver.
    if uri.startswith(("postgresql://", "postgres://")):
        uri = "postgresql+psycopg2://" + uri.split("://", 1)[1]
    return uri


TRACKING_CHECK_S = 5.0  # one connection attempt: a server that does not answer in this time counts as down


def check_tracking_server(uri: str) -> None:
    """A short reachability check of a tracking server or database before anything starts: MLflow's client
    otherwise retries a dead server for minutes. HTTP(S): the server's /health answers; a database URI: its host
    accepts a TCP connection. Files and SQLite need no check. ConfigError naming the URI (credentials redacted)."""
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.split("+")[0]
    where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    try:
        if scheme in ("http", "https"):
            with urllib.request.urlopen(_health_request(parsed), timeout=TRACKING_CHECK_S) as response:  # noqa: S310
                response.read()
        elif scheme in DATABASE_PORTS and parsed.hostname:
            with socket.create_connection((parsed.hostname, parsed.port or DATABASE_PORTS[scheme]),
                                          timeout=TRACKING_CHECK_S):
                pass
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ConfigError(f"{where}: {redact(uri)}: tracking server not reachable ({reason})") from None


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _health_request(parsed: urllib.parse.SplitResult) -> urllib.request.Request:
    """GET <server>/health. Credentials in the URI (`http://user:pw@host:port`, which MLflow's client sends as HTTP
    basic auth) go into the Authorization header: urllib would take `user:pw@host` for the host name."""
    netloc = parsed.hostname or ""
    if ":" in netloc:  # an IPv6 literal
        netloc = f"[{netloc}]"
    if parsed.port:
        netloc += f":{parsed.port}"
    url = urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(url)
    if parsed.username is not None:
        user = urllib.parse.unquote(parsed.username)
        password = urllib.parse.unquote(parsed.password or "")
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    return request


def artifact_location(cfg: TrackingConfig, uri: str, experiment: str) -> str | None:
    """Where a new experiment stores artifacts: `tracking.artifact_location`, else next to an SQLite database
    (`<db dir>/mlartifacts/<experiment>`), else the server's default."""
    if cfg.artifact_location:
        return cfg.artifact_location
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix):]).parent / "mlartifacts" / experiment).resolve().as_uri()
    return None



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


# The settings that determine a run's result, the ones its MLflow runs log (the column picker and `mer report
# --compare` see nothing else): the data and how it was preprocessed, the model, its training, the search that chose
# it, the intervals of its metrics, the search's seed (`synth` only for synthetic data), less OPERATIONAL. Where it
# runs, where its files go, the tracker and the benchmark's catalogue change none of its numbers.
DETERMINING = ("seed", "data", "preprocess", "model", "train", "tune.num_samples", "tune.search_space",
               "tune.search_folds", "tune.metric", "tune.repeats", "tune.nested", "evaluate.intervals")
# The keys inside those sections that change none of a run's numbers: where its files go, worker counts, where and
# how it ran (each fold records its device; device-resident data draws what the CPU path draws, equal within
# interpolation tolerance), how often it checkpoints. Neither logged nor compared between runs.
OPERATIONAL = frozenset({"data.ingested", "preprocess.out", "preprocess.num_workers", "preprocess.ray_address",
                         "train.device", "train.device_data", "train.device_data_mb", "train.num_workers",
                         "train.checkpoint_every"})
# Logged, but compared on their own (`mer report --compare` puts each protocol and split in its own rows).
COMPARED_APART = frozenset({"train.protocol", "train.split"})


def run_params(params: Params, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The parameters logged on every run: the resolved settings that determine its result (DETERMINING less
    OPERATIONAL), flattened, plus `extra`."""
    tree = params.model_dump(mode="json", by_alias=True)
    chosen: dict[str, Any] = {}
    for key in (*DETERMINING, *(("synth",) if params.data.source == "synthetic" else ())):
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        chosen[key] = node
    logged = flatten(chosen)
    return {k: v for k, v in logged.items() if k not in OPERATIONAL} | flatten(dict(extra or {}))


def comparable_settings(logged: Mapping[str, str]) -> dict[str, str]:
    """The `model.*` and `train.*` settings that trained a parent run's result, from its logged params: params.yaml's
    values (what the parent logs) with a search's `chosen.<key>` applied, in `flatten`'s text form; operational
    settings (OPERATIONAL) and the protocol and split (COMPARED_APART) left out."""
    settings = {k: v for k, v in logged.items()
                if k.startswith(("model.", "train.")) and k not in OPERATIONAL | COMPARED_APART}
    for key, value in logged.items():
        if key.startswith("chosen."):
            decoded = json.loads(value)
            settings[key[len("chosen."):]] = decoded if isinstance(decoded, str) else json.dumps(decoded, default=str)
    return dict(sorted(settings.items()))


def config_hash(tree: Any, length: int = 12) -> str:
    """A stable short hash of a JSON-able structure (keys sorted)."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:length]


def data_version(cache_dir: str | Path, dvc_lock: str | Path = "dvc.lock") -> str:
    """The DVC hash of the preprocessed cache (dvc.lock's `outs` md5 of that path, paths compared resolved), or,
    without one, a hash of its index.csv and manifest.json -- the files that change whenever any sample does."""
    cache_dir = Path(cache_dir).resolve()
    lock = Path(dvc_lock)
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []) or []:
                if (lock.parent / out.get("path", "")).resolve() == cache_dir and out.get("md5"):
                    return f"dvc:{out['md5']}"
    digest = hashlib.md5()
    for name in ("index.csv", "manifest.json"):
        path = cache_dir / name
        if path.is_file():
            digest.update(path.read_bytes())
    return f"files:{digest.hexdigest()}"


# Tracked files the platform itself rewrites (benchmark tables, DVC's lock): not code, so they do not make a run's
# code "dirty" -- else every `mer benchmark` invocation after the first of one run would be marked so.
GIT_OUTPUTS = ("results", "dvc.lock")


def git_commit(repo: str | Path = ".") -> str:
    """HEAD of the repository (suffix `-dirty` when tracked files other than GIT_OUTPUTS changed), or `unknown`
    outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                         *[f":(exclude){p}" for p in GIT_OUTPUTS]))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
