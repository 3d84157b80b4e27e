"""Killing the LOSO driver and starting it again: finished folds are not recomputed, MLflow runs are not duplicated,
and the killed driver's runs end KILLED (SIGTERM) or are marked FAILED by the next start (SIGKILL). A second driver
started on the same experiment while one runs is refused in one line and touches none of its runs.

The drivers run with AWS credentials in their environment and debug logging, so the same tracked run (params, tags,
fold artifacts, the final model) also shows that no credential reaches MLflow, the Tune storage, artifacts or logs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import REPO, runs_by_kind, tiny_data, tiny_params

FOLDS = 4
DEADLINE_S = 300
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRETKEY"
KEY_ID = "AKIAMERTESTKEYID0001"


def _start(params: Path, log: Path) -> subprocess.Popen:
    """The driver (joining the session's Ray through RAY_ADDRESS) in its own session, so that it can be ended as one
    process group; with credentials in its environment that must never be written anywhere."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": KEY_ID}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "pipelines.loso", "-v", "--params", str(params)], cwd=REPO, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _end_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray processes the driver left behind
        except ProcessLookupError:
            pass


def _finished_folds(storage: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in storage.glob("*/folds/*/result.json")}


def _kill_after(params: Path, log: Path, storage: Path, done: int, sig: int,
                ready: Callable[[], bool] = lambda: True) -> dict[Path, int]:
    """Run the driver until `done` folds are stored and `ready()` holds, then send `sig`; returns the stored folds.

    `ready` guards against a fold file written by a worker of the previous, already killed driver: the kill must land
    while THIS driver is at work.
    """
    proc = _start(params, log)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while len(_finished_folds(storage)) < done or not ready():
            assert proc.poll() is None, f"driver exited early (rc {proc.returncode}); see {log}"
            assert time.monotonic() < deadline, f"no {done} folds within {DEADLINE_S}s; see {log}"
            time.sleep(0.5)
        finished = _finished_folds(storage)
    finally:
        _end_group(proc, sig)
    assert len(finished) < FOLDS, "the driver finished before it could be killed; make the folds slower"
    return finished


@pytest.mark.slow
def test_killed_driver_resumes_without_recomputing_or_duplicating(tiny_root: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from components.tracking import EXPERIMENT_KEY_TAG
    from components.tracking.mlflow_tracker import MlflowTracker
    from mer_model.config import TrackingConfig

    # Folds one at a time, long enough (60 epochs) that a kill lands between two of them (30 were too few on a busy
    # machine: a killed driver's last fold task may still finish beside the next driver's).
    params = tiny_params(tmp_path, tiny_data(tmp_path), **{"train.epochs": 60, "tune.folds_per_trial": 1})
    storage = tmp_path / "runs" / "tune"
    log = tmp_path / "driver.log"

    first = _kill_after(params, log, storage, 1, signal.SIGTERM)
    runs = runs_by_kind(tmp_path)
    (parent,) = runs["parent"]
    assert parent.info.status == "KILLED"  # the SIGTERM handler ended it
    assert all(r.info.status != "RUNNING" for kind in runs.values() for r in kind)

    def parent_running() -> bool:
        return any(r.info.status == "RUNNING" for r in runs_by_kind(tmp_path)["parent"])

    second = _kill_after(params, log, storage, len(first) + 1, signal.SIGKILL, parent_running)
    assert all(second[p] == mtime for p, mtime in first.items())  # not recomputed
    stale = [r for kind in runs_by_kind(tmp_path).values() for r in kind if r.info.status == "RUNNING"]
    assert stale, "a SIGKILLed driver leaves RUNNING runs behind"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_key = parent.data.tags[EXPERIMENT_KEY_TAG]
    # What the next start does first: the dead driver's runs become FAILED, not RUNNING forever.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # another test's mlflow.set_tracking_uri sets it
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "test", "unknown")
    tracker.experiment_id = stale[0].info.experiment_id
    assert tracker.fail_stale_runs(experiment_key) == len(stale)
    assert all(client.get_run(r.info.run_id).info.status == "FAILED" for r in stale)

    # Two drivers of the same experiment at once: one takes the experiment's lock and finishes; the other is refused
    # with one line (exit code 2) and leaves the first one's live runs alone (they all end FINISHED below).
    logs = [tmp_path / "driver-a.log", tmp_path / "driver-b.log"]
    procs = [_start(params, path) for path in logs]
    try:
        codes = [proc.wait(timeout=DEADLINE_S) for proc in procs]
    finally:
        for proc in procs:
            _end_group(proc, signal.SIGKILL)
    assert sorted(codes) == [0, 2], f"see {logs}"
    refused = logs[codes.index(2)]
    errors = [line for line in refused.read_text().splitlines() if ": error: " in line or "Traceback" in line]
    assert len(errors) == 1 and "already being run by another driver" in errors[0], errors
    final = _finished_folds(storage)
    assert len(final) == FOLDS
    assert all(final[p] == mtime for p, mtime in second.items())  # finished folds were read back, not retrained

    runs = runs_by_kind(tmp_path)
    assert len(runs["parent"]) == 1 and runs["parent"][0].info.run_id == parent.info.run_id
    assert len(runs["trial"]) == 1
    fold_names = sorted(r.data.tags["fold"] for r in runs["fold"])
    assert fold_names == sorted(set(fold_names)) and len(fold_names) == FOLDS  # one run per fold, no duplicates
    assert all(r.info.status == "FINISHED" for kind in runs.values() for r in kind)

    # No credential anywhere: run params and tags, the tracking store, Tune storage, artifacts (the final model and
    # the fold predictions were written), the drivers' debug logs.
    assert all(SECRET not in f.read_text() and KEY_ID not in f.read_text() for f in (log, *logs))
    for run in [r for kind in runs.values() for r in kind]:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert SECRET not in text and KEY_ID not in text
    assert any(tmp_path.rglob("MLmodel")) and any(tmp_path.rglob("predictions.csv"))
    assert _grep(tmp_path, SECRET.encode()) == [] and _grep(tmp_path, KEY_ID.encode()) == []


