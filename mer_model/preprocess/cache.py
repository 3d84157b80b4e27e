"""The preprocessed cache on disk: samples/<id>.npz, index.csv, manifest.json (docs/architecture.md).

Why a per-sample cache with a parameter hash: preprocessing (TV-L1 above all) dominates the cost of an experiment, so a
re-run must redo only samples that are missing, failed, or whose annotation row changed, and must redo EVERYTHING
when a parameter that shapes the arrays changed (the hash covers the preprocess section except where/how it runs, the
AU vocabulary and the OpenCV/dlib versions).

`process_row` is what a worker runs: one row -> a `SampleResult` carrying the compressed npz bytes, so that on a
cluster only the driver writes files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from mer_model.config import PreprocessConfig
from mer_model.data.aus import AU_LIST
from mer_model.data.schema import COLUMNS
from mer_model.errors import DataError, SampleError
from mer_model.preprocess.sample import preprocess_sample

log = logging.getLogger(__name__)

# Fields of PreprocessConfig that decide where and how fast the stage runs, not what it produces.
RUNTIME_FIELDS = {"out", "num_workers", "ray_address"}
STATUS_COLUMNS = ("status", "error", "npz", "face")


def sample_file(sample_id: str) -> str:
    """Cache-relative path of a sample's npz (the id's '/' become '__')."""
    return f"samples/{sample_id.replace('/', '__')}.npz"


def library_versions() -> dict[str, str]:
    import dlib

    return {"opencv": cv2.__version__, "dlib": dlib.__version__, "numpy": np.__version__}


def params_hash(cfg: PreprocessConfig) -> str:
    """Hash of everything that shapes the arrays; a change invalidates every cached sample."""
    payload = {
        "preprocess": cfg.model_dump(mode="json", by_alias=True, exclude=RUNTIME_FIELDS),
        "au_list": list(AU_LIST),
        "versions": library_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SampleResult:
    """Outcome of one sample: `npz` holds the compressed file's bytes when status is ok."""

    sample_id: str
    status: str  # "ok" | "failed"
    error: str = ""
    face: str = ""
    npz: bytes | None = None


def encode_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def process_row(row: Mapping[str, Any], cfg: PreprocessConfig, root: Path) -> SampleResult:
    """Preprocess one row; never raises. Bad input -> failed with the SampleError's message; a bug -> failed with its
    type and message, and its traceback logged, so one broken sample cannot take the stage down."""
    cv2.setNumThreads(1)  # parallelism is across samples; OpenCV's own threads would oversubscribe the cores
    sample_id = str(row["sample_id"])
    try:
        output = preprocess_sample(row, cfg, root)
    except SampleError as err:
        return SampleResult(sample_id, "failed", str(err))
    except Exception as err:  # noqa: BLE001 - recorded per sample, see the docstring
        log.exception("sample %s: unexpected error", sample_id)
        return SampleResult(sample_id, "failed", f"sample {sample_id}: internal error {type(err).__name__}: {err}")
    return SampleResult(sample_id, "ok", face=output.face, npz=encode_npz(output.arrays))


def _as_csv_strings(table: pd.DataFrame) -> pd.DataFrame:
    """The table as index.csv stores it, so that rows can be compared with a previous run's index."""
    return pd.read_csv(io.StringIO(table.to_csv(index=False)), dtype=str, keep_default_na=False)


class Cache:
    """One cache directory; `plan` says what to (re)compute, `write` stores a result, `finish` writes index + manifest."""

    def __init__(self, out: str | Path) -> None:
        self.root = Path(out)
        self.index_path = self.root / "index.csv"
        self.manifest_path = self.root / "manifest.json"

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; recomputing every sample", self.manifest_path)
            return {}

    def plan(self, table: pd.DataFrame, cfg: PreprocessConfig) -> tuple[list[str], dict[str, dict[str, str]]]:
        """(sample ids to compute, {sample id: previous status columns} of those reused)."""
        manifest = self.read_manifest()
        if manifest.get("params_hash") != params_hash(cfg) or not self.index_path.is_file():
            if manifest:
                log.info("preprocessing parameters or library versions changed: recomputing every sample")
            return table["sample_id"].astype(str).tolist(), {}
        previous = pd.read_csv(self.index_path, dtype=str, keep_default_na=False).set_index("sample_id", drop=False)
        current = _as_csv_strings(table)
        missing = [c for c in COLUMNS if c not in previous.columns]
        if missing:  # written before the schema had these columns (e.g. au_coded): its npz files lack their arrays
            log.info("%s lacks columns %s: recomputing every sample", self.index_path, ", ".join(missing))
            return table["sample_id"].astype(str).tolist(), {}
        columns = list(COLUMNS)
        todo: list[str] = []
        reused: dict[str, dict[str, str]] = {}
        for _, row in current.iterrows():
            sid = row["sample_id"]
            old = previous.loc[sid] if sid in previous.index else None
            if (
                old is not None
                and old["status"] == "ok"
                and (self.root / old["npz"]).is_file()
                and all(old[c] == row[c] for c in columns)
            ):
                reused[sid] = {c: old[c] for c in STATUS_COLUMNS}
            else:
                todo.append(sid)
        return todo, reused

    def write(self, result: SampleResult) -> None:
        """Store an ok result's npz atomically (a killed run never leaves a half-written file behind)."""
        if result.npz is None:
            return
        path = self.root / sample_file(result.sample_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(result.npz)
        os.replace(tmp, path)

    def finish(
        self,
        table: pd.DataFrame,
        results: Iterable[SampleResult],
        reused: Mapping[str, Mapping[str, str]],
        cfg: PreprocessConfig,
        extra: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Write index.csv and manifest.json, delete npz files of samples no longer in the table; returns the manifest."""
        status: dict[str, dict[str, str]] = {sid: dict(cols) for sid, cols in reused.items()}
        computed = 0
        for result in results:
            computed += 1
            status[result.sample_id] = {
                "status": result.status,
                "error": result.error,
                "npz": sample_file(result.sample_id) if result.status == "ok" else "",
                "face": result.face,
            }
        ids = table["sample_id"].astype(str)
        missing = [sid for sid in ids if sid not in status]
        if missing:
            raise DataError(f"no result for {len(missing)} samples, e.g. {missing[0]}", file=str(self.index_path))
        index = table.copy()
        for column in STATUS_COLUMNS:
            index[column] = [status[sid][column] for sid in ids]
        self.root.mkdir(parents=True, exist_ok=True)
        index.to_csv(self.index_path, index=False)
        self._remove_stale(set(index["npz"]))

        failed = index[index["status"] != "ok"]
        manifest = {
            "params_hash": params_hash(cfg),
            "preprocess": cfg.model_dump(mode="json", by_alias=True),
            "au_list": list(AU_LIST),
            "versions": library_versions(),
            **extra,
            "counts": {
                "total": len(index),
                "ok": int((index["status"] == "ok").sum()),
                "failed": len(failed),
                "computed": computed,
                "reused": len(reused),
                "face": dict(Counter(index.loc[index["status"] == "ok", "face"])),
            },
            "failures": [{"sample_id": r.sample_id, "error": r.error} for r in failed.itertuples()],
        }
        self.manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    def _remove_stale(self, keep: set[str]) -> None:
        samples = self.root / "samples"
        if not samples.is_dir():
            return
        for path in samples.iterdir():
            if f"samples/{path.name}" not in keep:
                path.unlink()
