"""Shared fixtures. Tests that need the licensed material in ../shared skip cleanly when it is absent."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import (
    NO_TELEMETRY,
    RAY_TEST_ENV,
    Postgres,
    LocalRay,
    mlflow_server,
    postgres_server,
    ray_head,
    s3_env,
    s3_server,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MER_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_CASES = Path(os.environ.get("MER_SHARED_CASES", SHARED_DATA.parent / "cases"))

# Keep tests from oversubscribing the two CI cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Every Ray of these tests binds to 127.0.0.1 and runs without an auth token; every process that joins the session's
# Ray (this one, drivers, `ray job submit`) must agree on that, so the variables are set, not defaulted.
os.environ.update(RAY_TEST_ENV)


@dataclass
class CliResult:
    returncode: int
    stderr: str


def mer_process(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """The `mer` command as a user runs it, a process of its own; `env` replaces the environment (default: this
    one, one OMP thread)."""
    return subprocess.run([sys.executable, "-m", "mer.pipelines.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env if env is not None else {**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture()
def mer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """`mer ARGS` through the CLI's `main` in this process (faster than `mer_process`), in `cwd`, with `env` added:
    its exit code and stderr."""
    from mer.pipelines.cli import main

    def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> CliResult:
        monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main(list(args))
        return CliResult(code, capsys.readouterr().err)

    return run


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the test: the training-loop tests' models are tiny, and intra-op threads only add
    synchronisation (7x slower on a loaded 2-core runner)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A SampleStore of 5 subjects x 6 synthetic samples with every cache array (tests/test_training_data.py
    `write_cache`), for the training-loop tests."""
    from mer.model.training.data import SampleStore
    from test_training_data import write_cache

    return SampleStore.open(write_cache(tmp_path_factory.mktemp("cache"), subjects=5, per_subject=6))


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def annotations_dir() -> Path:
    """../shared/data/annotations (public coding sheets)."""
    return _shared("annotations")


@pytest.fixture(scope="session")
def composite_dir() -> Path:
    """../shared/data/megc2019-composite (HTNet-format CASME II + SMIC part)."""
    return _shared("megc2019-composite")


@pytest.fixture(scope="session")
def cases_dir() -> Path:
    """../shared/cases (real-world bad-input cases, see its README.md)."""
    if not SHARED_CASES.is_dir():
        pytest.skip(f"shared cases not available: {SHARED_CASES}")
    return SHARED_CASES


@pytest.fixture(scope="session")
def casme2_clip_dir() -> Path:
    """../shared/data/casme2-clip (10 real CASME II frames)."""
    return _shared("casme2-clip")


# Settings that make the project's whole chain (synth -> ingest -> preprocess -> tune) take seconds on two cores:
# 4 subjects x 3 clips of 128 px spread over two source datasets (a tiny composite, so per-dataset results and the
# leave-one-dataset-out split are exercised too), the synthetic landmarks instead of dlib, a coarse TV-L1 on 64 px
# crops, small caches, two epochs of the tiny STSTNet on the CPU.
TINY: dict[str, Any] = {
    "synth.subjects": 4, "synth.clips_per_subject": 3, "synth.min_frames": 10, "synth.max_frames": 12,
    "synth.image_size": 128, "synth.datasets": 2,
    "preprocess.detector": "annotation", "preprocess.face_size": 64, "preprocess.seq_frames": 2,
    "preprocess.seq_size": 32, "preprocess.flow.size": 64, "preprocess.flow.nscales": 1, "preprocess.flow.warps": 1,
    "preprocess.flow.inner_iterations": 5, "preprocess.flow.outer_iterations": 2, "preprocess.num_workers": 2,
    "model.name": "ststnet", "model.config": "small",
    "train.epochs": 2, "train.batch_size": 8, "train.device": "cpu", "train.protocol": "fixed",
    "tune.num_samples": 0, "tune.search_folds": 2, "tune.fold_cpus": 1, "tune.max_concurrent_trials": 2,
}

# The smallest chain that still has LOSO folds (3 subjects x 2 clips, one epoch, one worker), for the run of the
# whole chain in one directory (the Kubeflow local run against the tracking stack).
THREE_BY_TWO: dict[str, Any] = {"synth.subjects": 3, "synth.clips_per_subject": 2, "train.epochs": 1,
                                "preprocess.num_workers": 1, "tune.max_concurrent_trials": 1}


