"""Failure behaviour users must be able to trust: bad samples fail by id while the run completes and counts them,
and output directories are checked before long work. (That no credential reaches MLflow, artifacts or logs is
checked on the tracked driver runs of test_resume.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mer.components.common import check_output_dir
from mer.components.settings import parse_params
from mer.model.data.schema import make_table
from mer.model.errors import ConfigError
from tests.test_preprocess import write_clip
from tests.test_preprocess_stage import CHEAP

REPO = Path(__file__).resolve().parents[1]


def _record(subject: str, folder: Path) -> dict[str, object]:
    return {"dataset": "synthetic", "collection": "synthetic", "subject": f"synthetic/{subject}", "clip": "EP01",
            "onset": 10, "apex": 12, "offset": 15, "emotion": "happiness", "label": 0, "aus": "6+12",
            "au_raw": "6+12", "frames_dir": str(folder), "frame_template": "img{}.jpg", "n_frames": 6,
            "source_file": "sheet.xlsx", "source_row": 2}


def test_corrupt_image_and_empty_clip_fail_by_id_and_the_run_completes(tmp_path: Path) -> None:
    """Bytes that are no image at all, and a clip folder emptied after ingest: each sample fails with its id and the
    file, the good one is cached, and the manifest counts both. (This is the stage's own loop without Ray; the Ray
    stage itself, with missing and truncated frames, is covered by test_preprocess_stage.)"""
    from mer.model.preprocess import Cache, process_row

    root = tmp_path / "data"
    for subject in ("sub01", "sub02", "sub03"):
        write_clip(root / subject / "EP01")
    (root / "sub02/EP01/img12.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    for frame in (root / "sub03/EP01").iterdir():
        frame.unlink()
    table = make_table([_record(s, root / s / "EP01") for s in ("sub01", "sub02", "sub03")])
    params = parse_params({"preprocess": {**CHEAP, "out": str(tmp_path / "cache")}})
    cache = Cache(params.preprocess.out)
    modalities = ("flow28", "frames128", "aus")
    todo = cache.plan(table, params.preprocess, modalities)
    for row in table.to_dict("records"):
        cache.write(process_row(row, params.preprocess, root, todo[row["sample_id"]]))
    manifest = cache.finish(table, params.preprocess, modalities, {})
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


def test_an_interrupted_preprocessing_run_keeps_what_it_finished(tmp_path: Path) -> None:
    """A run killed after some samples (no `finish`: no index.csv, no manifest) loses nothing it finished: the
    entries were journalled as they arrived and the next run reuses them."""
    from mer.model.preprocess import Cache, process_row

    root = tmp_path / "data"
    for subject in ("sub01", "sub02"):
        write_clip(root / subject / "EP01")
    table = make_table([_record(s, root / s / "EP01") for s in ("sub01", "sub02")])
    params = parse_params({"preprocess": {**CHEAP, "out": str(tmp_path / "cache")}})
    modalities = ("flow28", "aus")
    first = Cache(params.preprocess.out, flush_every=0)
    todo = first.plan(table, params.preprocess, modalities)
    first.write(process_row(table.iloc[0].to_dict(), params.preprocess, root, todo["synthetic/sub01/EP01"]))
    del first  # killed here
    assert not (tmp_path / "cache" / "index.csv").exists()
    again = Cache(params.preprocess.out)
    assert again.plan(table, params.preprocess, modalities) == {"synthetic/sub02/EP01": modalities}


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_an_interrupt_unwinds_first_then_the_runs_end_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             signame: str, code: int) -> None:
    """The interrupt handler only raises (Terminated, exit code 128 + the signal): what it interrupted unwinds and
    releases the store; then `end_all` marks the open runs KILLED (a handler that wrote itself waited on the
    interrupted write's SQLite lock and the runs stayed RUNNING). One Ctrl-C (SIGINT) is the same path as SIGTERM."""
    import os
    import signal

    from mer.components.tracking import Terminated
    from mer.components.settings import TrackingConfig
    from mer.components.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "test", "unknown")
    tracker.check()
    run, _ = tracker.open_run("k", "parent", {})
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        tracker.install_interrupt_handlers()
        with pytest.raises(Terminated) as raised:
            os.kill(os.getpid(), getattr(signal, signame))
        tracker.end_all("KILLED")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert raised.value.code == code and tracker.terminated
    assert tracker.client.get_run(run).info.status == "KILLED"


