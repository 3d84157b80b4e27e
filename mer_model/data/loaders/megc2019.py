"""MEGC2019 composite (CASME II + SMIC + SAMM, 3 classes) as distributed with the HTNet code.

`combined_3_class2_for_optical_flow.csv`: dataset (casme2/smic/samm), sub, filename_o, label (0 negative,
1 positive, 2 surprise), apex (usually empty), imagename. Beside it: `datasets/STSNet_whole_norm_u_v_os/<sub>_<clip> .png`
(28x28 onset->apex u/v/strain; note the space before `.png`), optionally `datasets/combined_datasets_whole/<imagename>`
(apex crops; the distribution has no onset crops) and `landmarks5_28px.csv` (five points per imagename in the 28 px
frame; its optional `source` column says how they were found: `dlib`, or `whole_image_box` where no face was detected
and the shape predictor ran on the whole image: those rows are kept, marked `points5_estimated` and counted). The
composite carries no AUs: they are joined from the CASME II / SAMM coding sheets given as `au_sheets` (params
data.au_sheets), by normalised subject and clip, together with their onset/apex/offset and the sheet's own
emotion (`coded_emotion`, `coded_source`), which the class set then checks against the composite's label.

File names are built from the NORMALISED subject (`mer.model.data.loaders.subject_name`), never from the cell as
written, so a CSV that a spreadsheet re-saved (`006` -> `6`) finds the same maps.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from mer.model.data.loaders import DATASETS, register_dataset, smic, subject_name
from mer.model.data.loaders.common import cell_text, find_annotation, finish, frame_number, read_sheet
from mer.model.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PATTERNS = ("combined_3_class2_for_optical_flow.csv", "combined_3_class*.csv")
FLOW_DIR = Path("datasets") / "STSNet_whole_norm_u_v_os"
APEX_DIR = Path("datasets") / "combined_datasets_whole"
LANDMARKS = "landmarks5_28px.csv"
CLASSES = ("negative", "positive", "surprise")
POINT_COLUMNS = ("left_eye_x", "left_eye_y", "right_eye_x", "right_eye_y", "nose_x", "nose_y",
                 "mouth_left_x", "mouth_left_y", "mouth_right_x", "mouth_right_y")
# `source` values of landmarks5_28px.csv that name a face detector's landmarks; any other value is a fallback
# (e.g. `whole_image_box`), whose points are recorded as estimated
DETECTED_SOURCES = ("dlib",)
PARTS = ("casme2", "samm", "smic")  # the source datasets of the composite
AU_DATASETS = ("casme2", "samm")


def _points5(path: Path) -> dict[str, tuple[str, str]]:
    """imagename -> ('x1,y1,...,x5,y5', how they were estimated: the file's `source` where it is not a detector's,
    else "") from landmarks5_28px.csv; {} when the file is absent."""
    if not path.is_file():
        log.info("%s absent: points5 left empty (preprocessing detects them on the apex crops)", path)
        return {}
    sheet = read_sheet(path, ("imagename",) + POINT_COLUMNS)
    source_col = sheet.optional_column("source")
    out: dict[str, tuple[str, str]] = {}
    for (_, row), line in zip(sheet.rows.iterrows(), sheet.line):
        try:
            values = [float(row[sheet.column(c)]) for c in POINT_COLUMNS]
        except ValueError:
            raise DataError("landmark coordinate is not a number", file=str(path), row=int(line)) from None
        source = cell_text(row[source_col]) if source_col else ""
        estimated = source if source and source not in DETECTED_SOURCES else ""
        out[cell_text(row[sheet.column("imagename")])] = (",".join(f"{v:g}" for v in values), estimated)
    fallback = Counter(estimated for _, estimated in out.values() if estimated)
    if fallback:
        log.warning("%s: %s of %d rows' points are a fallback, not a detected face: recorded as estimated", path,
                    ", ".join(f"{n} {source}" for source, n in sorted(fallback.items())), len(out))
    return out


def _au_coding(au_sheets: dict[str, str]) -> dict[tuple[str, str], dict[str, Any]]:
    """(subject, clip) -> AU string, frame numbers, the sheet's emotion and where it stands, from the native
    CASME II / SAMM sheets."""
    coding: dict[tuple[str, str], dict[str, Any]] = {}
    for dataset, sheet_path in au_sheets.items():
        if dataset not in AU_DATASETS:
            raise ConfigError(f"data.au_sheets.{dataset}: AU coding can be joined for {', '.join(AU_DATASETS)} only")
        path = Path(sheet_path).expanduser().resolve()
        if not path.is_file():  # named here: the loader would blame data.annotation, which the user did not set
            raise DataError(f"AU coding sheet not found (data.au_sheets.{dataset})", file=str(path))
        table = DATASETS.get(dataset).load(path.parent, path, frames=False)
        for row in table.itertuples():
            coding[(row.subject, row.clip)] = {
                "au_raw": row.au_raw, "onset": row.onset, "apex": row.apex, "offset": row.offset,
                "coded_emotion": row.emotion, "coded_source": f"{Path(row.source_file).name}, row {row.source_row}",
            }
    return coding


def load_megc2019(root: Path, annotation: Path | None = None, *, frames: bool = True,
                  au_sheets: dict[str, str] | None = None) -> pd.DataFrame:
    coding = _au_coding(au_sheets or {})  # the configured sheets first: a wrong one fails before the data is read
    path = find_annotation(root, annotation, PATTERNS, "megc2019")
    sheet = read_sheet(path, ("dataset", "sub", "filename_o", "label"))
    cols = {k: sheet.column(k) for k in ("dataset", "sub", "filename_o", "label")}
    apex_col, image_col = sheet.optional_column("apex"), sheet.optional_column("imagename")
    base = path.parent
    points = _points5(base / LANDMARKS)
    records = []
    no_points = no_coding = 0
    for (_, row), line in zip(sheet.rows.iterrows(), sheet.line):
        dataset = cell_text(row[cols["dataset"]]).lower()
        if dataset not in PARTS:
            raise DataError(f"dataset {dataset!r} is not casme2/smic/samm", file=str(path), row=int(line))
        raw_sub, clip = row[cols["sub"]], cell_text(row[cols["filename_o"]])
        label = cell_text(row[cols["label"]])
        if label not in ("0", "1", "2"):
            raise DataError(f"label {label!r} is not 0/1/2", file=str(path), row=int(line))
        folder = subject_name(dataset, raw_sub, file=path, row=int(line))
        subject = f"{dataset}/{folder}"
        image = cell_text(row[image_col]) if image_col else ""
        record: dict[str, Any] = {
            "dataset": dataset, "collection": "megc2019", "subject": subject, "clip": clip,
            "emotion": CLASSES[int(label)], "au_raw": "", "source_file": str(path), "source_row": int(line),
            "apex": frame_number(row[apex_col], file=path, row=int(line), column="apex") if apex_col else None,
            "points5": points.get(image, ("", ""))[0], "points5_estimated": points.get(image, ("", ""))[1],
        }
        if dataset == "smic" and smic.clip_emotion(clip):  # SMIC's clip names code the emotion: a second coding
            record.update(coded_emotion=smic.clip_emotion(clip), coded_source=f"clip name {clip}")
        if frames:
            flow = base / FLOW_DIR / f"{folder}_{clip} .png"
            if not flow.is_file() and flow.with_name(f"{folder}_{clip}.png").is_file():
                flow = flow.with_name(f"{folder}_{clip}.png")  # re-distributions without the space
            record["flow_path"] = str(flow)
            if image and (base / APEX_DIR / image).is_file():
                record["apex_path"] = str(base / APEX_DIR / image)
        if points and not record["points5"]:
            no_points += 1
        if coding:
            joined = coding.get((subject, clip))
            if joined is None and dataset in au_sheets:
                no_coding += 1
            elif joined is not None:
                record.update({k: (None if pd.isna(v) else v) for k, v in joined.items()
                               if k in ("au_raw", "coded_emotion", "coded_source") or record.get(k) is None})
                record["au_coded"] = True  # the composite itself has no AU coding: only joined rows have one
        records.append(record)
    if no_points:
        log.warning("%s: %d samples without a row in %s", path, no_points, LANDMARKS)
    if no_coding:
        log.warning("%s: %d samples not found in the AU sheets %s", path, no_coding, au_sheets)
    return finish(records)


register_dataset("megc2019", load_megc2019, options=("au_sheets",),
                 provides=("flow_path", "apex_path", "points5", "au_coded"),
                 description="the MEGC2019 composite (HTNet format: flow maps, apex crops; AUs joined from au_sheets)")
