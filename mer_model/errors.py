"""User-facing error types.

Every error a user can cause (a bad path, an unparseable annotation row, an invalid params.yaml value) is raised as a
`MerError` subclass carrying one line that names the file, row or key. The CLI prints that line and exits non-zero
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator


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


class StorageError(MerError):
    """A file the platform writes could not be written: the disk (or quota) is full. The message names the file or
    the store; nothing half-written is left (writes are atomic, `mer.model.io.atomic_write`)."""


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
# What SQLite says when its file cannot grow (SQLITE_FULL), through sqlite3 / SQLAlchemy / MLflow without an errno.
SQLITE_FULL = "database or disk is full"


def causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and every exception behind it: `__cause__`, `__context__`, and the `cause` of a Ray task error (the
    exception the task raised), each once."""
    todo, seen = [err], set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]


def user_error(err: BaseException) -> MerError | None:
    """The user-facing error behind `err`, wherever it was raised (a Ray task, a Tune callback, a tracker call): the
    first MerError in its chain, or a StorageError for a full disk; None for a bug (which keeps its traceback)."""
    for current in causes(err):
        # A Ray task's error is an instance of the task's exception class too, but prints Ray's traceback: skipped
        # here, its `cause` (the exception itself) comes next.
        if isinstance(current, MerError) and not isinstance(getattr(current, "cause", None), BaseException):
            return current
    for current in causes(err):
        if isinstance(current, OSError) and current.errno in FULL_DISK:
            where = f"{current.filename}: " if current.filename else ""
            return StorageError(f"{where}no space left on device ({current.strerror}); free space and run again")
    for current in causes(err):
        if SQLITE_FULL in str(current):
            return StorageError(f"tracking store: {SQLITE_FULL}; free space on its disk and run again")
    return None
