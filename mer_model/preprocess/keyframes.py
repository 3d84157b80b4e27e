"""Key frames that a sheet (or a user) did not give: the one rule shared by preprocessing and `mer predict`.

* apex = the frame in (onset, offset] whose TV-L1 flow FROM THE ONSET has the largest mean magnitude, on the aligned
  grey face (the clip's one onset alignment) at `APEX_SEARCH_SIZE` px. A micro-expression's apex is by definition
  its frame of largest displacement from the neutral onset; the small size keeps the search at one cheap flow per
  frame. (Annotated apexes of CASME II/SAMM were coded by FACS experts on the same criterion.)
* offset = the last frame present, where the folder holds just the clip (`mer predict`'s folder or video, CASME II,
  SAMM, SMIC clip folders). Where a folder is a long recording holding several samples (CAS(ME)^3) its last frame is
  not one sample's offset, so nothing is estimated there.
"""

from __future__ import annotations

import logging
import os
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mer.model.config import FlowConfig
from mer.model.errors import SampleError
from mer.model.preprocess.face import Alignment
from mer.model.preprocess.flow import compute_flow, tvl1

log = logging.getLogger(__name__)

APEX_SEARCH_SIZE = 64


def present_frames(folder: Path, template: str) -> list[int]:
    """Sorted frame numbers n for which `template.format(n)` is a file name in `folder` (one directory listing)."""
    parts = list(string.Formatter().parse(template))
    fields = [p for p in parts if p[1] is not None]
    if len(fields) != 1:
        raise ValueError(f"frame template {template!r} must have exactly one number field")
    pattern = "".join(re.escape(literal) + ("(\\d+)" if field is not None else "") for literal, field, _, _ in parts)
    names = os.listdir(folder) if folder.is_dir() else []
    numbers = (int(m.group(1)) for m in map(re.compile(pattern).fullmatch, names) if m)
    return sorted({n for n in numbers if template.format(n) in names})


def apex_by_motion(grey_of: Callable[[int], np.ndarray], onset: int, candidates: Sequence[int], align: Alignment,
                   flow: FlowConfig, sample_id: str, size: int = APEX_SEARCH_SIZE) -> int:
    """The candidate frame with the largest mean TV-L1 magnitude from the onset (module docstring).

    `grey_of(n)`: greyscale uint8 frame n; every frame must have the onset frame's size (a frame of another size
    would register as motion), else SampleError naming the sample.
    """
    candidates = [n for n in candidates if n != onset]
    if not candidates:
        return onset
    onset_grey = grey_of(onset)
    reference = align.warp(onset_grey, size)
    solver = tvl1(flow)
    magnitudes = []
    for number in candidates:
        image = grey_of(number)
        if image.shape != onset_grey.shape:
            raise SampleError(sample_id, f"frame {number} is {image.shape[1]}x{image.shape[0]}, the onset frame "
                                         f"{onset_grey.shape[1]}x{onset_grey.shape[0]}", reason="frame size changes")
        magnitudes.append(float(np.linalg.norm(compute_flow(solver, reference, align.warp(image, size)), axis=-1)
                                .mean()))
    log.debug("%s: mean flow magnitude from onset %s", sample_id, dict(zip(candidates, np.round(magnitudes, 3))))
    return candidates[int(np.argmax(magnitudes))]
