"""`mer synth`: write the embedded synthetic dataset (CASME II layout) -- the first DVC stage of the demo."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from components.common import add_params_arguments, params_from_args
from mer_model.config import SynthConfig

log = logging.getLogger(__name__)


def synthesize(cfg: SynthConfig) -> Path:
    """Generate the dataset into cfg.out unless a manifest says the same configuration is already there."""
    from mer_model.data.synthetic import is_up_to_date, write_dataset

    root = Path(cfg.out)
    if is_up_to_date(cfg, root):
        log.info("synthetic dataset in %s is up to date (same configuration and generator version)", root)
        return root
    start = time.perf_counter()
    write_dataset(cfg, root)
    log.info("wrote %d subjects x %d clips (%d px) to %s in %.1f s", cfg.subjects, cfg.clips_per_subject,
             cfg.image_size, root, time.perf_counter() - start)
    return root


def _run(args: argparse.Namespace) -> int:
    synthesize(params_from_args(args).synth)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth", help="write the synthetic micro-expression dataset (CASME II layout)",
        description="Write the synthetic dataset to synth.out: frames, CASME2-coding-synthetic.xlsx and ground-truth "
                    "landmarks/flow. Skips the work when synth.out already holds the same configuration.")
    add_params_arguments(parser)
    parser.set_defaults(func=_run)
