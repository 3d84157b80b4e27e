"""One logging setup for every entry point: quiet by default, informative with `--verbose`.

By default the platform's own loggers (its packages below) say what they do at INFO (progress, results, where files
went) and every other library only its warnings; `--verbose` shows every library's INFO and the platform's DEBUG.
"""

from __future__ import annotations

import logging

# The platform's top-level packages (and `mer`, the CLI's logger).
PLATFORM_LOGGERS = ("mer", "mer_model", "components", "pipelines", "benchmarks", "__main__")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for name in PLATFORM_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
