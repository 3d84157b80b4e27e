"""The batch-key spec: every array a model may read, once (docs/architecture.md, "Preprocessed cache").

For each key: the cache dtype and shape (as a function of the preprocessing configuration), its layout, whether its
values are 0..255 pixels, and its geometric kind, which says how an augmentation moves it. The data path
(`training.data.to_tensor`), the augmentation (`training.augment.apply`), the served model's example arrays and
signature (`inference.example_arrays`) and the tests all derive from this table, so a new input is one entry here,
the way timm lets a model own its data config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from mer_model.config import PreprocessConfig
from mer_model.data.aus import AU_LIST


class Geometry(Enum):
    """How a sample-level affine augmentation (training.augment) transforms an array."""

    IMAGE = "image"  # (H, W, C) pixels: warped
    FRAME_STACK = "frame stack"  # (N, H, W) frames: every frame warped alike
    FLOW_VECTORS = "flow vectors"  # (N-1, 2, H, W) displacements in pixels: warped, vectors rotated/flipped
    MINMAX_FLOW_MAP = "min-max flow map"  # (3, H, W) u, v, strain min-max normalised to [0, 1]: warped, u -> 1 - u
    POINTS5 = "5 points"  # (5, 2) x, y in the frame of `frame_of`: mapped, mirrored on a flip
    LANDMARKS68 = "68 landmarks"  # (N, 68, 2) x, y in the frame of `frame_of`: mapped, mirrored on a flip
    NONE = "none"  # no geometry (AU vectors, flags): passed through


@dataclass(frozen=True)
class BatchKey:
    """One cache array / batch tensor. `shape(cfg)` is the cache shape of one sample; `layout` names its axes;
    `pixels`: uint8 0..255 in the cache, floats in [0, 1] in the batch; `hwc`: channels last in the cache, first in
    the batch; `frame_of`: the key whose pixel frame this array lives in (and that frame's default side), which
    is what point sets are mapped in."""

    name: str
    dtype: type
    shape: Callable[[PreprocessConfig], tuple[int, ...]]
    layout: str
    geometry: Geometry
    meaning: str
    pixels: bool = False
    hwc: bool = False
    frame_of: tuple[str, int] | None = None


BATCH_KEYS: dict[str, BatchKey] = {k.name: k for k in (
    BatchKey("flow28", np.float32, lambda c: (3, c.flow.map_size, c.flow.map_size), "C,H,W",
             Geometry.MINMAX_FLOW_MAP, "onset->apex u, v, optical strain, each min-max normalised to [0, 1]"),
    BatchKey("points5", np.float32, lambda c: (5, 2), "P,xy", Geometry.POINTS5,
             "eyes, nose tip, mouth corners in the flow28 frame (MTCNN order)", frame_of=("flow28", 28)),
    BatchKey("onset224", np.uint8, lambda c: (c.face_size, c.face_size, 3), "H,W,RGB", Geometry.IMAGE,
             "aligned RGB onset face crop", pixels=True, hwc=True),
    BatchKey("apex224", np.uint8, lambda c: (c.face_size, c.face_size, 3), "H,W,RGB", Geometry.IMAGE,
             "aligned RGB apex face crop", pixels=True, hwc=True),
    BatchKey("frames128", np.uint8, lambda c: (c.seq_frames, c.seq_size, c.seq_size), "N,H,W",
             Geometry.FRAME_STACK, "aligned grey frames sampled onset..offset", pixels=True),
    BatchKey("flows128", np.float16, lambda c: (c.seq_frames - 1, 2, c.seq_size, c.seq_size), "N-1,uv,H,W",
             Geometry.FLOW_VECTORS, "TV-L1 flow between consecutive sampled frames, pixels of the 128 frame",
             frame_of=("frames128", 128)),
    BatchKey("landmarks68", np.float32, lambda c: (c.seq_frames, 68, 2), "N,68,xy", Geometry.LANDMARKS68,
             "68 landmarks per sampled frame in pixels of the 128 frame", frame_of=("frames128", 128)),
    BatchKey("aus", np.uint8, lambda c: (len(AU_LIST),), "AU", Geometry.NONE, "multi-hot over AU_LIST"),
)}


def example_array(name: str, cfg: PreprocessConfig) -> np.ndarray:
    """A zero array with the cache shape and dtype of `name` under `cfg`."""
    spec = BATCH_KEYS[name]
    return np.zeros(spec.shape(cfg), dtype=spec.dtype)