def test_sigterm_inside_a_store_write_is_delivered_again_outside_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM that interrupts the tracking store's own code (SQLAlchemy / sqlite3 / mlflow.store) does not unwind
    it -- that left the write's connection holding the SQLite lock, so marking the runs KILLED waited out the busy
    timeout per run -- but is sent again 0.2 s later and then ends the process as usual."""
    import signal
    import sys
    import time

    from mer.components.tracking import Terminated
    from mer.components.settings import TrackingConfig
    from mer.components.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "test", "unknown")
    tracker.check()
    run, _ = tracker.open_run("k", "parent", {})
    store_code: dict = {"__name__": "sqlalchemy.engine.default", "sys": sys}
    exec("def interrupted_frame():\n    return sys._getframe()", store_code)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        tracker.install_interrupt_handlers()
        handler = signal.getsignal(signal.SIGTERM)
        assert handler(signal.SIGTERM, store_code["interrupted_frame"]()) is None  # deferred, nothing raised
        assert not tracker.terminated
        with pytest.raises(Terminated) as raised:
            time.sleep(5)  # the re-sent signal arrives here, outside the store
        tracker.end_all("KILLED")
    finally:
        for sig, saved in previous.items():
            signal.signal(sig, saved)
    assert raised.value.code == 143 and tracker.terminated
    assert tracker.client.get_run(run).info.status == "KILLED"


def test_truncated_or_edited_results_are_refused_naming_the_file(tmp_path: Path, mer) -> None:  # noqa: ANN001
    """Before: `mer evaluate` on a predictions.csv cut to half its rows exited 0 with metrics over 36 of 72 samples.
    summary.json now records each results file's rows and SHA-256; a mismatch is one line naming the file, exit 2,
    and nothing is written."""
    from test_report import CLASSES, _predictions

    from mer.model.training.results import ExperimentSummary, FoldSummary, Results, read_results, write_results

    results = tmp_path / "results"
    predictions = _predictions()
    folds = [FoldSummary(key=f"k{s}", fold=s, protocol="fixed", leaky=False, selected_epoch=1, val_score=None,
                         history=[], test_metrics={}, class_names=CLASSES, wall_time=1.0, device="cpu")
             for s in predictions["subject"].unique()]
    write_results(results, Results(ExperimentSummary(experiment="x", protocol="fixed", leaky=False,
                                                     class_names=CLASSES, folds=len(folds)), predictions, folds))
    recorded = json.loads((results / "summary.json").read_text())["files"]
    assert recorded["predictions.csv"]["rows"] == len(predictions) == 36 and recorded["folds.json"]["rows"] == 9
    args = ["evaluate", "--params", str(REPO / "params.yaml"), "-S", f"tune.results={results}", "-S",
            "tracking.backend=none", "-S", f"evaluate.metrics={tmp_path / 'metrics.json'}", "-S",
            f"evaluate.plots={tmp_path / 'plots'}", "-S", f"evaluate.report={tmp_path / 'reports'}"]
    assert len(read_results(results).predictions) == 36  # as written: accepted

    lines = (results / "predictions.csv").read_text().splitlines(keepends=True)
    (results / "predictions.csv").write_text("".join(lines[:19]))  # the header and 18 of the 36 rows
    result = mer(*args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if ": error: " in x]
    assert f"{results / 'predictions.csv'}: does not match summary.json (written with 36 rows" in line, line
    assert not (tmp_path / "metrics.json").exists()

    (results / "predictions.csv").write_text("".join(lines))
    (results / "folds.json").write_text((results / "folds.json").read_text().replace('"fixed"', '"oracle"', 1))
    [line] = [x for x in mer(*args, cwd=tmp_path).stderr.splitlines() if ": error: " in x]
    assert f"{results / 'folds.json'}: does not match summary.json" in line, line


def test_a_stored_fold_whose_predictions_changed_is_trained_again(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A finished fold's predictions.csv cut short is not pooled: the fold counts as unfinished (and is trained
    again), with a warning naming the file."""
    from test_report import CLASSES, _predictions

    from mer.model.training.results import FoldSummary
    from mer.pipelines.engine.storage import FoldStorage

    storage = FoldStorage(str(tmp_path / "folds"))
    summary = FoldSummary(key="k1", fold="casme2/s1", protocol="fixed", leaky=False, selected_epoch=1,
                          val_score=None, history=[], test_metrics={}, class_names=CLASSES, wall_time=1.0,
                          device="cpu")
    storage.save(summary, _predictions())
    assert len(storage.load("k1")[1]) == 36
    csv = tmp_path / "folds" / "k1" / "predictions.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:10]))
    assert storage.summary("k1") is None and storage.load("k1") is None
    assert f"{csv}: does not match the digest in its result.json" in caplog.text


