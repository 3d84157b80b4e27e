"""User-facing error types.

Every error a user can cause (a bad path, an unparseable annotation row, an invalid params.yaml value) is raised as a
`MerError` subclass carrying one line that names the file, row or key. The CLI prints that line and exits non-zero
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MerError(Exception):
    """Base class of errors caused by user input; `str(err)` is a complete one-line message."""


class ConfigError(MerError):
    """An invalid or missing configuration value; the message names the key."""


class ServiceError(MerError):
    """A service the platform runs on (local Ray, a Ray cluster, the tracking server) failed to start or cannot be
    reached; the message names the setting that points at it."""


class DataError(MerError):
    """A problem with a dataset file or annotation row; the message names the file and row."""

    def __init__(self, message: str, *, file: str | None = None, row: int | str | None = None) -> None:
        where = ", ".join(p for p in (f"{file}" if file else "", f"row {row}" if row is not None else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.row = row


class NonFiniteError(MerError):
    """Numbers that became NaN or infinite where only finite ones mean anything: a training loss that diverged
    (e.g. far too high a learning rate), weights or model outputs; the message names the fold, file or sample. What
    holds them is never stored as a result."""


class SampleError(MerError):
    """One sample (or one modality of it) cannot be processed; the run records it and continues with the others.

    `reason` is a short, stable category (e.g. "frame size changes", "zero motion") under which the stage counts
    the exclusion; the message says which file and why.
    """

    def __init__(self, sample_id: str, message: str, *, reason: str = "error") -> None:
        super().__init__(f"sample {sample_id}: {message}")
        self.sample_id = sample_id
        self.reason = reason
