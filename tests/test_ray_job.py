"""`ray job submit` of the LOSO driver to a real Ray head on 127.0.0.1: the cluster path of `python -m pipelines.loso`.

The head is started by this test (`ray start --head --block` in its own session, loopback only, free ports, its own
temp dir) and ended by killing that session, so other Ray instances on the machine are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, runs_by_kind, tiny_data, tiny_params

START_S = 120
JOB_S = 400
EXCLUDES = [".venv", "data", "runs", ".git", ".dvc/cache", "mlflow.db", "mlartifacts", "mlruns", "plots", "reports"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_head(url: str, head: subprocess.Popen, log: Path) -> None:
    """Until `ray start` reports the runtime started and the dashboard answers."""
    deadline = time.monotonic() + START_S
    while True:
        assert head.poll() is None, f"ray start exited (rc {head.returncode}); see {log}"
        if "Ray runtime started" in log.read_text(errors="replace"):
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5):
                    return
            except OSError:
                pass
        assert time.monotonic() < deadline, f"Ray head not up within {START_S}s; see {log}"
        time.sleep(1)


def _submit(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried (3 tries) while the head's job agent has not registered yet."""
    for _ in range(3):
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_S)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(10)
    return done


@pytest.mark.slow
def test_ray_job_submit_runs_the_driver(tiny_root: Path, tmp_path: Path) -> None:
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is the venv's
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind to 127.0.0.1, not the machine's address
           "RAY_AUTH_MODE": "disabled",  # an ephemeral loopback cluster of this test only
           "OMP_NUM_THREADS": "1"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    gcs, dashboard = _free_port(), _free_port()
    url = f"http://127.0.0.1:{dashboard}"
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay under 108 chars
    head_log = tmp_path / "ray-head.log"
    head = subprocess.Popen(
        [str(venv_bin / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={_free_port()}",
         # Every port explicit: the defaults (e.g. the agent's 52365) may be held by another Ray on this machine.
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        cwd=tmp_path, env=env, stdout=head_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_head(url, head, head_log)
        params = tiny_params(tmp_path, tiny_data(tmp_path), **{"tune.final_model": False})
        runtime_env = json.dumps({"excludes": EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1"}})
        submit = _submit(
            [str(venv_bin / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
             "--runtime-env-json", runtime_env, "--", "python", "-m", "pipelines.loso", "--params", str(params)], env)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in (submit.stdout + submit.stderr).lower()
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)

    summary = json.loads((tmp_path / "runs" / "results" / "summary.json").read_text())
    assert summary["folds"] == 4 and summary["metrics"]["n"] == 12
    assert len(list((tmp_path / "runs" / "tune").glob("*/folds/*/result.json"))) == 4
    runs = runs_by_kind(tmp_path)
    assert len(runs["parent"]) == 1 and len(runs["trial"]) == 1 and len(runs["fold"]) == 4
    assert all(r.info.status == "FINISHED" for kind in runs.values() for r in kind)