def _poison_entry(cache: Path, sample_id: str, modality: str, arrays: dict | None = None,
                  truncate: bool = False) -> Path:
    """Replace one cache entry: NaN arrays recorded with a matching size and SHA-256 (what a buggy writer or a
    hand edit leaves: only the values tell), or the file cut short (the record left as it was)."""
    import numpy as np

    from mer.model.io import digest
    from mer.model.preprocess.cache import encode_npz, entry_file

    path = cache / entry_file(sample_id, modality)
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    data = encode_npz(arrays or {modality: np.full((3, 28, 28), np.nan, np.float32)})
    path.write_bytes(data)
    entries = pd.read_csv(cache / "modalities.csv", dtype=str, keep_default_na=False)
    row = (entries["sample_id"] == sample_id) & (entries["modality"] == modality)
    entries.loc[row, ["bytes", "sha256"]] = [str(len(data)), digest(data)]
    entries.to_csv(cache / "modalities.csv", index=False)
    return path


def test_a_nan_cache_entry_is_recomputed_not_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: `mer preprocess` kept a NaN entry (with a matching digest) as "reused". Now the values are checked
    too, and the entry is recomputed with a warning naming its file."""
    from mer.model.preprocess import Cache, process_row

    root = tmp_path / "data"
    write_clip(root / "sub01" / "EP01")
    table = make_table([_record("sub01", root / "sub01" / "EP01")])
    params = parse_params({"preprocess": {**CHEAP, "out": str(tmp_path / "cache")}})
    modalities = ("flow28", "aus")
    cache = Cache(params.preprocess.out)
    todo = cache.plan(table, params.preprocess, modalities)
    cache.write(process_row(table.iloc[0].to_dict(), params.preprocess, root, todo["synthetic/sub01/EP01"]))
    cache.finish(table, params.preprocess, modalities, {})
    assert Cache(params.preprocess.out).plan(table, params.preprocess, modalities) == {}  # intact: reused
    path = _poison_entry(tmp_path / "cache", "synthetic/sub01/EP01", "flow28")
    assert Cache(params.preprocess.out).plan(table, params.preprocess, modalities) == {
        "synthetic/sub01/EP01": ("flow28",)}
    assert f"{path}: 'flow28' has NaN/inf values; recomputing the entry" in caplog.text


@pytest.mark.parametrize("fault", ["truncated npz", "NaN entry"])
def test_a_bad_cache_entry_stops_mer_tune_before_ray(tmp_path: Path, fault: str, mer) -> None:  # noqa: ANN001
    """Before: the file was named, but only after Ray started, in ~240 lines of three Ray tracebacks (rc 1). Now
    `mer tune`'s preflight reads every entry the model reads: one line naming the file, exit 2, and neither Tune
    state nor results are written."""
    from test_training_data import write_cache

    cache = write_cache(tmp_path / "cache", subjects=2, per_subject=2)
    path = _poison_entry(cache, "synthetic/s01/clip1", "flow28", truncate=fault == "truncated npz")
    result = mer("tune", "--params", str(REPO / "params.yaml"), "-S", f"preprocess.out={cache}", "-S",
                 "model.name=ststnet", "-S", "model.config=small", "-S", "tracking.backend=none", "-S",
                 f"tune.storage_path={tmp_path / 'tune'}", "-S", f"tune.results={tmp_path / 'results'}",
                 cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = [x for x in result.stderr.splitlines() if ": error: " in x]
    expected = ("cache entry changed since it was written" if fault == "truncated npz"
                else "'flow28' has NaN/inf values in its cache entry")
    assert line.startswith(f"mer tune: error: {path}: sample synthetic/s01/clip1: {expected}"), line
    assert not any((tmp_path / "tune").rglob("*.*")) and not any((tmp_path / "results").rglob("*"))
