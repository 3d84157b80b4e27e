"""Annotation-vs-disk checks: every problem names its file and row; nothing is dropped without being counted.

Problems that make a sample unusable exclude the row: apex outside onset..offset, onset after offset, frames or flow
map missing, the apex ON the onset frame (the onset->apex motion is exactly zero: wrong data that looks valid), and a
repeat of a sample already listed (the same clip written `01` and `1`: subjects are normalised by the loaders, so the
repeat is found and excluded with both rows named; see `schema.duplicate_key`). Problems a sample can live with keep
it: a missing apex is estimated at preprocessing (largest TV-L1 motion from the onset, as `mer predict` does) and a
missing offset too where the clip folder holds just that clip (its last frame); the index records what was
estimated. Where a recording holds several samples (CAS(ME)^3) a missing offset cannot be estimated: the row is kept
for what needs only onset and apex (flow maps, faces) and its sequence inputs are reported unavailable at
preprocessing; a row there without apex AND offset has nothing usable and is excluded. Every problem is logged as a
warning and counted. With `strict=True` the first problem of either kind raises `DataError` instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mer.model.data.schema import SEVERAL_SAMPLES_PER_CLIP, duplicate_key
from mer.model.errors import DataError

log = logging.getLogger(__name__)
LOGGED_PER_REASON = 5  # rows logged individually per reason; the rest are counted (all are in the exclusions CSV)


@dataclass
class CheckSummary:
    total: int = 0
    kept: int = 0
    excluded: Counter[str] = field(default_factory=Counter)  # reason -> rows excluded
    warnings: Counter[str] = field(default_factory=Counter)  # reason -> rows kept with a warning

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "excluded": dict(self.excluded),
                "warnings": dict(self.warnings)}


def _problems(row: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(fatal, tolerable) problems of one row, each (reason, detail)."""
    fatal: list[tuple[str, str]] = []
    tolerable: list[tuple[str, str]] = []
    if row.flow_path:  # precomputed flow (composite): the map must exist; frames are not used
        if not Path(row.flow_path).is_file():
            fatal.append(("flow map missing", row.flow_path))
        if row.apex_path and not Path(row.apex_path).is_file():
            fatal.append(("apex crop missing", row.apex_path))
        return fatal, tolerable
    onset, apex, offset = (None if pd.isna(v) else int(v) for v in (row.onset, row.apex, row.offset))
    if onset is None:
        return [("onset not annotated", "")], tolerable
    recording = row.dataset in SEVERAL_SAMPLES_PER_CLIP
    if offset is not None and offset < onset:
        fatal.append(("offset before onset", f"onset {onset}, offset {offset}"))
    if apex is not None and apex == onset:
        fatal.append(("apex equals onset (zero motion)", f"onset {onset}, apex {apex}"))
    elif apex is not None and not (onset <= apex <= (offset if offset is not None else apex)):
        fatal.append(("apex outside onset..offset", f"onset {onset}, apex {apex}, offset {offset}"))
    if apex is None and offset is None and recording:
        fatal.append(("apex and offset not annotated", "the recording holds several samples: nothing bounds them"))
    elif apex is None:
        tolerable.append(("apex not annotated", "estimated at preprocessing from the flow magnitude"))
    if offset is None and apex is not None:
        tolerable.append(("offset not annotated",
                          "sequence inputs unavailable (the recording holds several samples)" if recording
                          else "estimated at preprocessing as the clip's last frame"))
    last = offset if offset is not None else apex
    if not row.frames_dir:
        fatal.append(("frames not found", f"no folder for {row.subject}/{row.clip}"))
    elif not row.frame_template:
        fatal.append(("frames missing", f"{row.frames_dir} lacks onset frame {onset}"))
    elif last is not None and last >= onset and row.n_frames < last - onset + 1:
        fatal.append(("frames missing", f"{row.frames_dir}: {row.n_frames} of {last - onset + 1} frames present"))
    return fatal, tolerable


def check_table(table: pd.DataFrame, *, strict: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, CheckSummary]:
    """Returns (kept rows, excluded rows with `reason` and `detail`, summary); strict: first problem raises."""
    summary = CheckSummary(total=len(table))
    keep: list[bool] = []
    reasons: list[tuple[str, str]] = []
    first_seen: dict[tuple[Any, ...], Any] = {}
    for row in table.itertuples(index=False):
        fatal, tolerable = _problems(row)
        original = first_seen.setdefault(duplicate_key(row), row)
        if original is not row:
            where = "" if original.source_file == row.source_file else f"{original.source_file}, "
            fatal.insert(0, ("duplicate row", f"the same sample as {where}row {original.source_row} "
                                              f"({original.sample_id}); this is row {row.source_row}"))
        if strict and (fatal or tolerable):
            reason, detail = (fatal + tolerable)[0]
            raise DataError(f"{row.sample_id}: {reason} ({detail})" if detail else f"{row.sample_id}: {reason}",
                            file=row.source_file, row=row.source_row)
        labelled = [(summary.excluded, "excluded", *fatal[0])] if fatal else []
        for counter, state, reason, detail in labelled + [(summary.warnings, "kept", *t) for t in tolerable]:
            counter[reason] += 1
            if counter[reason] <= LOGGED_PER_REASON:
                log.warning("%s, row %s: %s: %s%s (%s)", row.source_file, row.source_row, row.sample_id, reason,
                            f" ({detail})" if detail else "", state)
        keep.append(not fatal)
        if fatal:
            reasons.append(fatal[0])
    for reason, count in summary.excluded.items():
        log.warning("excluded %d samples: %s", count, reason)
    for reason, count in summary.warnings.items():
        log.warning("kept %d samples with warning: %s", count, reason)
    mask = pd.Series(keep, index=table.index, dtype=bool)
    excluded = table[~mask].assign(reason=[r for r, _ in reasons], detail=[d for _, d in reasons])
    summary.kept = int(mask.sum())
    return table[mask].reset_index(drop=True), excluded.reset_index(drop=True), summary
