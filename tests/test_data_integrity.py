"""Issue 12, ingest side: wrong data that looks valid is excluded with a one-line reason and counted (or refused
under `data.strict`), identifiers are compared in one normalised form, a re-saved sheet loads like the original, and a
corrupt file is named in one line. Tiny layouts are written here; nothing needs ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mer.pipelines.cli import main
from mer.components.ingest import ingest, output_paths
from mer.components.settings import parse_params
from mer.model.data import apply_class_set, check_table, load_annotations, read_table
from mer.model.data.loaders import subject_name
from mer.model.errors import DataError
from test_data_loaders import CASME2_HEADER, blank_frames, write_sheet

CASME3_HEADER = ["Subject", "Filename", "Onset", "Apex", "Offset", "AU", "Objective class", "emotion"]


def _params(source: str, root: Path, out: Path, **data: object):
    return parse_params({"data": {"source": source, "root": str(root), "ingested": str(out / "annotations.csv"),
                                  **data}})


def _exclusions(params) -> pd.DataFrame:
    return pd.read_csv(output_paths(params)["exclusions"], keep_default_na=False)


def _summary(params) -> dict:
    return json.loads(output_paths(params)["summary"].read_text())


# --------------------------------------------------------------------------------------- zero motion: onset == apex


def test_apex_on_the_onset_frame_is_excluded_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "casme2"
    write_sheet(root / "CASME2-coding-x.xlsx", [CASME2_HEADER, ["01", "EP01", 1, 1, 3, "12", "happiness"],
                                                ["01", "EP02", 1, 2, 3, "4", "disgust"]])
    for clip in ("EP01", "EP02"):
        blank_frames(root / "sub01" / clip, [f"img{n}.jpg" for n in (1, 2, 3)])
    params = _params("casme2", root, tmp_path / "out")
    assert ingest(params)["clip"].tolist() == ["EP02"]
    excluded = _exclusions(params).set_index("clip")
    assert excluded.loc["EP01", "reason"] == "apex equals onset (zero motion)"
    assert excluded.loc["EP01", "detail"] == "onset 1, apex 1" and excluded.loc["EP01", "source_row"] == 2
    assert _summary(params)["excluded"] == {"apex equals onset (zero motion)": 1}
    with pytest.raises(DataError, match=r"CASME2-coding-x.xlsx, row 2: casme2/sub01/EP01: apex equals onset"):
        ingest(_params("casme2", root, tmp_path / "strict", strict=True))


# ------------------------------------------------------------------------------------- duplicates, normalised ids


def test_the_same_clip_listed_twice_is_one_sample(tmp_path: Path) -> None:
    """Subjects written `01`, `1`, `sub02`, `02` (and 1.0 as Excel stores it): the repeats are excluded naming both
    rows; nothing becomes a `#2` sample."""
    root = tmp_path / "casme2"
    write_sheet(root / "CASME2-coding-x.xlsx", [
        CASME2_HEADER, ["01", "EP02_01f", 1, 2, 3, "12", "happiness"], ["sub02", "EP03_02", 1, 2, 3, "4", "disgust"],
        [1, "EP02_01f", 1, 2, 3, "12", "happiness"], ["02", "EP03_02", 1, 2, 3, "4", "disgust"],
        ["1.0", "EP02_01f", 1, 2, 3, "12", "happiness"]])
    blank_frames(root / "sub01" / "EP02_01f", ["img1.jpg", "img2.jpg", "img3.jpg"])
    blank_frames(root / "sub02" / "EP03_02", ["img1.jpg", "img2.jpg", "img3.jpg"])
    params = _params("casme2", root, tmp_path / "out")
    kept = ingest(params)
    assert kept["sample_id"].tolist() == ["casme2/sub01/EP02_01f", "casme2/sub02/EP03_02"]
    excluded = _exclusions(params)
    assert excluded["reason"].tolist() == ["duplicate row"] * 3 and excluded["source_row"].tolist() == [4, 5, 6]
    assert excluded["detail"].tolist() == [
        "the same sample as row 2 (casme2/sub01/EP02_01f); this is row 4",
        "the same sample as row 3 (casme2/sub02/EP03_02); this is row 5",
        "the same sample as row 2 (casme2/sub01/EP02_01f); this is row 6"]
    summary = _summary(params)
    assert (summary["loaded"], summary["ingested"], summary["excluded"]) == (5, 2, {"duplicate row": 3})
    with pytest.raises(DataError, match=r"row 4: casme2/sub01/EP02_01f#2: duplicate row \(the same sample as row 2"):
        ingest(_params("casme2", root, tmp_path / "strict", strict=True))


def test_casme3_several_samples_per_recording_but_not_the_same_one_twice(tmp_path: Path) -> None:
    """A CAS(ME)^3 recording legitimately holds several samples; only the same (subject, clip, onset, apex, offset)
    is a duplicate. The subject `1` is the folder `spNO.1` for the table AND for the frame folder."""
    root = tmp_path / "casme3"
    write_sheet(root / "casme3_table.xlsx", [
        CASME3_HEADER, ["spNO.1", "a", 1, 3, 5, "4", "III", "disgust"], ["spNO.1", "a", 6, 8, 9, "12", "I", "happy"],
        [1, "a", 1, 3, 5, "4", "III", "disgust"]])
    blank_frames(root / "spNO.1" / "a" / "color", [f"{n}.jpg" for n in range(1, 10)])
    table = load_annotations("casme3", root)
    assert table["sample_id"].tolist() == ["casme3/spNO.1/a", "casme3/spNO.1/a#2", "casme3/spNO.1/a#3"]
    assert (table["frames_dir"] == str(root / "spNO.1" / "a" / "color")).all()
    kept, excluded, summary = check_table(table)
    assert kept["sample_id"].tolist() == ["casme3/spNO.1/a", "casme3/spNO.1/a#2"]
    assert excluded["detail"].tolist() == ["the same sample as row 2 (casme3/spNO.1/a); this is row 4"]
    assert summary.excluded == {"duplicate row": 1}
    assert subject_name("casme3", "spno.01") == "spNO.1" and subject_name("samm", "6.0") == "006"
    with pytest.raises(DataError, match="row 7: Subject: 'x1' is not a CAS"):
        subject_name("casme3", "x1", file="s.xlsx", row=7)


# ---------------------------------------------------------------------------------------- missing key frames


def test_missing_key_frames_kept_where_preprocessing_can_estimate_them(tmp_path: Path) -> None:
    """A clip folder that is the clip: a missing apex / offset is kept (preprocessing estimates it). A CAS(ME)^3
    recording: a missing offset is kept for what needs only onset and apex; without apex AND offset nothing bounds
    the sample, so it is excluded."""
    root = tmp_path / "casme3"
    write_sheet(root / "casme3_table.xlsx", [
        CASME3_HEADER, ["spNO.1", "a", 2, 5, 0, "12", "I", "happy"], ["spNO.1", "a", 6, "", "", "4", "I", "disgust"]])
    blank_frames(root / "spNO.1" / "a" / "color", [f"{n}.jpg" for n in range(1, 10)])
    kept, excluded, summary = check_table(load_annotations("casme3", root))
    assert kept["sample_id"].tolist() == ["casme3/spNO.1/a"] and pd.isna(kept["offset"].iloc[0])
    assert excluded["reason"].tolist() == ["apex and offset not annotated"]
    assert summary.warnings == {"offset not annotated": 1}

    smic = tmp_path / "smic"
    write_sheet(smic / "smic_x.xlsx", [["subject", "clip", "label", "onset_frame", "apex_frame", "offset_frame"],
                                       [1, "s1_ne_01", 0, 10, 12, ""], [1, "s1_po_01", 1, 10, "", ""]])
    for clip in ("s1_ne_01", "s1_po_01"):
        blank_frames(smic / "s01" / clip, [f"image{n:06d}.jpg" for n in range(10, 16)])
    kept, excluded, summary = check_table(load_annotations("smic", smic))
    assert len(kept) == 2 and excluded.empty
    assert summary.warnings == {"offset not annotated": 1, "apex not annotated": 1}


# ------------------------------------------------------------------------------------------ the composite


def _flow_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (28, 28, 3), dtype=np.uint8))


COMPOSITE_ROWS = [  # dataset, sub (as distributed), filename_o, label, imagename
    ("casme2", "sub01", "EP02_01f", 1, "sub01_EP02_01f.jpg"),
    ("casme2", "sub02", "EP03_02", 0, "sub02_EP03_02.jpg"),
    ("samm", "006", "006_1_2", 0, "006_006_1_2.jpg"),
    ("smic", "s01", "s01_ne_01", 0, "s01_s1_ne_01.jpg"),
]


def write_composite(root: Path, rows=COMPOSITE_ROWS) -> Path:
    """A tiny composite in the distributed layout: the CSV (with the trailing empty column of the original) and a
    flow map per row, named `<sub>_<clip> .png`."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["dataset,sub,filename_o,label,apex,imagename,sub_filename"]
    for k, (dataset, sub, clip, label, image) in enumerate(rows):
        lines.append(f"{dataset},{sub},{clip},{label},,{image},")
        _flow_png(root / "datasets" / "STSNet_whole_norm_u_v_os" / f"{sub}_{clip} .png", k)
    (root / "combined_3_class2_for_optical_flow.csv").write_text("\n".join(lines) + "\n")
    return root


