"""SAMM native layout.

Sheet `SAMM_Micro_FACS_Codes_v2.xlsx` (a title block above the header row) or `SAMM.xlsx`: Subject (`006`, or 6
where Excel converted it), Filename (`006_1_2`), Onset Frame, Apex Frame, Offset Frame, Action Units, Estimated
Emotion, Objective Classes. Frames: `<root>[/SAMM]/006/006_1_2/006_05562.jpg`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from mer.model.data.loaders import register_dataset
from mer.model.data.loaders.common import FrameFinder, attach_frames, cell_text, find_annotation, finish, \
    frame_number, read_sheet
from mer.model.errors import DataError

SUBFOLDERS = ("", "SAMM", "SAMM_CROP")
PATTERNS = ("SAMM_Micro_FACS_Codes_v2.xlsx", "SAMM*.xlsx", "SAMM*.csv")


def subject_folder(raw: object, *, file: Path | None = None, row: int | None = None) -> str:
    """'006', 6 and 6.0 all name the folder '006'."""
    text = cell_text(raw)
    if not re.fullmatch(r"\d+", text):
        raise DataError(f"Subject: {text!r} is not a SAMM subject number", file=str(file) if file else None, row=row)
    return f"{int(text):03d}"


def load_samm(root: Path, annotation: Path | None = None, *, frames: bool = True) -> pd.DataFrame:
    path = find_annotation(root, annotation, PATTERNS, "samm")
    sheet = read_sheet(path, ("Subject", "Filename", "Onset Frame"))
    cols = {k: sheet.column(*names) for k, names in {
        "subject": ("Subject",), "clip": ("Filename",), "onset": ("Onset Frame",), "apex": ("Apex Frame",),
        "offset": ("Offset Frame",), "aus": ("Action Units",), "emotion": ("Estimated Emotion",),
    }.items()}
    finder = FrameFinder(root, SUBFOLDERS)
    records = []
    for (_, row), line in zip(sheet.rows.iterrows(), sheet.line):
        folder = subject_folder(row[cols["subject"]], file=path, row=line)
        clip = cell_text(row[cols["clip"]])
        record: dict[str, Any] = {
            "dataset": "samm", "collection": "samm", "subject": f"samm/{folder}", "clip": clip,
            "emotion": cell_text(row[cols["emotion"]]), "au_raw": row[cols["aus"]], "au_coded": True,
            "source_file": str(path), "source_row": int(line),
            **{k: frame_number(row[cols[k]], file=path, row=line, column=cols[k]) for k in ("onset", "apex", "offset")},
        }
        if frames:
            attach_frames(record, finder.find((folder, clip)), (f"{folder}_",))
        records.append(record)
    return finish(records)


register_dataset("samm", load_samm, subject_folder, provides=("frames_dir", "au_coded"),
                 description="SAMM, native layout")