def _grep(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _wait_for(proc: subprocess.Popen, log: Path, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        assert proc.poll() is None, f"driver exited (rc {proc.returncode}) before {what}; see {log}"
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S}s; see {log}"
        time.sleep(0.3)


def _ctrl_c(proc: subprocess.Popen) -> int:
    """One Ctrl-C as a terminal sends it (SIGINT to the foreground process group); the driver's exit code."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=90)
    finally:
        _end_group(proc, signal.SIGKILL)


@pytest.mark.slow
def test_one_ctrl_c_stops_the_search_and_the_final_model_like_sigterm(tiny_root: Path, tmp_path: Path) -> None:
    """One SIGINT during the search, and one while the final model trains: each ends the driver (exit code 130),
    its runs KILLED, no results written (Ray Tune's own handler used to stop the search gracefully: the driver went
    on, trained the final model and exited 0 with a summary that said 4 trials after 2 ran). The next start reuses
    the folds finished before each interrupt and records the trials that ran."""
    params = tiny_params(tmp_path, tiny_data(tmp_path), **{
        "train.epochs": 20, "tune.folds_per_trial": 1, "tune.max_concurrent_trials": 1, "tune.num_samples": 2,
        "tune.search_folds": 2, "tune.search_space": {"train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}})
    storage, summary = tmp_path / "runs" / "tune", tmp_path / "runs" / "results" / "summary.json"

    def nothing_running() -> bool:
        return all(r.info.status != "RUNNING" for kind in runs_by_kind(tmp_path).values() for r in kind)

    log = tmp_path / "search.log"
    proc = _start(params, log)
    _wait_for(proc, log, lambda: len(_finished_folds(storage)) >= 1, "a stored search fold")
    assert _ctrl_c(proc) == 130, log.read_text()[-3000:]
    first = _finished_folds(storage)
    assert len(first) < 4 and not summary.exists(), "the search went on after the Ctrl-C"
    (parent,) = runs_by_kind(tmp_path)["parent"]
    assert parent.info.status == "KILLED" and nothing_running()

    log = tmp_path / "final.log"
    proc = _start(params, log)
    _wait_for(proc, log, lambda: "final model: training" in log.read_text(), "the final model")
    assert _ctrl_c(proc) == 130, log.read_text()[-3000:]
    assert not summary.exists(), "the driver went on after a Ctrl-C during the final model"
    assert runs_by_kind(tmp_path)["parent"][0].info.status == "KILLED" and nothing_running()
    second = _finished_folds(storage)
    assert all(second[p] == mtime for p, mtime in first.items())  # the search's folds were read back

    log = tmp_path / "resumed.log"
    proc = _start(params, log)
    try:
        assert proc.wait(timeout=DEADLINE_S) == 0, log.read_text()[-3000:]
    finally:
        _end_group(proc, signal.SIGKILL)
    assert all(_finished_folds(storage)[p] == mtime for p, mtime in second.items())  # every fold reused
    search = json.loads(summary.read_text())["search"]
    assert (search["num_samples"], search["trials"]) == (2, 2)
    runs = runs_by_kind(tmp_path)
    assert all(r.info.status == "FINISHED" for kind in runs.values() for r in kind)