def test_composite_csv_resaved_by_a_spreadsheet_loads_exactly_like_the_original(tmp_path: Path) -> None:
    original = write_composite(tmp_path / "original")
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    (resaved / "datasets").symlink_to(original / "datasets")
    # BOM, CRLF, every field quoted, `006` -> `6`, integers as `1.0`, trailing empty columns.
    lines = ['"dataset","sub","filename_o","label","apex","imagename","sub_filename","",""']
    for dataset, sub, clip, label, image in COMPOSITE_ROWS:
        sub = "6" if sub == "006" else sub
        lines.append(f'"{dataset}","{sub}","{clip}","{float(label)}","","{image}","","",""')
    (resaved / "combined_3_class2_for_optical_flow.csv").write_bytes(
        b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    first = load_annotations("megc2019", original)
    second = load_annotations("megc2019", resaved)
    assert second["subject"].tolist() == ["casme2/sub01", "casme2/sub02", "samm/006", "smic/s01"]
    assert all(Path(p).is_file() for p in second["flow_path"])  # names built from the normalised subject
    pd.testing.assert_frame_equal(first.drop(columns=["source_file", "flow_path"]),
                                  second.drop(columns=["source_file", "flow_path"]))
    assert [Path(p).name for p in first["flow_path"]] == [Path(p).name for p in second["flow_path"]]


def test_composite_label_contradicting_the_joined_coding_sheet(tmp_path: Path) -> None:
    """The composite's label is checked against the joined CASME II sheet's emotion through the class set:
    disgust/repression -> negative agrees; happiness for a row the composite calls negative is excluded, naming
    both sheets and rows. A SMIC row is checked against the emotion its clip name codes."""
    mislabelled = ("smic", "s01", "s01_ne_02", 1, "s01_s1_ne_02.jpg")  # the clip name codes negative
    root = write_composite(tmp_path / "composite", COMPOSITE_ROWS + [mislabelled])
    sheet = write_sheet(tmp_path / "CASME2-coding-x.xlsx", [
        CASME2_HEADER, ["01", "EP02_01f", 1, 5, 9, "12", "happiness"], ["02", "EP03_02", 1, 5, 9, "12", "happiness"]])
    table = load_annotations("megc2019", root, au_sheets={"casme2": str(sheet)})
    assert table.set_index("clip").loc["EP03_02", ["coded_emotion", "coded_source"]].tolist() == [
        "happiness", "CASME2-coding-x.xlsx, row 3"]
    labelled, excluded = apply_class_set(table, "megc2019_3")
    assert len(labelled) == 3 and set(excluded["sample_id"]) == {"casme2/sub02/EP03_02", "smic/s01/s01_ne_02"}
    assert excluded["reason"].tolist() == ["label contradicts the dataset's coding"] * 2
    assert excluded["detail"].tolist() == [
        "combined_3_class2_for_optical_flow.csv, row 3 says negative (negative); CASME2-coding-x.xlsx, row 3 says "
        "happiness (positive)",
        "combined_3_class2_for_optical_flow.csv, row 6 says positive (positive); clip name s01_ne_02 says negative "
        "(negative)"]

    params = _params("megc2019", root, tmp_path / "out", class_set="megc2019_3", au_sheets={"casme2": str(sheet)})
    assert len(ingest(params)) == 3
    assert _summary(params)["excluded"] == {"label contradicts the dataset's coding": 2}
    assert _exclusions(params)["stage"].tolist() == ["class_set"] * 2
    with pytest.raises(DataError, match=r"optical_flow.csv, row 3: casme2/sub02/EP03_02: label contradicts .* says "
                                        r"happiness \(positive\)$"):
        ingest(_params("megc2019", root, tmp_path / "strict", class_set="megc2019_3", strict=True,
                       au_sheets={"casme2": str(sheet)}))


# ----------------------------------------------------------------------------------- corrupt files, one line


def test_truncated_coding_sheet_is_one_line_with_rc_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "casme2"
    sheet = write_sheet(root / "CASME2-coding-x.xlsx", [CASME2_HEADER, ["01", "EP01", 1, 2, 3, "12", "happiness"]])
    sheet.write_bytes(sheet.read_bytes()[:300])
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: casme2\n  root: {root}\n  ingested: {tmp_path / 'out' / 'a.csv'}\n")
    assert main(["ingest", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mer ingest: error: {sheet}: cannot read sheet (truncated or not a spreadsheet): "
                   "File is not a zip file"]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_truncated_annotation_table_is_named(tmp_path: Path) -> None:
    root = tmp_path / "casme2"
    write_sheet(root / "CASME2-coding-x.xlsx", [CASME2_HEADER, ["01", "EP01", 1, 2, 3, "12", "happiness"]])
    blank_frames(root / "sub01" / "EP01", ["img1.jpg", "img2.jpg", "img3.jpg"])
    params = _params("casme2", root, tmp_path / "out")
    ingest(params)
    table = output_paths(params)["table"]
    assert [p.name for p in table.parent.iterdir() if p.name.endswith(".tmp")] == []  # atomic: no temp files left
    table.write_text(table.read_text()[:150])
    with pytest.raises(DataError, match=rf"^{table}: not a valid annotation table \(re-run `mer ingest`\)"):
        read_table(table)
