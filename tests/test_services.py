"""Services that are down or misconfigured (issue 12, item 5): each is one line naming the setting, exit code 2,
within a bounded time and before anything else starts -- not minutes of retries or a traceback."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, TrackingStack, mer_process, tiny_data, tiny_params
from mer.model.errors import ServiceError
from tests.servers import free_port

BOUND_S = 180  # generous for a busy 2-core machine; the failure modes fixed here took minutes or hung


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if ": error: " in line]
    return line


def test_unreachable_ray_address_is_one_line_naming_the_setting(tiny_root: Path, tmp_path: Path) -> None:
    """`tune.ray_address` (mer tune) and RAY_ADDRESS (mer preprocess) pointing at a port nobody listens on."""
    dead = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    for name in ("tune", "preprocess"):
        (tmp_path / name).mkdir()
    params = tiny_params(tmp_path / "tune", tiny_data(tmp_path), **{"tune.ray_address": dead,
                                                                    "tracking.backend": "none"})
    fresh = tiny_params(tmp_path / "preprocess", tiny_data(tmp_path),
                        **{"preprocess.out": str(tmp_path / "preprocessed")})
    # The two commands are independent (nothing of Ray runs): started at once, as most of each one's time is its start.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        tune = pool.submit(mer_process, "tune", "--params", str(params), env=env, timeout=BOUND_S)
        preprocess = pool.submit(mer_process, "preprocess", "--params", str(fresh), env={**env, "RAY_ADDRESS": dead},
                                 timeout=BOUND_S)
    line = _one_error_line(tune.result())
    assert line.startswith("mer tune: error: tune.ray_address: " + dead) and "no Ray cluster reachable" in line
    line = _one_error_line(preprocess.result())
    assert line.startswith("mer preprocess: error: RAY_ADDRESS: " + dead) and "no Ray cluster reachable" in line


RAY_DASHBOARD_AGENT_DEFAULT_PORT = 52365  # where a Ray started by ray.init() puts its dashboard agent, unconfigurable


def test_two_mer_commands_start_their_own_local_ray_at_once(tiny_root: Path, tmp_path: Path) -> None:
    """Two `mer preprocess` commands started together, each with its own local Ray (no RAY_ADDRESS), while another
    program holds Ray's default dashboard-agent port: both finish every sample, and each command's private Ray
    (its temp dir, its processes) is gone when it exits."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    before = set(Path("/tmp").glob("mer-ray-*"))
    with contextlib.ExitStack() as stack:
        squatter = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        with contextlib.suppress(OSError):  # already held (another Ray on this machine): as good for this test
            squatter.bind(("", RAY_DASHBOARD_AGENT_DEFAULT_PORT))
            squatter.listen()
        commands = []
        for name in ("first", "second"):
            (tmp_path / name).mkdir()
            params = tiny_params(tmp_path / name, tiny_data(tmp_path),
                                 **{"preprocess.out": str(tmp_path / name / "preprocessed")})
            commands.append(subprocess.Popen([sys.executable, "-m", "mer.pipelines.cli", "preprocess", "--params",
                                              str(params)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True))
        results = []
        for proc in commands:
            try:
                _, err = proc.communicate(timeout=2 * BOUND_S)
            except subprocess.TimeoutExpired:
                for other in commands:
                    other.kill()
                raise
            results.append((proc.returncode, err))
    for code, err in results:
        assert code == 0 and "Traceback" not in err, err[-3000:]
        # Quiet without a terminal: no warning about a library (face-recognition-models' pkg_resources, in the Ray
        # workers too), no progress bar redrawn into the log, the progress said in lines.
        assert "pkg_resources" not in err and "DeprecationWarning" not in err, err[-3000:]
        assert "\r" not in err and "preprocess: 12/12 clips done" in err, err[-3000:]
    for name in ("first", "second"):
        manifest = json.loads((tmp_path / name / "preprocessed" / "manifest.json").read_text())
        counts = manifest["counts"]
        assert (counts["total"], counts["ok"], counts["failed"]) == (12, 12, 0), counts
    assert set(Path("/tmp").glob("mer-ray-*")) <= before, "a command left its local Ray's temp dir behind"


def test_ray_address_refusing_the_auth_token_is_one_line(tiny_root: Path, tmp_path: Path) -> None:
    """A cluster with token authentication joined without its token (Ray's C++ client retries with a warning per
    second, then Python raises a bare ConnectionError): one line naming RAY_ADDRESS and the auth mode, rc 2."""
    from mer.components.ray_session import start_local_ray

    head = start_local_ray(1, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)})
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN")}
        # Ray's own budget for joining a GCS, 2 tries instead of its default 20 (one a second): what is said after
        # the refusal is the same, the test only waits 18 s less for Ray to give up.
        env["RAY_gcs_server_port_wait_time_s"] = "2"
        params = tiny_params(tmp_path, tiny_data(tmp_path), **{"preprocess.out": str(tmp_path / "preprocessed")})
        result = mer_process("preprocess", "--params", str(params), env={**env, "RAY_ADDRESS": head.address},
                             timeout=BOUND_S)
    finally:
        head.stop(timeout=1)  # SIGKILL after 1 s (tests/servers.py ray_head: a graceful stop is only waited out)
    line = _one_error_line(result)
    assert line.startswith(f"mer preprocess: error: RAY_ADDRESS: {head.address}: the Ray cluster refused this "
                           "process's authentication (RAY_AUTH_MODE=disabled)"), line
    assert "InvalidAuthToken" not in result.stderr, result.stderr[-2000:]


