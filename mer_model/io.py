"""Files the platform writes and reads back: atomic writes, validated reads, content digests.

Why: a run killed mid-write (Ctrl-C, a pre-empted pod, a full disk) must never leave a truncated file that a later
run takes for a finished one. Every writer goes through `atomic_write` (a temporary file in the same directory,
fsync, then `os.replace`, which is atomic on POSIX and Windows), so a reader sees the old file or the new one, never
half of one. Readers of JSON the platform wrote use `read_json`, which turns a missing or unparseable file into one
line naming it (`DataError`) instead of a traceback. Cache entries are validated by `digest` (size and SHA-256
recorded when they were written).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from mer.model.errors import FULL_DISK, DataError, StorageError


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (str: UTF-8) to `path` atomically, creating its directory; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in FULL_DISK:
            raise StorageError(f"{path}: no space left on device; nothing was written (the previous file, if any, "
                               "is intact): free space and run again") from None
        raise
    return path


def write_with(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """What `write` puts into a binary buffer (torch.save, a figure's savefig, np.savez), written atomically."""
    buffer = io.BytesIO()
    write(buffer)
    return atomic_write(path, buffer.getvalue())


def write_json(path: str | Path, value: Any, **dumps: Any) -> Path:
    """`value` as indented JSON (one trailing newline), written atomically; `dumps`: more json.dumps options."""
    return atomic_write(path, json.dumps(value, indent=2, **dumps) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> Path:
    """A table as CSV without the index, written atomically."""
    return atomic_write(path, frame.to_csv(index=False))


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file the platform wrote; a missing, unreadable or invalid one is a DataError naming it and `what`
    it is (e.g. "ingest summary"), never a JSONDecodeError traceback."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {what}: {err}", file=str(path)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{what} is not valid JSON (truncated or corrupt?): {err.msg} at line {err.lineno}",
                        file=str(path)) from None


def digest(data: bytes) -> str:
    """SHA-256 hex digest of `data` (cache entries record it with their size when written)."""
    return hashlib.sha256(data).hexdigest()