def tiny_params(root: Path, data: Path | None = None, **overrides: Any) -> Path:
    """`root/params.yaml`: the repository's params.yaml with TINY and `overrides` (dotted keys) applied, validated.

    With `data`, every path is absolute: the dataset stages under `data` (a set shared by the session's runs) and
    the run's outputs under `root`. Without, the paths stay the project's relative ones, for a chain of stages run
    in `root` (as a user runs `dvc repro`)."""
    from mer.components.settings import with_overrides

    paths: dict[str, Any] = {}
    if data is not None:
        paths = {
            "synth.out": str(data / "synthetic"), "data.root": str(data / "synthetic"),
            "data.ingested": str(data / "ingested" / "annotations.csv"), "preprocess.out": str(data / "preprocessed"),
            "tune.storage_path": str(root / "runs" / "tune"), "tune.results": str(root / "runs" / "results"),
            "tracking.uri": f"sqlite:///{root / 'mlflow.db'}", "tracking.registered_info": str(root / "registered.json"),
            "evaluate.metrics": str(root / "metrics.json"), "evaluate.plots": str(root / "plots"),
            "evaluate.report": str(root / "reports"),
        }
    params = with_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), {**TINY, **paths, **overrides},
                            "tiny params")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    return path


def tiny_data(root: Path) -> Path:
    """The session's shared tiny set beside `root` (built by the `tiny_root` fixture)."""
    return root.parent / "tiny-data"


@pytest.fixture(scope="session")
def session_ray() -> Iterator[LocalRay]:
    """The session's one Ray, a head on 127.0.0.1 with 2 CPUs and a job server (tests/servers.py). While it runs,
    RAY_ADDRESS points at it, so every Ray user of the session joins it instead of starting its own: this process
    (`local_ray`), the drivers and `mer` commands the tests start as subprocesses, the KFP steps, `ray job submit`."""
    with ray_head(num_cpus=2) as head:
        saved = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = head.address
        try:
            yield head
        finally:
            if saved is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = saved


@pytest.fixture(scope="session")
def local_ray(session_ray: LocalRay) -> Iterator[None]:
    """This process joined to the session's Ray (what the in-process tests and components use)."""
    import ray

    from mer.components.ray_session import connect_ray

    connect_ray(session_ray.address)
    yield
    ray.shutdown()


@dataclass(frozen=True)
class TrackingStack:
    """The deployment's tracking stack (infra/k8s/mlflow.yaml) as real local processes."""

    uri: str  # the MLflow server
    postgres: Postgres  # its backend store (database "mlflow")
    s3_endpoint: str  # its artifact store, bucket TRACKING_BUCKET
    bucket: str


TRACKING_BUCKET = "mer-mlflow"


@pytest.fixture(scope="session")
def tracking_stack() -> Iterator[TrackingStack]:
    """`mlflow server` with a PostgreSQL backend store and an S3 artifact store (moto's server standing in for
    MinIO), all on 127.0.0.1, for the session. Only the server holds the bucket's credentials: clients reach artifacts
    through its proxy, as in the deployment."""
    with postgres_server() as pg, s3_server(buckets=(TRACKING_BUCKET,)) as endpoint:
        with mlflow_server(pg.uri("mlflow"), f"s3://{TRACKING_BUCKET}/artifacts",
                           {**s3_env(endpoint), **NO_TELEMETRY}) as uri:
            yield TrackingStack(uri, pg, endpoint, TRACKING_BUCKET)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory, local_ray: None) -> Path:
    """A directory whose sibling `tiny-data/` (`tiny_data`) holds the synthesized, ingested and preprocessed tiny
    set."""
    from mer.components.ingest import ingest
    from mer.components.preprocess import preprocess
    from mer.components.synth import synthesize
    from mer.components.settings import load_params

    root = tmp_path_factory.mktemp("tiny-build")
    # What every model the session's runs train reads: STSTNet the flow map, CVA-FPF with annotated AUs also `aus`.
    params = load_params(tiny_params(root, tiny_data(root), **{"preprocess.modalities": ["flow28", "aus"]}))
    synthesize(params.synth)
    ingest(params)
    preprocess(params)
    return root


def mlflow_client(root: Path) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)  # explicit: an earlier test may have pinned the process's registry
    return client, client.get_experiment_by_name("mer").experiment_id


def runs_by_kind(root: Path) -> dict[str, list[Any]]:
    client, experiment_id = mlflow_client(root)
    out: dict[str, list[Any]] = {"parent": [], "trial": [], "fold": []}
    for run in client.search_runs([experiment_id], max_results=1000):
        out[run.data.tags["mer.kind"]].append(run)
    return out


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """`small_disk(mib)`: a fresh tmpfs of that size mounted under tmp_path (a real disk that can be filled), unmounted
    after the test. Skips where mounting is not permitted (not root)."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill_disk(path: Path) -> Path:
    """Take every free byte of the file system holding `path` (fallocate, then 4 KiB writes for what it leaves);
    returns the ballast file, whose removal frees the disk again."""
    ballast = path / ".ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, os.statvfs(path).f_bavail * os.statvfs(path).f_frsize)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(4096))
    finally:
        os.close(fd)
    return ballast


def fill_disk_when(path: Path, ready: Callable[[], bool], timeout: float = 600) -> threading.Thread:
    """A thread that fills `path`'s disk (`fill_disk`) as soon as `ready()` holds: a disk that fills DURING a run,
    after its up-front free-space check passed."""
    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if ready():
                    break
            time.sleep(0.02)
        fill_disk(path)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