def test_local_ray_start_failure_is_one_line() -> None:
    """`ray start` exiting, or a head not up within the bound (a machine too busy), is one ServiceError line naming
    local Ray, and nothing it started is left running."""
    from mer.components.ray_session import start_local_ray

    for kwargs, expected in (({"num_cpus": -1}, "local Ray: `ray start` exited with"),
                             ({"timeout": 0.5}, "local Ray: not started within 0.5 s")):
        before = set(Path("/tmp").glob("mer-ray-*"))
        with pytest.raises(ServiceError) as err:
            start_local_ray(**kwargs)
        assert str(err.value).startswith(expected) and "\n" not in str(err.value), err.value
        assert set(Path("/tmp").glob("mer-ray-*")) <= before


def test_a_local_ray_start_ray_gave_up_on_a_busy_machine_is_tried_once_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray waits a fixed 30 s for the head's raylet and then `ray start` exits (seen with three Ray heads starting at
    once on two cores): that one failure is tried again; any other failure, or the same one twice, is raised."""
    from mer.components import ray_session

    busy = ServiceError(f"local Ray: `ray start` exited with 1 (Exception: The current node {ray_session.BUSY_START}.)")
    outcomes: list[Any] = [busy, "head"]

    def attempt(*_: Any) -> Any:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(ray_session, "_start_head", attempt)
    assert ray_session.start_local_ray() == "head" and not outcomes
    outcomes[:] = [busy, busy, "head"]
    with pytest.raises(ServiceError, match=ray_session.BUSY_START):
        ray_session.start_local_ray()
    assert outcomes == ["head"]
    outcomes[:] = [ServiceError("local Ray: `ray start` exited with 1 (bad option)"), "head"]
    with pytest.raises(ServiceError, match="bad option"):
        ray_session.start_local_ray()


def test_tracking_server_down_is_one_line_naming_the_uri(tiny_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`mer tune` (before Ray or any run starts) and `mer predict` with a registry URI, the server not running."""
    from mer.pipelines.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    down = f"http://127.0.0.1:{free_port()}"
    params = tiny_params(tmp_path, tiny_data(tmp_path), **{"tracking.uri": down})
    for args in (["tune", "--params", str(params)], ["predict", "--params", str(params), "--model", "models:/m/1",
                                                     str(tmp_path)]):
        assert main(args) == 2
        [line] = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert f"tracking.uri: {down}: tracking server not reachable" in line, line


