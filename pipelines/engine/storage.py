"""Finished folds under `<root>/<fold key>/`: `result.json` (a FoldSummary) and `predictions.csv`; result.json is
written last, so its presence means the fold is complete. `root` is a local directory or a pyarrow URI such as
s3://bucket/prefix, so a restarted driver on another node, a restored trial, or another trial with the same
configuration reads a fold back instead of training it again. result.json records the SHA-256 of predictions.csv: a
fold whose predictions no longer match (truncated, edited) counts as not finished, with a warning, and is trained
again rather than pooled. A fold's checkpoint lives beside it
(`checkpoint/last.pt`) so that a retried task continues where its worker died."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from pyarrow import fs as pafs

from mer.model.errors import ServiceError
from mer.model.io import atomic_write, digest
from mer.model.training.results import CHECKPOINT_NAME, FoldSummary

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"  # a fold that failed with a reason (NonFiniteError): reported, never pooled
PREDICTIONS_FILE = "predictions.csv"
CHECKPOINT_DIR = "checkpoint"


class FoldStorage:
    """Read and write finished folds; cheap to create (one per task or callback), never pickled with a connection."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self.base = pafs.FileSystem.from_uri(self.root if "://" in self.root else
                                                      str(Path(self.root).resolve()))
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def _path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _write(self, path: str, data: bytes) -> None:
        """Local: `atomic_write`. An object store: one upload, which an object store makes visible whole or not at
        all (a temporary object and a move would be a copy too)."""
        if self.local:
            atomic_write(path, data)
            return
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def _read(self, path: str) -> bytes | None:
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as src:
            return src.read()

    def _finished(self, key: str) -> tuple[FoldSummary, bytes] | None:
        """(summary, predictions.csv bytes) of a finished fold whose predictions match the digest its summary
        recorded, or None."""
        raw = self._read(self._path(key, RESULT_FILE))
        if raw is None:
            return None
        summary = FoldSummary.from_json(json.loads(raw), self._path(key, RESULT_FILE))
        csv = self._read(self._path(key, PREDICTIONS_FILE))
        if csv is None:
            return None
        if summary.predictions_sha256 and digest(csv) != summary.predictions_sha256:
            log.warning("%s: does not match the digest in its %s (truncated or edited): fold %s is trained again",
                        self._path(key, PREDICTIONS_FILE), RESULT_FILE, summary.fold)
            return None
        return summary, csv

    def summary(self, key: str) -> FoldSummary | None:
        """The stored summary of a finished fold, or None."""
        found = self._finished(key)
        return None if found is None else found[0]

    def load(self, key: str) -> tuple[FoldSummary, pd.DataFrame] | None:
        """The summary and test predictions of a finished fold, or None."""
        found = self._finished(key)
        return None if found is None else (found[0], pd.read_csv(io.BytesIO(found[1]), keep_default_na=False))

    def save(self, summary: FoldSummary, predictions: pd.DataFrame) -> None:
        """Store a finished fold: predictions first, then result.json (recording their SHA-256), whose presence marks
        the fold finished."""
        csv = predictions.to_csv(index=False).encode()
        summary.predictions_sha256 = digest(csv)
        self._write(self._path(summary.key, PREDICTIONS_FILE), csv)
        self._write(self._path(summary.key, RESULT_FILE), json.dumps(summary.to_json()).encode())

    def save_failure(self, key: str, fold: str, error: str) -> None:
        """Record why a fold failed (`failed.json`); it stays unfinished (no result.json) and is tried again by a
        later run."""
        self._write(self._path(key, FAILED_FILE), json.dumps({"fold": fold, "error": error}).encode())

    def failure(self, key: str) -> dict[str, str] | None:
        """{"fold", "error"} of a fold that failed and has not finished since, or None."""
        if self._read(self._path(key, RESULT_FILE)) is not None:
            return None
        raw = self._read(self._path(key, FAILED_FILE))
        return None if raw is None else {k: str(v) for k, v in json.loads(raw).items()}

    def checkpoint_dir(self, key: str) -> str:
        """A local directory for train_fold's checkpoint: the storage itself when local, else a scratch directory
        seeded from and synced back to the remote copy (`pull_checkpoint` / `push_checkpoint`)."""
        if self.local:
            return self._path(key, CHECKPOINT_DIR)
        return str(Path(tempfile.gettempdir()) / "mer-fold-checkpoints" / key)

    def pull_checkpoint(self, key: str, local_dir: str) -> None:
        if self.local:
            return
        raw = self._read(self._path(key, CHECKPOINT_DIR, CHECKPOINT_NAME))
        if raw is not None:
            atomic_write(Path(local_dir) / CHECKPOINT_NAME, raw)

    def push_checkpoint(self, key: str, local_dir: str) -> None:
        if self.local:
            return
        path = Path(local_dir) / CHECKPOINT_NAME
        if path.is_file():
            self._write(self._path(key, CHECKPOINT_DIR, CHECKPOINT_NAME), path.read_bytes())


@contextlib.contextmanager
def experiment_lock(storage_root: str, experiment_key: str) -> Iterator[Path]:
    """Hold the one driver lock of an experiment key for the block, or refuse with one line: a second driver of the
    same experiment would mark the first one's live runs FAILED (as stale) and train its folds twice.

    The lock is a file lock (`flock`, released by the kernel when the holder dies, so a killed driver never blocks
    the next start) beside local storage, `<storage_root>/<experiment_key>.lock`. With remote storage (s3://) it
    lives in this machine's temp dir: two drivers on one host are caught, two on different hosts are not."""
    root = Path(storage_root) if "://" not in storage_root else Path(tempfile.gettempdir()) / "mer-locks"
    path = root / f"{experiment_key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ServiceError(f"tune.storage_path: experiment {experiment_key} is already being run by another "
                               f"driver ({holder}, lock {path}); wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
