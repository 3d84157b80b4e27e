"""Loaders against the real public sheets (row counts, quirks) and tiny on-disk frame layouts made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mer.model.data import frame_file, load_annotations, validate_table
from mer.model.errors import ConfigError, DataError

CASME2_SHEET = "CASME2-coding-20140508.xlsx"


def write_sheet(path: Path, rows: list[list[object]]) -> Path:
    """rows[0] is the header (or a title block precedes it): written verbatim, no pandas header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_excel(path, header=False, index=False)
    return path


def blank_frames(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"\xff\xd8\xff\xd9")  # frames are only located and counted here, never decoded


# --- real sheets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "sheet", "rows", "subjects", "first_id"),
    [
        ("casme2", CASME2_SHEET, 255, 26, "casme2/sub01/EP02_01f"),
        ("samm", "SAMM.xlsx", 159, 29, "samm/006/006_1_2"),
        ("smic", "smic_apex.xlsx", 164, 16, "smic/s20/s20_ne_01"),
        ("casme3", "casme3_table.xlsx", 860, 94, "casme3/spNO.1/a"),
    ],
)
def test_real_sheets(annotations_dir: Path, source: str, sheet: str, rows: int, subjects: int, first_id: str) -> None:
    table = load_annotations(source, annotations_dir, annotations_dir / sheet)
    validate_table(table)
    assert len(table) == rows
    assert table["subject"].nunique() == subjects
    assert table["sample_id"].iloc[0] == first_id
    assert (table["collection"] == source).all() and (table["dataset"] == source).all()
    assert table["source_row"].iloc[0] == 2  # header on line 1
    assert (table["frames_dir"] == "").all() and (table["n_frames"] == 0).all()  # no frames beside the sheets


def test_real_sheet_quirks(annotations_dir: Path) -> None:
    smic = load_annotations("smic", annotations_dir, annotations_dir / "smic_apex.xlsx")
    assert smic["offset"].isna().sum() == 7  # the public sheet lacks 7 offsets: kept as missing, not 0
    assert set(smic["emotion"]) == {"negative", "positive", "surprise"}
    assert "smic/s03/s3_ne_05" in set(smic["sample_id"])  # single-digit subject: sheet clip name kept
    casme3 = load_annotations("casme3", annotations_dir, annotations_dir / "casme3_table.xlsx")
    assert {"casme3/spNO.1/e", "casme3/spNO.1/e#2"} <= set(casme3["sample_id"])  # repeated filename, distinct ids
    assert casme3.loc[casme3["subject"] == "casme3/spNO.40", "offset"].isna().sum() == 2  # Offset 0 = not annotated
    samm = load_annotations("samm", annotations_dir, annotations_dir / "SAMM.xlsx")
    assert samm.set_index("clip").loc["006_1_6", "aus"] == "4+7+43"


def test_default_sheet_is_found_under_root(annotations_dir: Path) -> None:
    assert len(load_annotations("casme2", annotations_dir, frames=False)) == 255


# --- composite ---------------------------------------------------------------------------------------------------


def test_composite(composite_dir: Path, annotations_dir: Path) -> None:
    table = load_annotations("megc2019", composite_dir,
                             au_sheets={"casme2": str(annotations_dir / CASME2_SHEET),
                                        "samm": str(annotations_dir / "SAMM.xlsx")})
    validate_table(table)
    assert len(table) == 309 and table["subject"].nunique() == 40
    assert (table["collection"] == "megc2019").all()
    assert table["dataset"].value_counts().to_dict() == {"smic": 164, "casme2": 145}
    assert table["emotion"].value_counts().to_dict() == {"negative": 158, "positive": 83, "surprise": 68}
    assert all(Path(p).is_file() for p in table["flow_path"])  # '<sub>_<clip> .png', space included
    points = np.array([list(map(float, p.split(","))) for p in table["points5"]])
    assert points.shape == (309, 10) and points.min() >= 0 and points.max() <= 28
    # landmarks5_28px.csv's `source`: dlib rows read as given, the whole-image fallback rows marked as estimated
    assert table["points5_estimated"].value_counts().to_dict() == {"": 285, "whole_image_box": 24}
    casme2 = table[table["dataset"] == "casme2"].set_index("sample_id")
    assert (casme2["aus"] != "").all() and casme2["onset"].notna().all()  # joined from the CASME II sheet
    assert casme2.loc["casme2/sub01/EP02_01f", "aus"] == "12" and casme2.loc["casme2/sub01/EP02_01f", "apex"] == 59
    assert (table.loc[table["dataset"] == "smic", "aus"] == "").all()  # SMIC has no AU coding
    # ... so its empty `aus` means "not coded", unlike a coded CASME II row without AUs.
    assert table.groupby("dataset")["au_coded"].agg(["all", "any"]).to_dict("index") == {
        "casme2": {"all": True, "any": True}, "smic": {"all": False, "any": False}}