def test_bare_postgresql_uri_uses_the_installed_driver(tracking_stack: TrackingStack,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`postgresql://` as users write it (SQLAlchemy would pick psycopg 3, not installed) reaches the database."""
    from mer.components.tracking import tracking_uri
    from mer.components.settings import TrackingConfig
    from mer.components.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pg = tracking_stack.postgres
    bare = f"postgresql://{pg.user}:{pg.password}@{pg.host}:{pg.port}/mlflow"
    cfg = TrackingConfig(uri=bare, experiment="bare-postgresql")
    assert tracking_uri(cfg) == pg.uri("mlflow")
    assert "bare-postgresql" in MlflowTracker(cfg, "test", "unknown").check()


def test_report_compare_with_the_tracking_store_down_is_one_line_in_seconds(tmp_path: Path) -> None:
    """`mer report --compare` against an MLflow server, and a PostgreSQL store, that nobody serves: one line naming
    the URI within seconds (it retried for minutes: no result after 241 s for the server, rc 1 and two tracebacks
    after 109 s for PostgreSQL)."""
    import time

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    port = free_port()
    for uri, shown in ((f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}"),
                       (f"postgresql://mer:secret@127.0.0.1:{port}/mlflow",
                        f"postgresql+psycopg2://***@127.0.0.1:{port}/mlflow")):
        params = tiny_params(tmp_path, **{"tracking.uri": uri})
        start = time.monotonic()
        line = _one_error_line(mer_process("report", "--compare", "--params", str(params), env=env, timeout=BOUND_S))
        assert time.monotonic() - start < 60, "not bounded"
        assert line.startswith(f"mer report: error: tracking.uri: {shown}: tracking server not reachable ("), line
        assert "Connection refused" in line and "secret" not in line


def test_tracking_uri_with_credentials_reaches_the_server(tracking_stack: TrackingStack,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`http://user:pw@host:port`, which MLflow's client sends as basic auth, passes the reachability check (it was
    refused as "not reachable (Name or service not known)"); the credentials appear nowhere in what is said."""
    from mer.components.settings import TrackingConfig
    from mer.components.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_stack.uri.replace("http://", "http://mer-user:p%40ss@")
    said = MlflowTracker(TrackingConfig(uri=uri, experiment="with-credentials"), "test", "unknown").check()
    assert "with-credentials" in said and "p%40ss" not in said and "mer-user" not in said


_OPEN_STORE = """
import sys
from mer.components.settings import TrackingConfig
from mer.components.tracking.mlflow_tracker import MlflowTracker
tracker = MlflowTracker(TrackingConfig(uri=sys.argv[1], experiment="mer"), "test", "unknown")
tracker.check()
run, _ = tracker.open_run(sys.argv[2], "run", {})
tracker.end_run(run)
"""


def test_six_processes_opening_a_new_sqlite_store_at_once(tmp_path: Path) -> None:
    """Six processes creating the same new SQLite store, its experiment and a run each at once: all succeed and the
    store is usable after (MLflow creates and migrates a store without a lock: 5 of 6 failed with tracebacks, and two
    concurrent `mer tune` left it unusable); `store_lock` serialises that."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_STORE, uri, f"key-{i}"], cwd=REPO, env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(6)]
    results = [(proc.wait(timeout=2 * BOUND_S), proc.stderr.read()) for proc in procs]
    assert all(code == 0 and "Traceback" not in err for code, err in results), results
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "mer"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_artifact_store_dying_mid_run_is_one_line_and_no_run_stays_running(tiny_root: Path, tmp_path: Path) -> None:
    """`mer tune` against an MLflow server whose S3 artifact store (moto) is killed once the first fold is stored:
    the next artifact upload fails (after MLflow's retries, one here to keep the test short), the command ends with
    one line naming the tracking store, exit 2, and every run it opened is ended FAILED (7 tracebacks before)."""
    import sqlite3
    import time

    from tests.servers import kill_server, mlflow_server, s3_env, s3_server

    backend = tmp_path / "backend.db"
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(s3_server(buckets=("artifacts",)))
        uri = stack.enter_context(mlflow_server(f"sqlite:///{backend}", "s3://artifacts/mlflow", s3_env(endpoint)))
        params = tiny_params(tmp_path, tiny_data(tmp_path), **{"tracking.uri": uri, "tune.folds_per_trial": 1})
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        log = tmp_path / "tune.log"
        proc = subprocess.Popen([sys.executable, "-m", "mer.pipelines.cli", "tune", "--params", str(params)], cwd=REPO,
                                env={**env, "OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"},
                                stdout=subprocess.DEVNULL, stderr=log.open("w"))
        try:
            deadline = time.monotonic() + BOUND_S
            while not list((tmp_path / "runs" / "tune").glob("*/folds/*/result.json")):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            kill_server(endpoint)  # the artifact store dies; the MLflow server and its backend store stay up
            code = proc.wait(timeout=BOUND_S)
        finally:
            proc.kill()
    stderr = log.read_text()
    assert code == 2, stderr[-4000:]
    line = _one_error_line(subprocess.CompletedProcess([], code, "", stderr))
    assert line.startswith(f"mer tune: error: tracking store {uri}: log_"), line
    with sqlite3.connect(f"file:{backend}?mode=ro", uri=True) as db:
        statuses = [status for (status,) in db.execute("SELECT status FROM runs")]
    assert statuses and "RUNNING" not in statuses, statuses

