"""Real local services for integration tests: a Ray head, PostgreSQL, an S3 endpoint (moto) and an MLflow tracking
server.

Each service is a context manager that starts a real process bound to 127.0.0.1 on a free port, waits for it with a
bounded timeout, and on exit stops it and removes its files. Failures raise with the tail of the process log, so a
broken service explains itself instead of timing out silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mer.components.ray_session import LOCAL_RAY_ENV, LocalRay, free_port, start_local_ray

PG_BIN = Path(os.environ.get("MER_PG_BIN", "/usr/lib/postgresql/15/bin"))
VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
# Dummy credentials: moto accepts any, and they make sure nothing reaches a real AWS account.
S3_KEY_ID = "testing"
S3_SECRET = "testing"
# No usage reporting from test processes (no outbound traffic; MLflow's telemetry thread also races os.environ).
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll `check` until it is true; raise naming `what` (and the log tail) on timeout or if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{log_tail(log)}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s\n{log_tail(log)}")


def log_tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-chars:]


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback URL built by the tests
        return response.status == 200


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate a process group started with start_new_session=True; kill it if it does not stop in time."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout)


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session (so stop() reaches its children), output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def uri(self, database: str) -> str:
        """SQLAlchemy URI naming psycopg2 (SQLAlchemy 2.1 would otherwise pick psycopg 3, which is not installed)."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/{database}"


@contextlib.contextmanager
def postgres_server(database: str = "mlflow", timeout: float = 60) -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) with password authentication on TCP.

    initdb refuses to run as root, so when the tests run as root the cluster belongs to `nobody`; its directory is a
    fresh mkdtemp opened to that user (pytest's own tmp dirs are 0700 root).
    """
    if not (PG_BIN / "initdb").exists():
        raise FileNotFoundError(f"PostgreSQL binaries not found in {PG_BIN} (set MER_PG_BIN)")
    root = Path(tempfile.mkdtemp(prefix="mer-pg-"))
    root.chmod(0o755)
    run_as = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    pg = Postgres(LOOPBACK, free_port(), "mer", "mer-test-password")
    data, sockets, log = root / "data", root / "sockets", root / "postgres.log"
    pwfile = root / "pwfile"
    pwfile.write_text(pg.password + "\n")
    for path in (data, sockets):
        path.mkdir()
    if run_as:
        for path in (data, sockets, pwfile):
            shutil.chown(path, "nobody")
        log.touch()
        shutil.chown(log, "nobody")
    started = False
    try:
        subprocess.run(
            [*run_as, str(PG_BIN / "initdb"), "-D", str(data), "-U", pg.user, f"--pwfile={pwfile}",
             "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=timeout,
        )
        options = f"-h {LOOPBACK} -p {pg.port} -k {sockets} -c fsync=off"
        subprocess.run(
            [*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
             "-t", str(int(timeout)), "start"],
            check=True, capture_output=True, timeout=timeout + 10,
        )
        started = True
        subprocess.run(
            [*run_as, str(PG_BIN / "createdb"), "-h", str(sockets), "-p", str(pg.port), "-U", pg.user, database],
            check=True, capture_output=True, timeout=timeout,
        )
        yield pg
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{err.cmd[len(run_as)]} failed: {err.stderr.decode(errors='replace')}\n"
                           f"{log_tail(log)}") from None
    finally:
        if started:
            subprocess.run([*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment that points boto3, MLflow, DVC and Ray at the local S3 endpoint with dummy credentials."""
    return {
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


@contextlib.contextmanager
def s3_server(buckets: tuple[str, ...] = (), timeout: float = 60) -> Iterator[str]:
    """moto's standalone S3 server on loopback; yields the endpoint URL with `buckets` already created."""
    import boto3

    root = Path(tempfile.mkdtemp(prefix="mer-s3-"))
    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    log = root / "moto.log"
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)], log,
                  env={**os.environ, **s3_env(endpoint)})
    _SERVING[endpoint] = proc
    try:
        wait_until(lambda: http_ok(f"{endpoint}/moto-api/"), timeout, "moto S3 server", proc, log)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY_ID,
                              aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        _SERVING.pop(endpoint, None)
        stop(proc)
        shutil.rmtree(root, ignore_errors=True)


_SERVING: dict[str, subprocess.Popen] = {}  # endpoint -> process of the servers running now


def kill_server(endpoint: str) -> None:
    """SIGKILL a running server (`s3_server`'s endpoint) and its children: a service dying under a run."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(_SERVING[endpoint].pid, 9)
    _SERVING[endpoint].wait(30)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts_destination: str, env: dict[str, str],
                  timeout: float = 300) -> Iterator[str]:
    """`mlflow server` with the given stores; yields the tracking URI once /health answers."""
    root = Path(tempfile.mkdtemp(prefix="mer-mlflow-"))
    port = free_port()
    log = root / "mlflow.log"
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", LOOPBACK, "--port", str(port),
           "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination,
           "--workers", "1"]
    # No job execution: MLflow 3's server otherwise keeps a job runner and seven huey consumers polling (a quarter of
    # a core for as long as the server lives); nothing of this platform submits server jobs.
    proc = _spawn(cmd, log, env={**os.environ, **NO_TELEMETRY, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env})
    uri = f"http://{LOOPBACK}:{port}"
    try:
        wait_until(lambda: http_ok(f"{uri}/health"), timeout, "mlflow server", proc, log)
        yield uri
    finally:
        stop(proc)
        shutil.rmtree(root, ignore_errors=True)


# Every process that joins the tests' Ray (the test process, drivers, `ray job submit`) needs the head's auth mode
# (mer.components.ray_session.LOCAL_RAY_ENV), so the tests export these variables for the whole session.
RAY_TEST_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **LOCAL_RAY_ENV}


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, timeout: float = 180, autoscaling: dict[str, Any] | None = None) -> Iterator[LocalRay]:
    """The platform's private local Ray head (mer.components.ray_session.start_local_ray) with a job server, ended on
    exit. Workers and job drivers inherit the head's environment: the venv's `python` first on PATH (a job's
    entrypoint is run by name), one thread each, so that two folds fit two cores.

    `autoscaling`: a cluster config for Ray's fake multi-node provider (`provider.type: fake_multinode`, the
    provider behind `ray.cluster_utils.AutoscalingCluster`): the head runs Ray's autoscaler, which starts and stops
    worker nodes on this machine as demand comes and goes. The provider is pointed at this head's GCS port; its
    worker nodes inherit the head's environment (loopback address), join its temp dir and process session, and end
    with it."""
    env = {"MLFLOW_TRACKING_URI": None, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1", **NO_TELEMETRY}
    with tempfile.TemporaryDirectory(prefix="mer-as-") as config_dir:
        options: dict[str, str] = {}
        if autoscaling is not None:
            gcs = free_port()
            path = Path(config_dir) / "autoscaling.json"
            path.write_text(json.dumps({**autoscaling, "provider": {**autoscaling["provider"],
                                                                     "gcs_address": f"{LOOPBACK}:{gcs}"}}))
            options = {"port": str(gcs), "autoscaling-config": str(path)}
            # What AutoscalingCluster.start sets: the fake provider refuses to run without RAY_FAKE_CLUSTER.
            env |= {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        head = start_local_ray(num_cpus, dashboard=True, env=env, timeout=timeout, options=options)
        try:
            yield head
        finally:
            # SIGTERM, then SIGKILL to the whole session after 1 s: an ephemeral cluster has nothing to save, and
            # `ray start --block` does not end on SIGTERM within 30 s anyway (measured), so a longer grace is only
            # waited out.
            head.stop(timeout=1)
