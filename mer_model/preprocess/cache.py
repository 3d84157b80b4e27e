"""The preprocessed cache on disk, one entry per sample and modality (docs/architecture.md, "Preprocessed cache"):

    samples/<sample id, '/' -> '__'>/<modality>.npz   one compressed file per entry (`aus.npz` also holds `au_coded`)
    modalities.csv   one row per entry: status (ok/failed/unavailable), reason, error, file, bytes, sha256,
                     input_hash, face, estimated
    index.csv        the annotation table + status, reason, error (for the modalities this run was asked for),
                     modalities (every modality the sample has, '+'-joined), face, estimated
    manifest.json    parameters, versions, the modalities asked for, counts, failures, coverage

Why per modality: preprocessing dominates an experiment's cost, so a run computes only what is asked for (what the
model reads) and missing, a later model adds only its own modalities, and a sample is dropped only for a modality
that is read. An entry is reused while its `input_hash` (the parameters that shape it, the library versions, the
annotation row: `modalities.input_hashes`) is unchanged and its file still has the size and SHA-256 recorded when it
was written and decodes to finite arrays; anything else (a changed parameter, a truncated or edited file, NaN/inf
values however they got there) is recomputed, with a warning naming the file. Files are written
atomically (`mer.model.io`), so an interrupted run loses nothing it had finished.

While results arrive, modalities.csv is rewritten every few seconds (`Cache.flush_every`), so an interrupted run loses
at most that much finished work.

`process_row` is what a worker runs: one row -> a `SampleResult` carrying each entry's compressed bytes, so that on
a cluster only the driver writes files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from mer.model.config import PreprocessConfig
from mer.model.data.aus import AU_LIST
from mer.model.errors import DataError
from mer.model.io import atomic_write, digest, write_csv, write_json
from mer.model.preprocess.modalities import MODALITIES, check_modalities, input_hashes, library_versions
from mer.model.preprocess.sample import preprocess_sample

log = logging.getLogger(__name__)

# Fields of PreprocessConfig that decide where, how fast and how much the stage runs, not what an entry holds.
RUNTIME_FIELDS = {"out", "num_workers", "ray_address", "modalities"}
ENTRY_COLUMNS = ("sample_id", "modality", "status", "reason", "error", "file", "bytes", "sha256", "input_hash",
                 "face", "estimated")
STATUS_COLUMNS = ("status", "reason", "error", "modalities", "face", "estimated")


def entry_file(sample_id: str, modality: str) -> str:
    """Cache-relative path of one entry (the id's '/' become '__')."""
    return f"samples/{sample_id.replace('/', '__')}/{modality}.npz"


def params_hash(cfg: PreprocessConfig) -> str:
    """Hash of the whole preprocessing configuration that shapes arrays (recorded in the manifest; each entry is
    validated by its own `input_hash`, which covers only the parameters that shape that modality)."""
    payload = {
        "preprocess": cfg.model_dump(mode="json", by_alias=True, exclude=RUNTIME_FIELDS),
        "au_list": list(AU_LIST),
        "versions": library_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EntryResult:
    """One modality of one sample as a worker returns it: `data` = the compressed npz bytes when status is ok."""

    status: str  # "ok" | "failed" | "unavailable"
    reason: str = ""
    error: str = ""
    data: bytes | None = None


@dataclass(frozen=True)
class SampleResult:
    """The entries computed for one sample, where its face came from and what key frames were estimated."""

    sample_id: str
    entries: dict[str, EntryResult] = field(default_factory=dict)
    face: str = ""
    estimated: str = ""


def encode_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def decode_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of one entry's npz bytes (ValueError/OSError/zipfile errors for a file that is no npz)."""
    with np.load(io.BytesIO(data)) as npz:
        return {k: npz[k] for k in npz.files}


def nonfinite(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating-point arrays holding NaN or inf."""
    return [k for k, a in arrays.items() if a.dtype.kind in "fc" and not np.isfinite(a).all()]


def entry_problem(data: bytes) -> str | None:
    """Why an entry's bytes cannot be used ("not a readable npz", "'flow28' has NaN/inf values"), or None."""
    try:
        arrays = decode_npz(data)
    except Exception as err:  # noqa: BLE001 - zipfile, pickle and format errors alike mean a corrupt file
        return f"not a readable npz ({type(err).__name__})"
    bad = nonfinite(arrays)
    return f"{', '.join(repr(k) for k in bad)} has NaN/inf values" if bad else None


def failed_result(sample_id: str, modalities: Sequence[str], error: str, reason: str) -> SampleResult:
    """Every requested modality failed the same way (e.g. the worker died)."""
    return SampleResult(sample_id, {m: EntryResult("failed", reason, error) for m in modalities})


def process_row(row: Mapping[str, Any], cfg: PreprocessConfig, root: Path,
                modalities: Sequence[str] = MODALITIES) -> SampleResult:
    """Compute `modalities` of one row; never raises. Bad input -> the affected entries fail with the SampleError's
    reason and message; a bug -> every entry fails with its type and message, and its traceback is logged, so one
    broken sample cannot take the stage down."""
    cv2.setNumThreads(1)  # parallelism is across samples; OpenCV's own threads would oversubscribe the cores
    sample_id = str(row["sample_id"])
    try:
        output = preprocess_sample(row, cfg, root, modalities)
    except Exception as err:  # noqa: BLE001 - recorded per sample, see the docstring
        log.exception("sample %s: unexpected error", sample_id)
        return failed_result(sample_id, modalities, f"sample {sample_id}: internal error {type(err).__name__}: {err}",
                             "internal error")
    entries = {m: EntryResult("ok", data=encode_npz(o.arrays)) if o.status == "ok"
               else EntryResult(o.status, o.reason, o.error) for m, o in output.modalities.items()}
    return SampleResult(sample_id, entries, output.face, output.estimated)


def read_entries(path: Path) -> pd.DataFrame:
    """modalities.csv as strings; a missing one is empty, an unreadable one is empty with a warning (the cache is
    then recomputed: it is derived data)."""
    empty = pd.DataFrame(columns=list(ENTRY_COLUMNS), dtype=str)
    if not path.is_file():
        return empty
    try:
        entries = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as err:
        log.warning("%s is unreadable (%s); recomputing the cache", path, str(err).splitlines()[0])
        return empty
    if list(entries.columns) != list(ENTRY_COLUMNS):
        log.warning("%s has columns %s, expected %s; recomputing the cache", path, list(entries.columns),
                    list(ENTRY_COLUMNS))
        return empty
    return entries


def require_index(root: str | Path) -> Path:
    """`root/index.csv`, or the one-line DataError every reader of a cache gives when `mer preprocess` has not run
    (torch-free: `mer tune` checks it before importing torch, Ray and MLflow)."""
    index = Path(root) / "index.csv"
    if not index.is_file():
        raise DataError("no index.csv; run `mer preprocess` first", file=str(root))
    return index


class Cache:
    """One cache directory: `plan` says what to (re)compute, `write` stores each result as it arrives, `finish`
    writes modalities.csv, index.csv and manifest.json and removes files no entry refers to any more."""

    def __init__(self, out: str | Path, flush_every: float = 5.0) -> None:
        self.root = Path(out)
        self.flush_every = flush_every  # seconds between journal writes of modalities.csv while results arrive
        self._flushed = time.monotonic()
        self.index_path = self.root / "index.csv"
        self.entries_path = self.root / "modalities.csv"
        self.manifest_path = self.root / "manifest.json"
        self._entries: dict[tuple[str, str], dict[str, str]] = {}
        self._hashes: dict[tuple[str, str], str] = {}
        self._computed: set[tuple[str, str]] = set()
        self._reused: set[tuple[str, str]] = set()
        self._samples: dict[str, dict[str, str]] = {}  # sample id -> face, estimated

    def _valid(self, entry: Mapping[str, str], full: bool) -> bool:
        """The entry's file exists with its recorded size (full: and SHA-256, and it decodes to finite arrays)."""
        path = self.root / entry["file"]
        try:
            if not entry["file"] or path.stat().st_size != int(entry["bytes"]):
                return False
            if not full:
                return True
            data = path.read_bytes()
            if digest(data) != entry["sha256"]:
                return False
        except (OSError, ValueError):
            return False
        problem = entry_problem(data)
        if problem:
            log.warning("%s: %s; recomputing the entry", path, problem)
        return problem is None

    def plan(self, table: pd.DataFrame, cfg: PreprocessConfig, modalities: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """{sample id: modalities to compute} for the samples with anything to compute. An asked-for entry is reused
        when it is ok, its input hash is unchanged and its file matches its recorded size and SHA-256; entries not
        asked for are kept while their inputs are unchanged and their file has its size (failed ones are dropped:
        they are retried whenever asked for)."""
        modalities = check_modalities(modalities)
        versions = library_versions()
        previous = {(e["sample_id"], e["modality"]): e for e in read_entries(self.entries_path).to_dict("records")}
        self._entries, self._hashes, self._computed, self._reused = {}, {}, set(), set()
        todo: dict[str, tuple[str, ...]] = {}
        corrupt = 0
        for row in table.to_dict("records"):
            sid = str(row["sample_id"])
            hashes = input_hashes(row, cfg, MODALITIES, versions)
            compute = []
            for modality in MODALITIES:
                key = (sid, modality)
                old = previous.get(key)
                current = old is not None and old["input_hash"] == hashes[modality] and old["status"] == "ok"
                if modality in modalities:
                    if current and self._valid(old, full=True):
                        self._entries[key] = old
                        self._reused.add(key)
                    else:
                        corrupt += current
                        compute.append(modality)
                        self._hashes[key] = hashes[modality]
                elif current and self._valid(old, full=False):
                    self._entries[key] = old
            if compute:
                todo[sid] = tuple(compute)
        if corrupt:
            log.warning("%d cache entries no longer match the size/hash recorded when written: recomputing them",
                        corrupt)
        return todo

    def write(self, result: SampleResult) -> None:
        """Record one sample's results; an ok entry's file is written atomically (a killed run never leaves a
        half-written file behind) with its size and SHA-256."""
        self._samples[result.sample_id] = {"face": result.face, "estimated": result.estimated}
        for modality, entry in result.entries.items():
            key = (result.sample_id, modality)
            record = {"sample_id": result.sample_id, "modality": modality, "status": entry.status,
                      "reason": entry.reason, "error": entry.error, "file": "", "bytes": "", "sha256": "",
                      "input_hash": self._hashes.get(key, ""), "face": result.face, "estimated": result.estimated}
            if entry.status == "ok" and entry.data is not None:
                name = entry_file(result.sample_id, modality)
                atomic_write(self.root / name, entry.data)
                record.update(file=name, bytes=str(len(entry.data)), sha256=digest(entry.data))
            self._entries[key] = record
            self._computed.add(key)
        if time.monotonic() - self._flushed >= self.flush_every:
            self._write_entries()

    def _write_entries(self, samples: set[str] | None = None) -> list[dict[str, str]]:
        """modalities.csv from the entries known now (of `samples` only, when given), atomically. Also written
        while results arrive, so that a run killed before `finish` loses at most `flush_every` seconds of work:
        the next run finds the finished entries recorded and reuses them."""
        keys = sorted(self._entries, key=lambda k: (k[0], MODALITIES.index(k[1])))
        entries = [self._entries[k] for k in keys if samples is None or k[0] in samples]
        write_csv(self.entries_path, pd.DataFrame(entries, columns=list(ENTRY_COLUMNS)))
        self._flushed = time.monotonic()
        return entries

    def finish(self, table: pd.DataFrame, cfg: PreprocessConfig, modalities: Sequence[str],
               extra: Mapping[str, Any]) -> dict[str, Any]:
        """Write modalities.csv, index.csv and manifest.json (in that order, each atomically) and delete files no
        entry refers to; returns the manifest with this invocation's `computed` / `reused` counts added. Those stay
        out of manifest.json: the file describes the cache's content, and the data version is a hash of it
        (mer.components.tracking.base.data_version), so a re-run that changes nothing must leave it byte-identical --
        else every stored fold of the experiments on it would be retrained."""
        modalities = check_modalities(modalities)
        ids = table["sample_id"].astype(str).tolist()
        missing = [sid for sid in ids for m in modalities if (sid, m) not in self._entries]
        if missing:
            raise RuntimeError(f"no result for {len(missing)} entries, e.g. sample {missing[0]}")
        entries = self._write_entries(set(ids))
        index = table.copy()
        status = [self._sample_status(sid, modalities) for sid in ids]
        for column in STATUS_COLUMNS:
            index[column] = [s[column] for s in status]
        write_csv(self.index_path, index)
        self._remove_unreferenced({e["file"] for e in entries if e["file"]})
        counts = self._counts(index, ids, modalities)
        manifest = {
            "format": "per-modality entries (modalities.csv)",
            "params_hash": params_hash(cfg),
            "preprocess": cfg.model_dump(mode="json", by_alias=True),
            "modalities": list(modalities),
            "au_list": list(AU_LIST),
            "versions": library_versions(),
            **extra,
            "counts": _content_counts(counts),
            "coverage": coverage(index),
            "failures": [{"sample_id": r.sample_id, "reason": r.reason, "error": r.error}
                         for r in index.itertuples() if r.status != "ok"],
        }
        write_json(self.manifest_path, manifest)
        return {**manifest, "counts": counts}

    def _sample_status(self, sid: str, modalities: Sequence[str]) -> dict[str, str]:
        mine = [self._entries[(sid, m)] for m in MODALITIES if (sid, m) in self._entries]
        bad = [e for e in mine if e["modality"] in modalities and e["status"] != "ok"]
        errors = list(dict.fromkeys(e["error"] for e in bad))
        return {
            "status": "failed" if bad else "ok",
            "reason": bad[0]["reason"] if bad else "",
            "error": " | ".join(errors),
            "modalities": "+".join(e["modality"] for e in mine if e["status"] == "ok"),
            "face": next((e["face"] for e in mine if e["face"]), ""),
            "estimated": next((e["estimated"] for e in mine if e["estimated"]), ""),
        }

    def _counts(self, index: pd.DataFrame, ids: list[str], modalities: Sequence[str]) -> dict[str, Any]:
        ok = index["status"] == "ok"
        estimated: Counter[str] = Counter()
        for text in index["estimated"]:
            # key frames by name (`apex=23` -> apex); a value that is a source, not a number, by both
            # (`points5=template`), so each source is counted
            estimated.update(part if not part.partition("=")[2].isdigit() else part.partition("=")[0]
                             for part in text.split(";") if part)
        per_modality = {}
        for m in modalities:
            statuses = Counter(self._entries[(sid, m)]["status"] for sid in ids)
            per_modality[m] = {"ok": statuses["ok"], "failed": statuses["failed"],
                               "unavailable": statuses["unavailable"],
                               "computed": sum((sid, m) in self._computed for sid in ids),
                               "reused": sum((sid, m) in self._reused for sid in ids)}
        computed = {sid for sid, m in self._computed if m in modalities}
        return {
            "total": len(index), "ok": int(ok.sum()), "failed": int((~ok).sum()),
            "computed": sum(sid in computed for sid in ids), "reused": sum(sid not in computed for sid in ids),
            "face": dict(Counter(index.loc[ok, "face"])),
            "estimated": dict(estimated),
            "excluded": {str(k): int(v) for k, v in index.loc[~ok, "reason"].value_counts().items()},
            "modalities": per_modality,
        }

    def _remove_unreferenced(self, keep: set[str]) -> None:
        samples = self.root / "samples"
        if not samples.is_dir():
            return
        for path in sorted(samples.rglob("*"), reverse=True):  # files before their folders
            relative = path.relative_to(self.root).as_posix()
            if path.is_file() and relative not in keep:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def coverage(index: pd.DataFrame, usable: pd.Series | None = None) -> dict[str, Any]:
    """How many of the collection's samples are usable: {"usable", "total", "per_dataset": {dataset: {"usable",
    "total"}}}; `usable` is a boolean mask over `index` (default: status ok)."""
    mask = (index["status"] == "ok") if usable is None else usable
    per = {str(d): {"usable": int(mask[group.index].sum()), "total": len(group)}
           for d, group in index.groupby("dataset", sort=True)}
    return {"usable": int(mask.sum()), "total": len(index), "per_dataset": per}


def _content_counts(counts: Mapping[str, Any]) -> dict[str, Any]:
    """`counts` without what depends on the invocation rather than the cache (computed / reused, overall and per
    modality)."""
    run = ("computed", "reused")
    return {k: ({m: {c: n for c, n in v.items() if c not in run} for m, v in value.items()} if k == "modalities"
                else value) for k, value in counts.items() if k not in run}
