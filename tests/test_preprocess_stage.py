"""The `mer preprocess` stage on a tiny dataset with local Ray (2 CPUs, one Ray session for the module).

Covers: good and bad samples side by side (the bad ones are recorded, the rest completes), the cache layout and
manifest, re-runs that redo only what is missing or failed, and a full recompute when a preprocessing parameter changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from components.preprocess import preprocess
from mer_model.config import Params, parse_params
from mer_model.data.schema import make_table
from mer_model.errors import DataError
from mer_model.preprocess.cache import params_hash
from pipelines.cli import main
from tests.test_preprocess import write_clip

ray = pytest.importorskip("ray")

CHEAP = {
    "seq_frames": 3, "seq_size": 64, "face_size": 64, "num_workers": 2,
    "flow": {"size": 64, "nscales": 2, "warps": 2, "inner_iterations": 5, "outer_iterations": 2, "median_filtering": 3},
}


pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the session (tests/conftest.py)


def _record(subject: str, clip: str, folder: Path, onset: int = 10, apex: int = 12, offset: int = 15) -> dict[str, Any]:
    return {"dataset": "synthetic", "collection": "synthetic", "subject": f"synthetic/{subject}", "clip": clip,
            "onset": onset, "apex": apex, "offset": offset, "emotion": "happiness", "label": 0, "aus": "6+12",
            "au_raw": "6+12", "frames_dir": str(folder), "frame_template": "img{}.jpg", "n_frames": 6,
            "source_file": "sheet.xlsx", "source_row": 2}


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Params, Path]:
    """Two good clips and three bad ones (missing frame, truncated JPEG, apex outside onset..offset)."""
    root = tmp_path / "data"
    for name in ("sub01/EP01", "sub02/EP01", "sub03/EP01", "sub03/EP02", "sub03/EP03"):
        write_clip(root / name)
    (root / "sub03/EP01/img12.jpg").unlink()  # a frame the sample needs (apex)
    jpg = root / "sub03/EP02/img15.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    records = [_record("sub01", "EP01", root / "sub01/EP01"), _record("sub02", "EP01", root / "sub02/EP01"),
               _record("sub03", "EP01", root / "sub03/EP01"), _record("sub03", "EP02", root / "sub03/EP02"),
               _record("sub03", "EP03", root / "sub03/EP03", apex=9)]
    ingested = tmp_path / "ingested" / "annotations.csv"
    ingested.parent.mkdir()
    make_table(records).to_csv(ingested, index=False)
    ingested.with_name("annotations.summary.json").write_text(json.dumps({"classes": ["happiness", "other"]}))
    raw = {"data": {"root": str(root), "ingested": str(ingested)},
           "preprocess": {**CHEAP, "out": str(tmp_path / "cache")}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    return parse_params(raw), params_file


def test_stage_records_failures_and_completes_the_rest(dataset: tuple[Params, Path]) -> None:
    params, _ = dataset
    manifest = preprocess(params)
    out = Path(params.preprocess.out)
    counts = manifest["counts"]
    assert (counts["total"], counts["ok"], counts["failed"], counts["computed"]) == (5, 2, 3, 5)
    assert counts["face"] == {"dlib": 2}
    assert manifest["params_hash"] == params_hash(params.preprocess)
    assert manifest["preprocess"]["flow"]["lambda"] == 0.15 and manifest["versions"]["dlib"]
    assert manifest["class_names"] == ["happiness", "other"]

    index = pd.read_csv(out / "index.csv", dtype=str, keep_default_na=False).set_index("sample_id")
    assert set(index.columns) >= {"subject", "label", "status", "error", "npz", "face"}
    errors = index["error"].to_dict()
    assert "frame file missing" in errors["synthetic/sub03/EP01"] and "img12.jpg" in errors["synthetic/sub03/EP01"]
    assert "truncated JPEG" in errors["synthetic/sub03/EP02"] and "img15.jpg" in errors["synthetic/sub03/EP02"]
    assert "apex 9 outside onset..offset 10..15" in errors["synthetic/sub03/EP03"]
    assert {f["sample_id"] for f in manifest["failures"]} == {f"synthetic/sub03/EP0{k}" for k in (1, 2, 3)}

    npz = out / index.loc["synthetic/sub01/EP01", "npz"]
    assert npz.name == "synthetic__sub01__EP01.npz"
    with np.load(npz) as arrays:
        assert arrays["frames128"].shape == (3, 64, 64) and arrays["landmarks68"].shape == (3, 68, 2)
        assert arrays["flow28"].dtype == np.float32 and arrays["flows128"].dtype == np.float16
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["synthetic__sub01__EP01.npz",
                                                                   "synthetic__sub02__EP01.npz"]


def test_rerun_redoes_only_missing_failed_or_changed(dataset: tuple[Params, Path]) -> None:
    params, _ = dataset
    preprocess(params)
    out = Path(params.preprocess.out)
    first = (out / "samples" / "synthetic__sub01__EP01.npz").stat().st_mtime_ns

    write_clip(Path(params.data.root) / "sub03/EP01")  # repair the missing frame
    (out / "samples" / "synthetic__sub02__EP01.npz").unlink()  # lose one cached sample
    again = preprocess(params)["counts"]
    assert (again["reused"], again["computed"], again["ok"], again["failed"]) == (1, 4, 3, 2)
    assert (out / "samples" / "synthetic__sub01__EP01.npz").stat().st_mtime_ns == first

    # A parameter outside the preprocess section leaves the cache valid; a flow parameter invalidates all of it.
    other = params.model_copy(update={"train": params.train.model_copy(update={"epochs": 99})})
    assert preprocess(other)["counts"]["reused"] == 3
    changed = params.preprocess.model_copy(update={"flow": params.preprocess.flow.model_copy(update={"theta": 0.5})})
    assert params_hash(changed) != params_hash(params.preprocess)
    redo = preprocess(params.model_copy(update={"preprocess": changed}))["counts"]
    assert (redo["reused"], redo["computed"]) == (0, 5)

    # A row dropped from the table takes its cached file with it; a changed row is recomputed.
    table = pd.read_csv(params.data.ingested, dtype=str, keep_default_na=False)
    table = table[table["sample_id"] != "synthetic/sub01/EP01"]
    table.loc[table["sample_id"] == "synthetic/sub02/EP01", "apex"] = "13"
    table.to_csv(params.data.ingested, index=False)
    last = preprocess(params.model_copy(update={"preprocess": changed}))["counts"]
    assert (last["total"], last["reused"], last["computed"]) == (4, 1, 3)
    assert not (out / "samples" / "synthetic__sub01__EP01.npz").exists()

    # A cache written before a schema column existed (its npz files lack e.g. au_coded) is recomputed.
    index = pd.read_csv(out / "index.csv", dtype=str, keep_default_na=False)
    index.drop(columns=["au_coded"]).to_csv(out / "index.csv", index=False)
    older = preprocess(params.model_copy(update={"preprocess": changed}))["counts"]
    assert (older["reused"], older["computed"]) == (0, 4)


def test_cli_and_all_failed(dataset: tuple[Params, Path], capsys: pytest.CaptureFixture[str]) -> None:
    params, params_file = dataset
    table = pd.read_csv(params.data.ingested, dtype=str, keep_default_na=False)
    table[table["subject"] == "synthetic/sub03"].to_csv(params.data.ingested, index=False)
    assert main(["preprocess", "--params", str(params_file), "-S", "preprocess.seq_frames=3"]) == 2
    assert "no sample could be preprocessed" in capsys.readouterr().err
    index = pd.read_csv(Path(params.preprocess.out) / "index.csv")
    assert (index["status"] == "failed").all() and len(index) == 3
    with pytest.raises(DataError, match="annotation table not found"):
        preprocess(params.model_copy(update={"data": params.data.model_copy(update={"ingested": "nope.csv"})}))
