"""Helpers shared by the component CLIs: the params file, `-S key=value` overrides, output-directory checks."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from mer_model.config import Params, load_params, parse_override
from mer_model.errors import ConfigError


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a parameter, e.g. -S train.epochs=3 (repeatable)",
    )


def params_from_args(args: argparse.Namespace) -> Params:
    overrides = dict(parse_override(text) for text in args.overrides)
    return load_params(args.params, overrides)


MIN_FREE_MB = 100  # below this an output directory counts as full: caches, checkpoints and reports need room


def check_output_dir(path: str | Path, key: str, min_free_mb: int = MIN_FREE_MB) -> Path:
    """Create `path` and prove it writable and not (nearly) full BEFORE long work starts, so that a bad output
    setting fails in a second with one line naming `key` instead of after hours of preprocessing or training."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mer-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: {path}: output directory is not writable ({err.strerror or err})") from None
    free_mb = shutil.disk_usage(path).free // 2**20
    if free_mb < min_free_mb:
        raise ConfigError(f"{key}: {path}: only {free_mb} MiB free on its disk, need at least {min_free_mb} MiB")
    return path
