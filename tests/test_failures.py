"""Failure behaviour users must be able to trust: bad samples fail by id while the run completes and counts them,
output directories are checked before long work, a SIGTERM'd driver leaves no MLflow run RUNNING, and no credential
reaches MLflow, artifacts or logs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from components.common import check_output_dir
from mer_model.config import parse_params
from mer_model.data.schema import make_table
from mer_model.errors import ConfigError
from tests.servers import stop, tiny_params_file, wait_until
from tests.test_preprocess import write_clip
from tests.test_preprocess_stage import CHEAP

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRETKEY"
KEY_ID = "AKIAMERTESTKEYID0001"


def _record(subject: str, folder: Path) -> dict[str, object]:
    return {"dataset": "synthetic", "collection": "synthetic", "subject": f"synthetic/{subject}", "clip": "EP01",
            "onset": 10, "apex": 12, "offset": 15, "emotion": "happiness", "label": 0, "aus": "6+12",
            "au_raw": "6+12", "frames_dir": str(folder), "frame_template": "img{}.jpg", "n_frames": 6,
            "source_file": "sheet.xlsx", "source_row": 2}


def test_corrupt_image_and_empty_clip_fail_by_id_and_the_run_completes(tmp_path: Path) -> None:
    """Bytes that are no image at all, and a clip folder emptied after ingest: each sample fails with its id and the
    file, the good one is cached, and the manifest counts both. (This is the stage's own loop without Ray; the Ray
    stage itself, with missing and truncated frames, is covered by test_preprocess_stage.)"""
    from mer_model.preprocess import Cache, process_row

    root = tmp_path / "data"
    for subject in ("sub01", "sub02", "sub03"):
        write_clip(root / subject / "EP01")
    (root / "sub02/EP01/img12.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    for frame in (root / "sub03/EP01").iterdir():
        frame.unlink()
    table = make_table([_record(s, root / s / "EP01") for s in ("sub01", "sub02", "sub03")])
    params = parse_params({"preprocess": {**CHEAP, "out": str(tmp_path / "cache")}})
    cache = Cache(params.preprocess.out)
    todo, reused = cache.plan(table, params.preprocess)
    results = [process_row(row, params.preprocess, root) for row in table.to_dict("records")]
    for result in results:
        cache.write(result)
    manifest = cache.finish(table, results, reused, params.preprocess, {})
    assert len(todo) == 3 and (manifest["counts"]["ok"], manifest["counts"]["failed"]) == (1, 2)
    errors = {f["sample_id"]: f["error"] for f in manifest["failures"]}
    assert errors["synthetic/sub02/EP01"].startswith("sample synthetic/sub02/EP01: corrupt or unsupported image")
    assert "img12.jpg" in errors["synthetic/sub02/EP01"]
    assert errors["synthetic/sub03/EP01"].startswith("sample synthetic/sub03/EP01: frame file missing")
    index = pd.read_csv(tmp_path / "cache" / "index.csv", keep_default_na=False)
    assert index.set_index("sample_id")["status"].to_dict() == {
        "synthetic/sub01/EP01": "ok", "synthetic/sub02/EP01": "failed", "synthetic/sub03/EP01": "failed"}


def test_output_dir_check_fails_up_front_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^preprocess.out: .*/file/cache: output directory is not writable"):
        check_output_dir(tmp_path / "file" / "cache", "preprocess.out")
    with pytest.raises(ConfigError, match=r"^evaluate.report: .* MiB free on its disk, need at least"):
        check_output_dir(tmp_path / "ok", "evaluate.report", min_free_mb=2**40)
    assert check_output_dir(tmp_path / "ok", "evaluate.report") == tmp_path / "ok"
    assert list((tmp_path / "ok").iterdir()) == []  # the probe file is gone


def _grep(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _sqlite_statuses(db: Path) -> list[tuple[str, str]]:
    """(kind tag, status) of every run, read straight from the SQLite store (no MLflow client in the poll loop)."""
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        try:
            return conn.execute("SELECT COALESCE(t.value, ''), r.status FROM runs r LEFT JOIN tags t "
                                "ON t.run_uuid = r.run_uuid AND t.key = 'mer.kind'").fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []


@pytest.mark.slow
def test_sigterm_marks_runs_killed_and_no_credentials_leak(tmp_path: Path) -> None:
    """The whole tiny chain (synth -> ingest -> preprocess -> tune with MLflow) with AWS credentials in the
    environment. The first `mer tune` is sent SIGTERM once its parent run exists: no run may stay RUNNING, the
    parent must be KILLED. A second `mer tune` completes. Then neither the key id nor the secret may appear in run
    params, tags, artifacts, the tracking store, the Tune storage or any log."""
    tiny_params_file(tmp_path, **{"model.name": "htnet", "model.config": "small",
                                  "tracking.uri": "sqlite:///mlflow.db"})
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": KEY_ID, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "components.cli", "-v"]
    logs = []
    for stage in ("synth", "ingest", "preprocess"):
        result = subprocess.run([*command, stage], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"mer {stage}:\n{result.stderr[-3000:]}"
        logs.append(result.stdout + result.stderr)

    db = tmp_path / "mlflow.db"
    with (tmp_path / "killed.log").open("w") as out:
        driver = subprocess.Popen([*command, "tune"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until(lambda: any(kind == "parent" for kind, _ in _sqlite_statuses(db)), 300, "parent run", driver,
                   tmp_path / "killed.log")
        driver.send_signal(signal.SIGTERM)
        driver.wait(120)
    finally:
        stop(driver)  # the rest of its process group (Ray), if anything survived
    statuses = _sqlite_statuses(db)
    assert "RUNNING" not in {status for _, status in statuses}, statuses
    assert ("parent", "KILLED") in statuses, statuses
    logs.append((tmp_path / "killed.log").read_text())

    result = subprocess.run([*command, "tune"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mer tune after SIGTERM:\n{result.stderr[-3000:]}"
    logs.append(result.stdout + result.stderr)
    assert ("parent", "FINISHED") in _sqlite_statuses(db)
    assert not [log for log in logs if SECRET in log or KEY_ID in log]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert len(runs) >= 3  # parent, trial, folds
    for run in runs:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert SECRET not in text and KEY_ID not in text
    shutil.rmtree(tmp_path / "data", ignore_errors=True)  # frames and cache: no place a credential could be
    assert _grep(tmp_path, SECRET.encode()) == [] and _grep(tmp_path, KEY_ID.encode()) == []
