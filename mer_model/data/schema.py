"""The unified annotation table: one row per sample, the same columns for every dataset (docs/architecture.md).

Every loader returns this table and every later stage (checks, class labelling, preprocessing, LOSO splitting) reads
only these columns, so a new dataset needs a loader and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.model.errors import DataError

# column -> pandas dtype; "Int64" is pandas' nullable integer (a missing apex stays missing, never 0 or NaN-float).
COLUMNS: dict[str, str] = {
    "sample_id": "string",
    "dataset": "string",
    "collection": "string",
    "subject": "string",
    "clip": "string",
    "onset": "Int64",
    "apex": "Int64",
    "offset": "Int64",
    "emotion": "string",
    "coded_emotion": "string",
    "coded_source": "string",
    "label": "Int64",
    "aus": "string",
    "au_raw": "string",
    "au_coded": "bool",
    "frames_dir": "string",
    "frame_template": "string",
    "n_frames": "int64",
    "flow_path": "string",
    "apex_path": "string",
    "landmarks_path": "string",
    "points5": "string",
    # how `points5` were estimated where the source says they are a fallback (the composite's landmarks5_28px.csv:
    # `whole_image_box`), "" where they were measured or are absent; preprocessing counts these as estimated
    "points5_estimated": "string",
    "source_file": "string",
    "source_row": "int64",
}

# Columns a loader must fill; the rest get their neutral default in `make_table`.
REQUIRED = ("dataset", "collection", "subject", "clip", "emotion", "source_file", "source_row")
_DEFAULTS: dict[str, Any] = {
    "onset": pd.NA, "apex": pd.NA, "offset": pd.NA, "label": pd.NA, "aus": "", "au_raw": "", "au_coded": False, "frames_dir": "",
    "frame_template": "", "n_frames": 0, "flow_path": "", "apex_path": "", "landmarks_path": "", "points5": "",
    "points5_estimated": "", "coded_emotion": "", "coded_source": "",
}

# Datasets whose clip (a long recording) holds several samples: there a sample is (subject, clip, onset, apex,
# offset), and the recording's last frame says nothing about one sample's offset. Everywhere else a clip is one
# sample and its folder holds just that clip.
SEVERAL_SAMPLES_PER_CLIP = frozenset({"casme3"})


def duplicate_key(row: Any) -> tuple[Any, ...]:
    """What makes two rows the same sample: (subject, clip), plus the key frames where a clip holds several samples.
    Subjects are already normalised by the loaders (`mer.model.data.loaders.subject_name`), so `01`, `1` and
    `sub01` compare equal."""
    key: tuple[Any, ...] = (row.dataset, row.subject, row.clip)
    if row.dataset in SEVERAL_SAMPLES_PER_CLIP:
        key += tuple(None if pd.isna(v) else int(v) for v in (row.onset, row.apex, row.offset))
    return key


def make_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Build a schema-conformant table from loader records; assigns unique sample_ids (`#2`.. for repeated clips)."""
    frame = pd.DataFrame.from_records(records, columns=[c for c in COLUMNS if c != "sample_id"])
    for column, default in _DEFAULTS.items():
        if default is not pd.NA:
            frame[column] = frame[column].astype(object).where(frame[column].notna(), default)
    base = frame["subject"].astype(str) + "/" + frame["clip"].astype(str)
    occurrence = base.groupby(base).cumcount()
    frame.insert(0, "sample_id", base.where(occurrence == 0, base + "#" + (occurrence + 1).astype(str)))
    return conform(frame)


# Columns added after tables were first written: a table ingested before them reads with their default.
ADDED_COLUMNS = ("points5_estimated",)


def conform(frame: pd.DataFrame) -> pd.DataFrame:
    """Cast to the schema dtypes and column order (e.g. after reading the ingested CSV back)."""
    frame = frame.assign(**{c: _DEFAULTS[c] for c in ADDED_COLUMNS if c not in frame.columns})
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"annotation table lacks columns {missing}")
    out = frame.copy()
    for column, dtype in COLUMNS.items():
        if dtype == "string":
            out[column] = out[column].fillna("").astype(str).astype("string")
        elif dtype == "bool":
            out[column] = out[column].map(_as_bool).astype(bool)
        elif dtype == "Int64":
            out[column] = pd.to_numeric(out[column], errors="raise").astype("Int64")
        else:
            out[column] = pd.to_numeric(out[column], errors="raise").astype(dtype)
    extra = [c for c in frame.columns if c not in COLUMNS]
    return out[list(COLUMNS) + extra].reset_index(drop=True)


def _as_bool(value: Any) -> bool:
    """A bool cell as written by pandas (`True`/`False`) or by hand (`1`/`0`, `true`/`false`)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0", ""):
        return False
    raise DataError(f"annotation table: {value!r} is not a boolean")


def validate_table(frame: pd.DataFrame) -> None:
    """Raise DataError unless the table has every column with its dtype, unique sample ids, prefixed subjects."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"annotation table lacks columns {missing}")
    wrong = [f"{c} ({frame[c].dtype}, expected {t})" for c, t in COLUMNS.items() if str(frame[c].dtype) != t]
    if wrong:
        raise DataError(f"annotation table has wrong dtypes: {', '.join(wrong)}")
    dupes = frame["sample_id"][frame["sample_id"].duplicated()]
    if len(dupes):
        raise DataError(f"duplicate sample_id {dupes.iloc[0]!r} ({len(dupes)} duplicates)")
    prefixed = [s.startswith(f"{d}/") for s, d in zip(frame["subject"], frame["dataset"])]
    unprefixed = frame[[not p for p in prefixed]]
    if len(unprefixed):
        row = unprefixed.iloc[0]
        raise DataError(
            f"subject {row['subject']!r} is not prefixed with its dataset {row['dataset']!r}",
            file=row["source_file"], row=int(row["source_row"]),
        )
    for column in ("onset", "apex", "offset"):
        negative = frame[frame[column].fillna(0) < 0]
        if len(negative):
            row = negative.iloc[0]
            raise DataError(f"negative {column} frame", file=row["source_file"], row=int(row["source_row"]))


def frame_file(row: pd.Series | dict[str, Any], number: int) -> Path:
    """Path of frame `number` of a sample (its dataset's own numbering)."""
    if not row["frames_dir"]:
        raise DataError(f"sample {row['sample_id']}: no frames on disk")
    return Path(row["frames_dir"]) / str(row["frame_template"]).format(int(number))


def read_table(path: str | Path) -> pd.DataFrame:
    """Read an ingested annotation CSV back with the schema dtypes (empty strings stay strings, not NaN)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("annotation table not found (run `mer ingest`)", file=str(path))
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for column in ("onset", "apex", "offset", "label"):
            if column in frame:
                frame[column] = frame[column].replace("", pd.NA)
        table = conform(frame)
        validate_table(table)
    except (ValueError, DataError) as err:  # pandas' parser errors are ValueErrors
        raise DataError(f"not a valid annotation table (re-run `mer ingest`): {str(err).splitlines()[0]}",
                        file=str(path)) from None
    return table
