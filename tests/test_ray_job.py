"""The README's `ray job submit` command (working directory uploaded, the runtime env's excludes) against the
session's Ray head (tests/conftest.py `session_ray`, started with a job server): the LOSO driver runs from the uploaded
copy of the repository and a bad input is one line in the job's log, the job FAILED.

The successful LOSO run as a Ray job (progress in the job's log, results, the leaky `oracle` tags, fold groups) is
made once, by the Kubeflow tune step's job (tests/test_kfp_pipeline.py `test_tune_step_runs_the_driver_as_a_ray_job`):
both submit the same driver to the same head, so a second end-to-end run here would check nothing new.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_data, tiny_params
from tests.servers import LocalRay

JOB_S = 400
# The README's list, anchored to the working directory (gitignore syntax): a bare "data" would also drop the package
# mer_model/data.
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
def test_ray_job_submit_uploads_the_repository_and_a_bad_input_is_one_line(tiny_root: Path, session_ray: LocalRay,
                                                                           tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is the venv's
           "OMP_NUM_THREADS": "1"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    # The session's tiny set, except the preprocessed cache, which is not there.
    params = tiny_params(tmp_path, tiny_data(tmp_path), **{"preprocess.out": str(tmp_path / "not-preprocessed")})
    runtime_env = json.dumps({"excludes": EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1"}})
    submit = _submit(
        [str(venv_bin / "ray"), "job", "submit", "--address", session_ray.dashboard, "--working-dir", ".",
         "--runtime-env-json", runtime_env, "--", "python", "-m", "mer.pipelines.loso", "--params", str(params)], env)
    output = submit.stdout + submit.stderr
    assert submit.returncode != 0 and "failed" in output.lower(), output[-6000:]
    # One error line (the CLI prints the job's log, then again in the failure's status message), no traceback.
    errors = {line for line in output.splitlines() if ": error: " in line or "Traceback" in line}
    assert len(errors) == 1, output[-6000:]
    (error,) = errors
    assert error.startswith("mer.pipelines.loso: error: ") and "no index.csv" in error and "exit code 2" in output, error

    # The job ran an uploaded copy of the repository (a package in the cluster's storage), not this checkout.
    jobs = JobSubmissionClient(session_ray.dashboard)
    (job,) = [j for j in jobs.list_jobs() if j.entrypoint.endswith(f"--params {params}")]
    assert job.status.value == "FAILED" and job.runtime_env["working_dir"].startswith("gcs://_ray_pkg_"), job
