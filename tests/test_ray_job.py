"""`ray job submit` of the LOSO driver to the session's Ray head (tests/conftest.py `session_ray`, started with a job
server): the cluster path of `python -m pipelines.loso`.

The job runs the `oracle` protocol, so this one end-to-end run also shows what a leaky experiment looks like: every
run tagged and named leaky, no final model promised, and the driver's fold progress in the job's log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, runs_by_kind, tiny_data, tiny_params
from tests.servers import LocalRay

JOB_S = 400
# Anchored to the working directory (gitignore syntax): a bare "data" would also drop the package mer_model/data.
EXCLUDES = ["/.venv", "/data", "/runs", "/.git", "/.dvc/cache", "/mlflow.db", "/mlartifacts", "/mlruns", "/plots",
            "/reports"]


def _submit(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried (3 tries) while the head's job agent has not registered yet."""
    for _ in range(3):
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_S)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(10)
    return done


@pytest.mark.slow
def test_ray_job_submit_runs_the_driver_and_an_oracle_run_is_tagged_leaky(tiny_root: Path, session_ray: LocalRay,
                                                                          tmp_path: Path) -> None:
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is the venv's
           "OMP_NUM_THREADS": "1"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    # Two Ray tasks of two folds each (fold-batched STSTNet): still one stored result and one tracked run per fold.
    params = tiny_params(tmp_path, tiny_data(tmp_path), **{"train.protocol": "oracle", "tune.final_model": False,
                                                            "tune.fold_group_size": 2})
    runtime_env = json.dumps({"excludes": EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1"}})
    submit = _submit(
        [str(venv_bin / "ray"), "job", "submit", "--address", session_ray.dashboard, "--working-dir", ".",
         "--runtime-env-json", runtime_env, "--", "python", "-m", "pipelines.loso", "--params", str(params)], env)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-6000:]
    assert "succeeded" in output.lower()
    # Progress without a terminal (the job's log): one line per finished fold, done/total with an ETA.
    progress = [line for line in output.splitlines() if "folds done" in line]
    assert len(progress) == 4 and "evaluate: 4/4 folds done" in progress[-1] and "ETA 00:00" in progress[-1], progress

    summary = json.loads((tmp_path / "runs" / "results" / "summary.json").read_text())
    assert summary["folds"] == 4 and summary["metrics"]["n"] == 12
    assert summary["protocol"] == "oracle" and summary["leaky"] is True and summary["model_uri"] is None
    assert len(list((tmp_path / "runs" / "tune").glob("*/folds/*/result.json"))) == 4
    # The trial reported each fold as it finished, without pooling all finished folds again each time (quadratic in
    # folds): pooled metrics are computed once, when the phase ends (Tune's own result.json of the trial).
    (reported,) = (tmp_path / "runs" / "tune").glob("*/*/evaluate/*/result.json")
    results = [json.loads(line) for line in reported.read_text().splitlines()]
    assert [r["folds_done"] for r in results] == [1, 2, 3, 4] and not any("uf1" in r for r in results)
    runs = runs_by_kind(tmp_path)
    every = [r for kind in runs.values() for r in kind]
    assert len(runs["parent"]) == 1 and len(runs["trial"]) == 1 and len(runs["fold"]) == 4
    assert all(r.info.status == "FINISHED" for r in every)
    assert all(r.data.tags["leaky"] == "true" and r.data.tags["protocol"] == "oracle" for r in every)
    assert all("oracle (leaky)" in r.info.run_name for r in every)
