"""What every native-layout loader shares: reading a sheet whose header may not be on row 1, cell parsing with
file/row in every error, finding a clip's frame folder under a dataset root, and the frame-name template."""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from openpyxl.utils.exceptions import InvalidFileException

from mer.model.data.aus import aus_to_string, parse_aus
from mer.model.data.schema import make_table
from mer.model.errors import DataError

log = logging.getLogger(__name__)

_FRAME = re.compile(r"^(.*?)(\d+)\.(jpe?g|png|bmp)$", re.IGNORECASE)
_MISSING_CELLS = {"", "/", "-", "nan", "none", "n/a"}
_INTEGRAL_TEXT = re.compile(r"[+-]?\d+\.0+")
# What a truncated, empty or mislabelled sheet raises in pandas / openpyxl (a truncated .xlsx is a BadZipFile).
_UNREADABLE = (ValueError, OSError, zipfile.BadZipFile, KeyError, EOFError, InvalidFileException)
SCAN_DEPTH = 3  # how deep below the root a frame base folder is searched when no known subfolder holds it


def norm_name(name: object) -> str:
    """Column-name key insensitive to case, spaces and underscores ('Onset Frame' == 'OnsetFrame' == 'onset_frame')."""
    return re.sub(r"[\s_]+", "", str(name)).lower()


@dataclass
class Sheet:
    """A read annotation sheet: the rows below the header, and each row's 1-based line number in the file."""

    path: Path
    rows: pd.DataFrame
    line: pd.Series

    def column(self, *names: str) -> str:
        """The actual column name matching any of `names` (normalised); DataError naming the file otherwise."""
        lookup = {norm_name(c): c for c in self.rows.columns}
        for name in names:
            if norm_name(name) in lookup:
                return lookup[norm_name(name)]
        raise DataError(f"no column {names[0]!r} (columns: {[str(c) for c in self.rows.columns]})", file=str(self.path))

    def optional_column(self, *names: str) -> str | None:
        try:
            return self.column(*names)
        except DataError:
            return None


