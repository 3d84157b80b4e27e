"""One logging setup for every entry point: quiet by default, informative with `--verbose`.

By default the platform's own loggers (its packages below) say what they do at INFO (progress, results, where files
went) and every other library only its warnings; `--verbose` shows every library's INFO and the platform's DEBUG.
"""

from __future__ import annotations

import logging
import os
import sys

from mer.model.errors import user_error

# The platform's loggers: `mer` (the installed code's import root, and the CLI's own logger) and the scripts'.
PLATFORM_LOGGERS = ("mer", "benchmarks", "__main__")


def setup_logging(verbose: bool = False) -> None:
    # MLflow configures its own logger at INFO when it is imported (often after this call): its level is an
    # environment variable, which the processes this one starts (Ray workers, DVC stages) inherit too.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    # Ray prints a worker's line once with "[repeated Nx across cluster]" and a long hint when lines of several
    # workers differ only in their numbers (e.g. two folds' progress): each fold's line as written instead.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stderr.isatty():  # MLflow's download bars would be redrawn into a log file as one long line
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for name in PLATFORM_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)

class OneLineUserErrors(logging.Filter):
    """Ray Tune and MLflow's database store log a failure they then raise with a traceback. Where it is a user error
    (a full disk, a dead service: `mer.model.errors.user_error`), the command ends with that error in one line, so
    the record is cut to one line too; a bug keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        found = user_error(error) if error is not None else None
        if found is not None:
            record.msg, record.args = f"{record.getMessage().splitlines()[0]}: {found}", ()
            record.exc_info, record.exc_text = None, None
        return True


def one_line_user_errors(*loggers: str) -> None:
    """Install `OneLineUserErrors` on the named loggers (once each)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineUserErrors) for f in logger.filters):
            logger.addFilter(OneLineUserErrors())
