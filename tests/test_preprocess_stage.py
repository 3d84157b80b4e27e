"""The `mer preprocess` stage on a tiny dataset with local Ray (2 CPUs, one Ray session for the module).

Covers: good and bad samples side by side (the bad ones are recorded per modality, the rest completes), the cache
layout and manifest, computing only what the model reads and then only what is missing, re-runs that redo only what is
missing, failed, changed or corrupt, a parameter change recomputing only the modalities it shapes, `data.strict`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from mer.components.preprocess import preprocess
from mer.components.settings import Params, parse_params
from mer.components.tracking.base import data_version
from mer.model.config import ModelConfig
from mer.model.data.schema import make_table
from mer.model.errors import ConfigError, DataError
from mer.model.preprocess.cache import params_hash
from mer.pipelines.cli import main
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


ALL = ["flow28", "points5", "onset224", "apex224", "frames128", "landmarks68", "flows128", "aus"]


def _with(params: Params, **preprocess: Any) -> Params:
    return params.model_copy(update={"preprocess": params.preprocess.model_copy(update=preprocess)})


def _entries(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "modalities.csv", dtype=str, keep_default_na=False).set_index(["sample_id", "modality"])


def _mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in (out / "samples").rglob("*.npz")}


def test_stage_records_failures_and_completes_the_rest(dataset: tuple[Params, Path]) -> None:
    params, _ = dataset
    manifest = preprocess(_with(params, modalities=ALL))
    out = Path(params.preprocess.out)
    counts = manifest["counts"]
    assert (counts["total"], counts["ok"], counts["failed"], counts["computed"]) == (5, 2, 3, 5)
    assert counts["face"] == {"dlib": 2}
    assert counts["excluded"] == {"frame file missing": 1, "corrupt image": 1, "apex outside onset..offset": 1}
    assert manifest["params_hash"] == params_hash(params.preprocess) and manifest["modalities"] == ALL
    assert manifest["preprocess"]["flow"]["lambda"] == 0.15 and manifest["versions"]["dlib"]
    assert manifest["class_names"] == ["happiness", "other"]
    assert manifest["coverage"] == {"usable": 2, "total": 5, "per_dataset": {"synthetic": {"usable": 2, "total": 5}}}

    index = pd.read_csv(out / "index.csv", dtype=str, keep_default_na=False).set_index("sample_id")
    assert set(index.columns) >= {"subject", "label", "status", "reason", "error", "modalities", "face", "estimated"}
    errors = index["error"].to_dict()
    assert "frame file missing" in errors["synthetic/sub03/EP01"] and "img12.jpg" in errors["synthetic/sub03/EP01"]
    assert "truncated JPEG" in errors["synthetic/sub03/EP02"] and "img15.jpg" in errors["synthetic/sub03/EP02"]
    assert "apex 9 outside onset..offset 10..15" in errors["synthetic/sub03/EP03"]
    assert {f["sample_id"] for f in manifest["failures"]} == {f"synthetic/sub03/EP0{k}" for k in (1, 2, 3)}
    # The truncated frame is the offset: it costs the sequence modalities only; the flow map and crops are kept.
    assert index.loc["synthetic/sub03/EP02", "modalities"] == "flow28+points5+onset224+apex224+aus"
    assert index.loc["synthetic/sub01/EP01", "modalities"] == "+".join(ALL)

    entries = _entries(out)
    assert entries.loc[("synthetic/sub03/EP02", "frames128"), "reason"] == "corrupt image"
    flow = entries.loc[("synthetic/sub01/EP01", "flow28")]
    assert flow["file"] == "samples/synthetic__sub01__EP01/flow28.npz" and flow["status"] == "ok"
    assert int(flow["bytes"]) == (out / flow["file"]).stat().st_size and len(flow["sha256"]) == 64
    with np.load(out / entries.loc[("synthetic/sub01/EP01", "frames128"), "file"]) as arrays:
        assert arrays["frames128"].shape == (3, 64, 64)
    with np.load(out / entries.loc[("synthetic/sub01/EP01", "landmarks68"), "file"]) as arrays:
        assert arrays["landmarks68"].shape == (3, 68, 2)
    with np.load(out / flow["file"]) as arrays:
        assert arrays["flow28"].dtype == np.float32 and set(arrays.files) == {"flow28"}
    with np.load(out / entries.loc[("synthetic/sub01/EP01", "aus"), "file"]) as arrays:
        assert set(arrays.files) == {"aus", "au_coded"}
    # The missing apex frame costs what needs it; the onset crop and the AUs of that sample are fine.
    assert {p.name for p in (out / "samples" / "synthetic__sub03__EP01").iterdir()} == {"aus.npz", "onset224.npz"}
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []  # atomic writes leave no temp files


def test_only_what_the_model_reads_and_then_only_what_is_missing(dataset: tuple[Params, Path]) -> None:
    """The default model (cva_fpf flow_small) reads flow28 and its AU targets: nothing else is computed. A model
    reading the sequence modalities (MOL) then adds them without recomputing flow28."""
    params = dataset[0].model_copy(update={"model": ModelConfig(name="cva_fpf", config="flow_small")})
    out = Path(params.preprocess.out)
    first = preprocess(params)
    assert first["modalities"] == ["flow28", "aus"]
    assert first["counts"]["modalities"]["flow28"] == {"ok": 3, "failed": 2, "unavailable": 0, "computed": 5,
                                                       "reused": 0}
    assert {p.name for p in (out / "samples" / "synthetic__sub01__EP01").iterdir()} == {"flow28.npz", "aus.npz"}
    flow_files = {k: v for k, v in _mtimes(out).items() if k.endswith("flow28.npz")}

    mol = params.model_copy(update={"model": params.model.model_copy(update={"name": "mol", "config": "small"})})
    second = preprocess(mol)
    assert second["modalities"] == ["frames128", "landmarks68", "flows128"]
    assert {k: v for k, v in _mtimes(out).items() if k.endswith("flow28.npz")} == flow_files  # kept, not rewritten
    index = pd.read_csv(out / "index.csv", dtype=str, keep_default_na=False).set_index("sample_id")
    assert index.loc["synthetic/sub01/EP01", "modalities"] == "flow28+frames128+landmarks68+flows128+aus"
    # The truncated offset frame costs MOL that sample; the flow model still has it.
    assert index.loc["synthetic/sub03/EP02", "status"] == "failed"
    assert index.loc["synthetic/sub03/EP02", "modalities"] == "flow28+aus"
    assert second["counts"]["ok"] == 2
    back = preprocess(params)["counts"]  # and back to the flow model: everything reused
    assert (back["ok"], back["reused"], back["computed"]) == (3, 3, 2)  # the two failed ones are retried
    # A re-run that changes nothing keeps the cache's data version (else every stored fold would be retrained):
    # manifest.json holds the content, not the invocation's computed / reused counts.
    version = data_version(out, out / "no-dvc.lock")
    assert preprocess(params)["counts"]["reused"] == 3 and data_version(out, out / "no-dvc.lock") == version
    stored = json.loads((out / "manifest.json").read_text())["counts"]
    assert "computed" not in stored and "reused" not in stored["modalities"]["flow28"]
    with pytest.raises(ConfigError, match="model.name: unknown model 'nope'"):
        preprocess(params.model_copy(update={"model": params.model.model_copy(update={"name": "nope"})}))


def test_rerun_redoes_only_missing_failed_changed_or_corrupt(dataset: tuple[Params, Path]) -> None:
    params = _with(dataset[0], modalities=ALL)
    preprocess(params)
    out = Path(params.preprocess.out)
    before = _mtimes(out)

    write_clip(Path(params.data.root) / "sub03/EP01")  # repair the missing frame
    (out / "samples/synthetic__sub02__EP01/onset224.npz").unlink()  # lose one cached entry
    flow = out / "samples/synthetic__sub01__EP01/flow28.npz"
    flow.write_bytes(flow.read_bytes()[:-7])  # a truncated entry is recomputed, not reused
    again = preprocess(params)["counts"]
    assert (again["reused"], again["computed"], again["ok"], again["failed"]) == (0, 5, 3, 2)
    assert again["modalities"]["onset224"]["computed"] == 2 and again["modalities"]["flow28"]["reused"] == 2
    after = _mtimes(out)
    unchanged = {k for k in before if k in after and before[k] == after[k]}
    assert "samples/synthetic__sub01__EP01/frames128.npz" in unchanged
    assert "samples/synthetic__sub01__EP01/flow28.npz" not in unchanged
    assert "samples/synthetic__sub02__EP01/flow28.npz" in unchanged

    # Without the two broken samples (retried on every run): a parameter outside the preprocess section leaves the
    # cache valid; a TV-L1 parameter recomputes the two flows and nothing else; face_size only the crops.
    table = pd.read_csv(params.data.ingested, dtype=str, keep_default_na=False)
    table[~table["clip"].isin(["EP02", "EP03"])].to_csv(params.data.ingested, index=False)
    other = params.model_copy(update={"train": params.train.model_copy(update={"epochs": 99})})
    assert preprocess(other)["counts"]["reused"] == 3
    changed = _with(params, flow=params.preprocess.flow.model_copy(update={"theta": 0.5}))
    assert params_hash(changed.preprocess) != params_hash(params.preprocess)
    redo = preprocess(changed)["counts"]["modalities"]
    assert {m: c["computed"] for m, c in redo.items() if c["computed"]} == {"flow28": 3, "flows128": 3}
    redo = preprocess(_with(changed, face_size=48))["counts"]["modalities"]
    assert {m: c["computed"] for m, c in redo.items() if c["computed"]} == {"onset224": 3, "apex224": 3}

    # A row dropped from the table takes its cached files with it; a changed row is recomputed.
    table = pd.read_csv(params.data.ingested, dtype=str, keep_default_na=False)
    table = table[table["sample_id"] != "synthetic/sub01/EP01"]
    table.loc[table["sample_id"] == "synthetic/sub02/EP01", "apex"] = "13"
    table.to_csv(params.data.ingested, index=False)
    last = preprocess(_with(changed, face_size=48))["counts"]
    assert (last["total"], last["reused"], last["computed"]) == (2, 1, 1)
    assert not (out / "samples" / "synthetic__sub01__EP01").exists()

    # An unreadable modalities.csv (e.g. truncated by hand) recomputes everything rather than trusting it.
    (out / "modalities.csv").write_text("sample_id,modal")
    assert preprocess(_with(changed, face_size=48))["counts"]["reused"] == 0


def test_strict_fails_with_one_line_and_keeps_what_was_finished(dataset: tuple[Params, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    params, params_file = dataset
    assert main(["preprocess", "--params", str(params_file), "-S", "data.strict=true"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line or "Traceback" in line]
    index = Path(params.preprocess.out) / "index.csv"
    assert len(err) == 1 and err[0].startswith(f"mer preprocess: error: {index}: data.strict: 2 samples excluded; "
                                               "first: sample synthetic/sub03/EP01: frame file missing: ")
    assert preprocess(params)["counts"]["reused"] == 3  # everything finished before the error is kept


def test_corrupt_ingest_summary_is_named(dataset: tuple[Params, Path]) -> None:
    params, _ = dataset
    summary = Path(params.data.ingested).with_name("annotations.summary.json")
    summary.write_text('{"classes": ["happ')
    with pytest.raises(DataError, match=rf"^{summary}: ingest summary \(re-run `mer ingest`\) is not valid JSON"):
        preprocess(params)


def test_cli_and_all_failed(dataset: tuple[Params, Path], capsys: pytest.CaptureFixture[str]) -> None:
    params, params_file = dataset
    table = pd.read_csv(params.data.ingested, dtype=str, keep_default_na=False)
    table[table["subject"] == "synthetic/sub03"].to_csv(params.data.ingested, index=False)
    assert main(["preprocess", "--params", str(params_file), "-S", "preprocess.seq_frames=3", "-S",
                 "preprocess.modalities=[flow28,frames128]"]) == 2
    assert "no sample could be preprocessed" in capsys.readouterr().err
    index = pd.read_csv(Path(params.preprocess.out) / "index.csv")
    assert (index["status"] == "failed").all() and len(index) == 3
    with pytest.raises(DataError, match="annotation table not found"):
        preprocess(params.model_copy(update={"data": params.data.model_copy(update={"ingested": "nope.csv"})}))