def test_composite_without_au_sheets_and_bad_au_dataset(composite_dir: Path) -> None:
    table = load_annotations("megc2019", composite_dir)
    assert (table["aus"] == "").all() and table["onset"].isna().all()
    assert not table["au_coded"].any()  # no AU sheets joined: nothing is coded
    with pytest.raises(ConfigError, match="data.au_sheets.smic"):
        load_annotations("megc2019", composite_dir, au_sheets={"smic": "x.xlsx"})


# --- frame layouts -----------------------------------------------------------------------------------------------

CASME2_HEADER = ["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "Action Units", "Estimated Emotion"]


@pytest.mark.parametrize(("subfolder", "prefix"), [("", "img"), ("CASME2_RAW_selected", "img"), ("Cropped", "reg_img")])
def test_casme2_frames(tmp_path: Path, subfolder: str, prefix: str) -> None:
    write_sheet(tmp_path / "CASME2-coding-test.xlsx",
                [CASME2_HEADER, [1, "EP02_01f", 46, 48, 50, "R12", "happiness"],
                 ["02", "EP03_02", 3, "/", 5, "4+L10", "disgust"]])
    blank_frames(tmp_path / subfolder / "sub01" / "EP02_01f", [f"{prefix}{n}.jpg" for n in range(46, 51)])
    blank_frames(tmp_path / subfolder / "sub02" / "EP03_02", [f"{prefix}{n}.jpg" for n in (3, 5)])  # 4 missing
    table = load_annotations("casme2", tmp_path)
    first, second = table.iloc[0], table.iloc[1]
    assert first["subject"] == "casme2/sub01" and first["aus"] == "12" and first["n_frames"] == 5
    assert first["frame_template"] == f"{prefix}{{}}.jpg"
    assert frame_file(first, 47) == tmp_path / subfolder / "sub01" / "EP02_01f" / f"{prefix}47.jpg"
    assert pd.isna(second["apex"]) and second["n_frames"] == 2 and second["aus"] == "4+10"
    assert table["au_coded"].tolist() == [True, True]


def test_samm_v2_header_below_title(tmp_path: Path) -> None:
    header = ["Subject", "Filename", "Inducement Code", "Onset Frame", "Apex Frame", "Offset Frame", "Duration",
              "Micro", "Action Units", "Estimated Emotion", "Objective Classes", "Notes"]
    title = ["SAMM micro-movement FACS codes v2"] + [None] * 11
    write_sheet(tmp_path / "SAMM_Micro_FACS_Codes_v2.xlsx",
                [title, [None] * 12, header, [6, "006_1_2", 1, 5562, 5564, 5566, 5, "Micro", "4+7", "Anger", 3, None]])
    blank_frames(tmp_path / "SAMM" / "006" / "006_1_2", [f"006_{n:05d}.jpg" for n in range(5560, 5570)])
    row = load_annotations("samm", tmp_path).iloc[0]
    assert row["subject"] == "samm/006" and row["source_row"] == 4
    assert row["frame_template"] == "006_{:05d}.jpg" and row["n_frames"] == 5


def test_smic_frames_below_sheet_path(tmp_path: Path) -> None:
    header = ["data", "subject", "clip", "label", "onset_frame", "apex_frame", "offset_frame", "onset_frame_path"]
    write_sheet(tmp_path / "smic_apex.xlsx", [
        header, ["smic", 14, "s14_ne_01", 0, 34208, 34209, 34210, "smic/HS_long/SMIC_HS_E/s14/s14_ne_01/image034208.jpg"],
        ["smic", 3, "s3_po_01", 1, 99999, 100000, None, None],
    ])
    blank_frames(tmp_path / "SMIC_HS_E" / "s14" / "s14_ne_01", [f"image{n:06d}.jpg" for n in range(34208, 34211)])
    blank_frames(tmp_path / "SMIC_HS_E" / "s03" / "s3_po_01", ["image099999.jpg", "image100000.jpg"])
    table = load_annotations("smic", tmp_path)
    assert table["frame_template"].tolist() == ["image{:06d}.jpg"] * 2
    assert table["n_frames"].tolist() == [3, 2]  # second: offset missing -> counted onset..apex
    assert table["subject"].tolist() == ["smic/s14", "smic/s03"]
    assert table["aus"].tolist() == ["", ""] and table["au_coded"].tolist() == [False, False]  # SMIC codes no AUs


def test_smic_label_contradicting_clip_name(tmp_path: Path) -> None:
    """The clip name's code is a second coding of the label: a contradiction is excluded by the class set with
    both named (an error under strict), like the composite's label against its joined coding sheet."""
    from mer.model.data import apply_class_set

    write_sheet(tmp_path / "smic_apex.xlsx", [["subject", "clip", "label", "onset_frame", "apex_frame"],
                                              [1, "s1_po_01", 0, 5, 6], [1, "s1_ne_02", 0, 5, 6]])
    table = load_annotations("smic", tmp_path)
    labelled, excluded = apply_class_set(table, "smic_3")
    assert labelled["clip"].tolist() == ["s1_ne_02"]
    assert excluded["detail"].tolist() == [
        "smic_apex.xlsx, row 2 says negative (negative); clip name s1_po_01 says positive (positive)"]
    with pytest.raises(DataError, match=r"smic_apex.xlsx, row 2: smic/s01/s1_po_01: label contradicts the dataset's "
                                        r"coding: .* clip name s1_po_01 says positive \(positive\)$"):
        apply_class_set(table, "smic_3", strict=True)


def test_casme3_color_folder(tmp_path: Path) -> None:
    write_sheet(tmp_path / "casme3_table.xlsx", [
        ["Subject", "Filename", "Onset", "Apex", "Offset", "AU", "Objective class", "emotion"],
        ["spNO.1", "a", 355, 356, 357, "5", "II", "others"], ["spNO.1", "a", 10, 11, 12, "R12", "I", "happy"],
    ])
    blank_frames(tmp_path / "part_A" / "spNO.1" / "a" / "color", [f"{n}.jpg" for n in (10, 11, 12, 355, 356, 357)])
    table = load_annotations("casme3", tmp_path)
    assert table["sample_id"].tolist() == ["casme3/spNO.1/a", "casme3/spNO.1/a#2"]
    assert table["n_frames"].tolist() == [3, 3] and table["frames_dir"].str.endswith("color").all()


def test_synthetic_ground_truth(tmp_path: Path) -> None:
    write_sheet(tmp_path / "CASME2-coding-synthetic.xlsx", [CASME2_HEADER, ["01", "EP01_01", 1, 2, 3, "12", "happiness"]])
    blank_frames(tmp_path / "sub01" / "EP01_01", [f"img{n}.jpg" for n in (1, 2, 3)])
    (tmp_path / "groundtruth" / "sub01").mkdir(parents=True)
    np.savez(tmp_path / "groundtruth" / "sub01" / "EP01_01.npz", landmarks=np.zeros((3, 68, 2)))
    row = load_annotations("synthetic", tmp_path).iloc[0]
    assert row["sample_id"] == "synthetic/sub01/EP01_01" and row["dataset"] == "synthetic"
    assert row["landmarks_path"] == str(tmp_path / "groundtruth" / "sub01" / "EP01_01.npz")


# --- errors ------------------------------------------------------------------------------------------------------


def test_errors_name_file_and_row(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'casme9'"):
        load_annotations("casme9", tmp_path)
    with pytest.raises(DataError, match="no casme2 annotation"):
        load_annotations("casme2", tmp_path)
    with pytest.raises(DataError, match="data root not found"):
        load_annotations("samm", tmp_path / "absent")
    write_sheet(tmp_path / "CASME2-coding-bad.xlsx", [CASME2_HEADER, ["01", "EP1", 1, 2, 3, "4+7", "others"],
                                                      ["01", "EP2", 1, 2, 3, "happy face", "others"]])
    with pytest.raises(DataError, match=r"CASME2-coding-bad.xlsx, row 3: cannot parse action units 'happy face'"):
        load_annotations("casme2", tmp_path)
    write_sheet(tmp_path / "x" / "CASME2-coding-bad.xlsx", [CASME2_HEADER, ["01", "EP1", "early", 2, 3, "4", "others"]])
    with pytest.raises(DataError, match=r"row 2: OnsetFrame: 'early' is not a frame number"):
        load_annotations("casme2", tmp_path / "x")
    with pytest.raises(DataError, match="no header row"):
        load_annotations("casme2", tmp_path, write_sheet(tmp_path / "empty.xlsx", [["a", "b"], [1, 2]]))