def read_sheet(path: Path, required: tuple[str, ...], max_header_row: int = 30) -> Sheet:
    """Read an .xlsx/.xls/.csv sheet, locating the header as the first row holding every `required` column name.

    A CSV re-saved by a spreadsheet reads like the original: a UTF-8 byte-order mark, CRLF line ends, quoted fields
    and trailing empty columns are accepted (numbers re-written as `1.0` are handled by `cell_text`). A truncated or
    corrupt file is a DataError naming it.
    """
    if not path.is_file():
        raise DataError("annotation file not found", file=str(path))
    try:
        if path.suffix.lower() == ".csv":
            raw = pd.read_csv(path, header=None, dtype=object, keep_default_na=False, encoding="utf-8-sig")
        else:
            raw = pd.read_excel(path, header=None, dtype=object)
    except _UNREADABLE as err:
        kind = "truncated or not a spreadsheet" if isinstance(err, zipfile.BadZipFile) else type(err).__name__
        raise DataError(f"cannot read sheet ({kind}): {str(err).splitlines()[0] if str(err) else kind}",
                        file=str(path)) from None
    wanted = {norm_name(r) for r in required}
    for index in range(min(max_header_row, len(raw))):
        cells = {norm_name(v) for v in raw.iloc[index] if not _is_blank(v)}
        if wanted <= cells:
            header = [str(v).strip() if not _is_blank(v) else f"unnamed_{i}" for i, v in enumerate(raw.iloc[index])]
            body = raw.iloc[index + 1:].copy()
            body.columns = header
            body = body[~body.apply(lambda r: all(_is_blank(v) for v in r), axis=1)]
            return Sheet(path, body.reset_index(drop=True), pd.Series(body.index + 1, dtype="int64"))
    raise DataError(f"no header row with columns {list(required)} in the first {max_header_row} rows", file=str(path))


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def cell_text(value: Any) -> str:
    """A cell as text; integral numbers lose their '.0', whether Excel stored 6 as the float 6.0 or a spreadsheet
    re-saved a CSV with '6.0' as text, so identifiers and labels compare equal however the sheet was saved."""
    if _is_blank(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if _INTEGRAL_TEXT.fullmatch(text):
        return str(int(float(text)))
    return text


def frame_number(value: Any, *, file: Path, row: int, column: str) -> int | None:
    """A frame number cell; blank, '/' and '-' mean not annotated (None); anything else non-integral is an error."""
    text = cell_text(value)
    if text.lower() in _MISSING_CELLS:
        return None
    try:
        number = float(text)
    except ValueError:
        raise DataError(f"{column}: {text!r} is not a frame number", file=str(file), row=row) from None
    if not number.is_integer() or number < 0:
        raise DataError(f"{column}: {text!r} is not a frame number", file=str(file), row=row)
    return int(number)


def find_annotation(root: Path, annotation: Path | None, patterns: tuple[str, ...], source: str) -> Path:
    """The sheet to read: the configured one, else the single (or newest-named) match of `patterns` under root."""
    if annotation is not None:
        path = Path(annotation)
        if not path.is_file():
            raise DataError("annotation file not found (data.annotation)", file=str(path))
        return path
    if not root.is_dir():
        raise DataError("data root not found (data.root)", file=str(root))
    matches = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    if not matches:
        raise DataError(f"no {source} annotation ({' or '.join(patterns)}) under the root; set data.annotation",
                        file=str(root))
    if len(matches) > 1:
        log.warning("%s: several annotation files %s; using %s", root, [m.name for m in matches], matches[-1].name)
    return matches[-1]


@dataclass
class FrameFinder:
    """Finds `<base>/<relative clip folder>` below a root, trying known subfolders first, then a bounded scan."""

    root: Path
    subfolders: tuple[str, ...] = ("",)
    _bases: list[Path] = field(default_factory=list)
    _scanned: bool = False

    def __post_init__(self) -> None:
        self._bases = [self.root / s for s in self.subfolders if (self.root / s).is_dir()]

    def find(self, *candidates: tuple[str, ...]) -> Path | None:
        """First existing folder among base/candidate for every base; each candidate is a tuple of path parts."""
        for base in self._bases:
            for parts in candidates:
                if (base.joinpath(*parts)).is_dir():
                    return base.joinpath(*parts)
        if not self._scanned:
            self._scanned = True
            known = set(self._bases)
            self._bases += [d for d in _folders(self.root, SCAN_DEPTH) if d not in known]
            return self.find(*candidates)
        return None


def _folders(root: Path, depth: int) -> list[Path]:
    out: list[Path] = []
    if depth == 0 or not root.is_dir():
        return out
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir():
            out.append(Path(entry.path))
            out += _folders(Path(entry.path), depth - 1)
    return out


def frame_template(folder: Path, number: int, prefixes: tuple[str, ...] = ()) -> tuple[str, set[str]] | None:
    """The frame-name template of a folder (e.g. 'img{}.jpg', '006_{:05d}.jpg'), found from the file of frame
    `number`; prefers the first matching prefix of `prefixes` (raw 'img' over cropped 'reg_img'). Also returns the
    folder listing so counting frames costs no further disk access."""
    names = set(os.listdir(folder))
    hits = [m for m in map(_FRAME.match, sorted(names)) if m and int(m.group(2)) == number]
    if not hits:
        return None
    rank = {p: i for i, p in enumerate(prefixes)}
    hit = min(hits, key=lambda m: rank.get(m.group(1), len(rank)))
    prefix, ext = hit.group(1), hit.group(3)
    widths = {
        len(m.group(2)) for m in map(_FRAME.match, names)
        if m and m.group(1) == prefix and m.group(3) == ext and m.group(2).startswith("0") and len(m.group(2)) > 1
    }
    digits = f"{{:0{max(widths)}d}}" if widths else "{}"
    return prefix.replace("{", "{{").replace("}", "}}") + digits + "." + ext, names


def count_frames(names: set[str], template: str, first: int | None, last: int | None) -> int:
    if first is None or last is None or last < first:
        return 0
    return sum(template.format(n) in names for n in range(first, last + 1))


def attach_frames(record: dict[str, Any], folder: Path | None, prefixes: tuple[str, ...] = ()) -> None:
    """Fill frames_dir, frame_template and n_frames (onset..offset, onset..apex when offset is missing)."""
    if folder is None or record.get("onset") is None:
        return
    found = frame_template(folder, record["onset"], prefixes)
    if found is None:
        record["frames_dir"] = str(folder)  # folder exists but lacks the onset frame: checks report it
        return
    template, names = found
    last = record["offset"] if record.get("offset") is not None else record.get("apex")
    record.update(frames_dir=str(folder), frame_template=template,
                  n_frames=count_frames(names, template, record["onset"], last))


def finish(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Parse every AU string (DataError naming the row on failure) and build the schema table."""
    for record in records:
        aus = parse_aus(record.get("au_raw", ""), file=record["source_file"], row=record["source_row"])
        record["aus"] = aus_to_string(aus)
        record["au_raw"] = cell_text(record.get("au_raw", ""))
    table = make_table(records)
    log.info("loaded %d samples of %s from %s", len(table), ", ".join(sorted(set(table["dataset"]))),
             ", ".join(sorted(set(table["source_file"]))))
    return table
