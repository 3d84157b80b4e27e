"""Disk checks and `mer ingest`: exclusions are counted and written, strict mode fails with file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mer.components.ingest import ingest, output_paths
from mer.components.settings import parse_params
from mer.model.data import check_table, load_annotations, read_table
from mer.model.errors import DataError
from mer.pipelines.cli import main
from test_data_loaders import CASME2_HEADER, blank_frames, write_sheet


@pytest.fixture()
def casme2_root(tmp_path: Path) -> Path:
    """Four clips: complete, one frame missing, apex outside onset..offset, no frame folder; plus one 'fear'."""
    root = tmp_path / "casme2"
    write_sheet(root / "CASME2-coding-20140508.xlsx", [
        CASME2_HEADER,
        ["01", "EP01", 1, 2, 3, "12", "happiness"],
        ["01", "EP02", 1, 2, 3, "4", "disgust"],
        ["02", "EP03", 1, 5, 3, "4+7", "repression"],
        ["02", "EP04", 1, 2, 3, "14", "surprise"],
        ["02", "EP05", 1, 2, 3, "", "fear"],
    ])
    for clip, frames in {"EP01": (1, 2, 3), "EP02": (1, 3), "EP03": (1, 2, 3), "EP05": (1, 2, 3)}.items():
        blank_frames(root / ("sub01" if clip < "EP03" else "sub02") / clip, [f"img{n}.jpg" for n in frames])
    return root


def test_check_table(casme2_root: Path) -> None:
    table = load_annotations("casme2", casme2_root)
    kept, excluded, summary = check_table(table)
    assert kept["clip"].tolist() == ["EP01", "EP05"]
    assert dict(zip(excluded["clip"], excluded["reason"])) == {
        "EP02": "frames missing", "EP03": "apex outside onset..offset", "EP04": "frames not found"}
    assert summary.as_dict() == {"total": 5, "kept": 2, "warnings": {},
                                 "excluded": {"frames missing": 1, "apex outside onset..offset": 1,
                                              "frames not found": 1}}
    with pytest.raises(DataError, match=r"CASME2-coding-20140508.xlsx, row 3: casme2/sub01/EP02: frames missing"):
        check_table(table, strict=True)


def _params(root: Path, out: Path, **data: object):
    return parse_params({"data": {"source": "casme2", "root": str(root), "ingested": str(out / "annotations.csv"),
                                  **data}})


def test_ingest_writes_table_exclusions_summary(casme2_root: Path, tmp_path: Path) -> None:
    params = _params(casme2_root, tmp_path / "out")
    table = ingest(params)
    paths = output_paths(params)
    back = read_table(paths["table"])
    pd.testing.assert_frame_equal(back, table)
    assert back["sample_id"].tolist() == ["casme2/sub01/EP01"] and back["label"].tolist() == [0]
    assert back["au_coded"].dtype == bool and back["au_coded"].tolist() == [True]  # survives the CSV round trip
    exclusions = pd.read_csv(paths["exclusions"])
    assert dict(zip(exclusions["clip"], exclusions["stage"])) == {
        "EP05": "class_set", "EP02": "disk", "EP03": "disk", "EP04": "disk"}
    summary = json.loads(paths["summary"].read_text())
    assert summary["loaded"] == 5 and summary["ingested"] == 1 and summary["per_class"] == {"happiness": 1}
    assert summary["excluded"]["emotion 'fear' not in class set casme2_5"] == 1


def test_ingest_errors(casme2_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.root: directory not found"):
        ingest(_params(tmp_path / "absent", tmp_path))
    with pytest.raises(DataError, match="annotation file not found"):
        ingest(_params(casme2_root, tmp_path, annotation=str(tmp_path / "none.xlsx")))
    with pytest.raises(DataError, match="row 3: casme2/sub01/EP02: frames missing"):
        ingest(_params(casme2_root, tmp_path, strict=True))


def test_ingest_composite_cli(composite_dir: Path, annotations_dir: Path, tmp_path: Path) -> None:
    """The CLI path (`mer ingest --params ... -S ...`) on the real composite: 309 samples, nothing excluded."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"data:\n  source: megc2019\n  root: {composite_dir}\n  class_set: megc2019_3\n"
                           f"  au_sheets: {{casme2: {annotations_dir / 'CASME2-coding-20140508.xlsx'}}}\n")
    out = tmp_path / "ingested" / "annotations.csv"
    assert main(["ingest", "--params", str(params_file), "-S", f"data.ingested={out}"]) == 0
    summary = json.loads(out.with_name("annotations.summary.json").read_text())
    assert summary["ingested"] == 309 and summary["subjects"] == 40 and summary["excluded"] == {}
    assert summary["per_class"] == {"negative": 158, "positive": 83, "surprise": 68}
    assert summary["per_dataset"] == {"casme2": 145, "smic": 164}
