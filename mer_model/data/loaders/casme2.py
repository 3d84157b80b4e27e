"""CASME II native layout, and the synthetic dataset that imitates it.

Sheet `CASME2-coding-*.xlsx`: Subject (`01`, or the integer 1 where Excel converted it), Filename, OnsetFrame,
ApexFrame (`/` in some releases = not annotated), OffsetFrame, Action Units, Estimated Emotion. Frames:
`<root>[/CASME2_RAW_selected|/Cropped|...]/sub01/EP02_01f/img46.jpg` (raw) or `reg_img46.jpg` (cropped release).
Ground truth saved with the dataset (the synthetic generator): `<root>/groundtruth/sub01/EP02_01f.npz`.
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

SUBFOLDERS = ("", "CASME2_RAW_selected", "CASME2-RAW", "CASME2_RAW", "Cropped", "CASME2_Cropped", "Cropped/Cropped")
PREFIXES = ("img", "reg_img")
PATTERNS = ("CASME2-coding-*.xlsx", "CASME2-coding-*.xls", "CASME2-coding-*.csv")


def subject_folder(raw: object, *, file: Path | None = None, row: int | None = None) -> str:
    """'01', 1, 1.0 and 'sub01' all name the folder 'sub01'."""
    text = cell_text(raw)
    match = re.fullmatch(r"(?:sub)?(\d+)", text, re.IGNORECASE)
    if match is None:
        raise DataError(f"Subject: {text!r} is not a CASME II subject number", file=str(file) if file else None, row=row)
    return f"sub{int(match.group(1)):02d}"


def load_casme2(root: Path, annotation: Path | None = None, *, dataset: str = "casme2", frames: bool = True
                ) -> pd.DataFrame:
    """The CASME II coding sheet as the unified table (dataset name `casme2`, or `synthetic` for the generator)."""
    path = find_annotation(root, annotation, PATTERNS, dataset)
    sheet = read_sheet(path, ("Subject", "Filename", "OnsetFrame"))
    cols = {k: sheet.column(*names) for k, names in {
        "subject": ("Subject",), "clip": ("Filename",), "onset": ("OnsetFrame", "Onset Frame"),
        "apex": ("ApexFrame", "Apex Frame"), "offset": ("OffsetFrame", "Offset Frame"),
        "aus": ("Action Units", "AU"), "emotion": ("Estimated Emotion", "Emotion"),
    }.items()}
    # The synthetic generator may spread its subjects over several source datasets (synth.datasets).
    part = sheet.optional_column("Dataset") if dataset == "synthetic" else None
    finder = FrameFinder(root, SUBFOLDERS)
    records = []
    for (_, row), line in zip(sheet.rows.iterrows(), sheet.line):
        folder = subject_folder(row[cols["subject"]], file=path, row=line)
        clip = cell_text(row[cols["clip"]])
        source = (cell_text(row[part]) if part else "") or dataset
        record: dict[str, Any] = {
            "dataset": source, "collection": dataset, "subject": f"{source}/{folder}", "clip": clip,
            "emotion": cell_text(row[cols["emotion"]]), "au_raw": row[cols["aus"]], "au_coded": True,
            "source_file": str(path), "source_row": int(line),
            **{k: frame_number(row[cols[k]], file=path, row=line, column=cols[k]) for k in ("onset", "apex", "offset")},
        }
        if frames:
            attach_frames(record, finder.find((folder, clip)), PREFIXES)
            truth = root / "groundtruth" / folder / f"{clip}.npz"
            if truth.is_file():
                record["landmarks_path"] = str(truth)
        records.append(record)
    return finish(records)


register_dataset("casme2", load_casme2, subject_folder, provides=("frames_dir", "au_coded"),
                 description="CASME II, native layout (coding sheet + frame folders)")
register_dataset("synthetic",
                 lambda root, annotation=None, **kw: load_casme2(root, annotation, dataset="synthetic", **kw),
                 subject_folder, provides=("frames_dir", "au_coded", "landmarks_path"),
                 description="the embedded synthetic dataset (CASME II layout, ground-truth landmarks)")
