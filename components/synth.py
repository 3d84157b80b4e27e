"""`mer synth`: write the embedded synthetic dataset (CASME II layout) -- the first DVC stage of the demo."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mer.components.settings import Params
from mer.model.config import SynthConfig

log = logging.getLogger(__name__)


def synthesize(cfg: SynthConfig) -> Path:
    """Generate the dataset into cfg.out unless a manifest says the same configuration is already there."""
    from mer.model.data.synthetic import is_up_to_date, write_dataset

    root = Path(cfg.out)
    if is_up_to_date(cfg, root):
        log.info("synthetic dataset in %s is up to date (same configuration and generator version)", root)
        return root
    start = time.perf_counter()
    write_dataset(cfg, root)
    log.info("wrote %d subjects x %d clips (%d px) to %s in %.1f s", cfg.subjects, cfg.clips_per_subject,
             cfg.image_size, root, time.perf_counter() - start)
    return root


def write_synthetic(params: Params) -> Path:
    """The `synth` stage: `synthesize(params.synth)`."""
    return synthesize(params.synth)
