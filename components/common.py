"""Helpers shared by the commands: the params file, `-S key=value` overrides, the one way a command is run (user
errors as one line, exit code 2), output-directory checks."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mer.components.settings import Params, load_params
from mer.model.config import parse_override
from mer.model.errors import ConfigError, user_error


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a parameter, e.g. -S train.epochs=3 (repeatable)",
    )


def params_from_args(args: argparse.Namespace) -> Params:
    """params.yaml (`--params`) with the `-S` overrides, less those of sections a command keeps in its own file
    (`settings_elsewhere`: `mer benchmark`'s catalogue)."""
    elsewhere = getattr(args, "settings_elsewhere", ())
    overrides = dict(parse_override(text) for text in args.overrides)
    return load_params(args.params, {k: v for k, v in overrides.items() if k.split(".", 1)[0] not in elsewhere})


def run_command(prog: str, function: Callable[..., Any], args: argparse.Namespace, with_args: bool = False) -> int:
    """Run a command the way every `mer` subcommand (and `python -m mer.pipelines.loso`) runs: the params of `--params`
    with the `-S` overrides, then `function(params)` (exit code 0), or `function(params, args)` for a command with
    options of its own (`with_args`; its return value is the exit code). A user error raised anywhere inside, also
    within a Ray task, a Tune callback or a tracker call (mer.model.errors.user_error), is one line `PROG: error: ...`
    on stderr without a traceback and exit code 2; an interrupt is exit code 130."""
    try:
        params = params_from_args(args)
        if with_args:
            return int(function(params, args) or 0)
        function(params)
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a user error raised inside Ray, Tune or MLflow is still one line
        found = user_error(err)
        if found is None:
            raise
        print(f"{prog}: error: {found}", file=sys.stderr)
        return 2


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
