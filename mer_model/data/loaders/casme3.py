"""CAS(ME)^3 part A native layout.

Sheet (`casme3_table.xlsx`-style, or the official part-A annotation): Subject (`spNO.1`), Filename (`a`: one long
recording, several samples each), Onset, Apex, Offset, AU, Objective class, emotion. Repeated (Subject, Filename)
pairs are distinct samples (`sample_id` suffix `#2`..); the same (Subject, Filename, Onset, Apex, Offset) twice is a
duplicate (excluded by the checks). Quirk: an Offset of 0 (2 rows of the public table) means not annotated; since a
recording holds several samples, its last frame is no estimate of the offset (see `checks`). Frames:
`<root>[/part_A...]/spNO.1/a/color/355.jpg`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from mer.model.data.loaders import register_dataset
from mer.model.data.loaders.common import FrameFinder, attach_frames, cell_text, find_annotation, finish, \
    frame_number, read_sheet
from mer.model.errors import DataError

log = logging.getLogger(__name__)

SUBFOLDERS = ("", "part_A", "Part_A", "part_A/data", "data")
PATTERNS = ("casme3*.xlsx", "casme3*.csv", "CAS(ME)3*.xlsx", "cas(me)3*.xlsx", "*part_A*.xlsx")


def subject_folder(raw: object, *, file: Path | None = None, row: int | None = None) -> str:
    """'spNO.1', 'spno.01', '1' and 1.0 all name the folder 'spNO.1'."""
    text = cell_text(raw)
    match = re.fullmatch(r"(?:spNO\.?)?0*(\d+)", text, re.IGNORECASE)
    if match is None:
        raise DataError(f"Subject: {text!r} is not a CAS(ME)^3 subject (spNO.<n>)", file=str(file) if file else None,
                        row=row)
    return f"spNO.{int(match.group(1))}"


def load_casme3(root: Path, annotation: Path | None = None, *, frames: bool = True) -> pd.DataFrame:
    path = find_annotation(root, annotation, PATTERNS, "casme3")
    sheet = read_sheet(path, ("Subject", "Filename", "Onset"))
    cols = {k: sheet.column(*names) for k, names in {
        "subject": ("Subject",), "clip": ("Filename",), "onset": ("Onset",), "apex": ("Apex",),
        "offset": ("Offset",), "aus": ("AU", "Action Units"), "emotion": ("emotion",),
    }.items()}
    finder = FrameFinder(root, SUBFOLDERS)
    records = []
    zero_offsets = 0
    for (_, row), line in zip(sheet.rows.iterrows(), sheet.line):
        clip = cell_text(row[cols["clip"]])
        if not cell_text(row[cols["subject"]]) or not clip:
            raise DataError("empty Subject or Filename", file=str(path), row=int(line))
        subject = subject_folder(row[cols["subject"]], file=path, row=int(line))
        record: dict[str, Any] = {
            "dataset": "casme3", "collection": "casme3", "subject": f"casme3/{subject}", "clip": clip,
            "emotion": cell_text(row[cols["emotion"]]), "au_raw": row[cols["aus"]], "au_coded": True,
            "source_file": str(path), "source_row": int(line),
            **{k: frame_number(row[cols[k]], file=path, row=line, column=cols[k]) for k in ("onset", "apex", "offset")},
        }
        if record["offset"] == 0 and (record["onset"] or 0) > 0:
            record["offset"] = None
            zero_offsets += 1
        if frames:
            attach_frames(record, finder.find((subject, clip, "color"), (subject, clip)))
        records.append(record)
    if zero_offsets:
        log.warning("%s: %d rows with Offset 0 read as offset not annotated", path, zero_offsets)
    return finish(records)


register_dataset("casme3", load_casme3, subject_folder, provides=("frames_dir", "au_coded"),
                 description="CAS(ME)^3 part A, native layout")
