"""SMIC (HS) native layout.

Sheet `smic_apex.xlsx`-style: subject (`20`), clip (`s20_ne_01`; single-digit subjects write `s3_ne_05`), label
(0 negative, 1 positive, 2 surprise; the `ne`/`po`/`sur` code in the clip name is recorded as `coded_emotion`, so a
label contradicting it is excluded by the class set like any contradicting coding),
onset_frame, apex_frame, offset_frame (missing on 7 rows of the public sheet), onset_frame_path
(`smic/HS_long/SMIC_HS_E/s01/s1_ne_01/image559740.jpg`). Frames: `<root>/s20/s20_ne_01/image17581039.jpg`, or below
any tail of the sheet's path; frame numbers are zero-padded to six digits (`image034208.jpg`). SMIC has no AU coding.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from mer.model.data.loaders import register_dataset
from mer.model.data.loaders.common import FrameFinder, attach_frames, cell_text, find_annotation, finish, \
    frame_number, read_sheet
from mer.model.errors import DataError

SUBFOLDERS = ("", "HS", "SMIC_HS_E", "HS_long/SMIC_HS_E", "smic/HS_long/SMIC_HS_E")
PATTERNS = ("smic_apex.xlsx", "smic*.xlsx", "smic*.csv", "SMIC*.xlsx", "SMIC*.csv")
CLASSES = ("negative", "positive", "surprise")
_CODES = {"ne": "negative", "po": "positive", "sur": "surprise"}


def subject_folder(raw: object, *, file: Path | None = None, row: int | None = None) -> str:
    """'3', 3, 's3' and 's03' all give the subject name 's03' (the composite's spelling)."""
    text = cell_text(raw)
    match = re.fullmatch(r"s?(\d+)", text, re.IGNORECASE)
    if match is None:
        raise DataError(f"subject: {text!r} is not a SMIC subject number", file=str(file) if file else None, row=row)
    return f"s{int(match.group(1)):02d}"


def emotion_of(label: object, *, file: Path, row: int) -> str:
    """Class name from the label cell (0/1/2 or the name)."""
    text = cell_text(label).lower()
    emotion = CLASSES[int(text)] if text in ("0", "1", "2") else text
    if emotion not in CLASSES:
        raise DataError(f"label {text!r} is not 0/1/2 or {'/'.join(CLASSES)}", file=str(file), row=row)
    return emotion


def clip_emotion(clip: str) -> str:
    """The emotion the clip name codes (`s3_ne_05` -> negative), "" when it codes none: a second coding of the label,
    which the class set checks (`coded_emotion`)."""
    code = re.search(r"_(ne|po|sur)_", clip)
    return _CODES[code.group(1)] if code else ""


def load_smic(root: Path, annotation: Path | None = None, *, frames: bool = True) -> pd.DataFrame:
    path = find_annotation(root, annotation, PATTERNS, "smic")
    sheet = read_sheet(path, ("subject", "clip", "label"))
    cols = {k: sheet.column(*names) for k, names in {
        "subject": ("subject",), "clip": ("clip",), "label": ("label",), "onset": ("onset_frame", "onset"),
        "apex": ("apex_frame", "apex"),
    }.items()}
    offset_col = sheet.optional_column("offset_frame", "offset")  # apex-only sheets exist
    path_col = sheet.optional_column("onset_frame_path")
    finder = FrameFinder(root, SUBFOLDERS)
    records = []
    for (_, row), line in zip(sheet.rows.iterrows(), sheet.line):
        subject = subject_folder(row[cols["subject"]], file=path, row=line)
        clip = cell_text(row[cols["clip"]])
        record: dict[str, Any] = {
            "dataset": "smic", "collection": "smic", "subject": f"smic/{subject}", "clip": clip,
            "emotion": emotion_of(row[cols["label"]], file=path, row=line), "au_raw": "",
            "coded_emotion": clip_emotion(clip), "coded_source": f"clip name {clip}",
            "source_file": str(path), "source_row": int(line),
            **{k: frame_number(row[cols[k]], file=path, row=line, column=cols[k]) for k in ("onset", "apex")},
            "offset": frame_number(row[offset_col], file=path, row=line, column=offset_col) if offset_col else None,
        }
        if frames:
            number = subject[1:].lstrip("0")
            candidates = [(subject, clip), (f"s{number}", clip)]
            if path_col and cell_text(row[path_col]):
                parts = PurePosixPath(cell_text(row[path_col]).replace("\\", "/")).parent.parts
                candidates = [tuple(parts[i:]) for i in range(len(parts) - 1)] + candidates
            attach_frames(record, finder.find(*candidates), ("image",))
        records.append(record)
    return finish(records)


register_dataset("smic", load_smic, subject_folder, provides=("frames_dir",),
                 description="SMIC-HS, native layout (no AU coding)")
