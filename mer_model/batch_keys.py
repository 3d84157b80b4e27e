"""The batch-key spec: every array a model may read, once (docs/architecture.md, "Preprocessed cache").

For each key: the cache dtype and shape (as a function of the preprocessing configuration), its layout, whether its
values are 0..255 pixels, and its geometric kind, which says how an augmentation moves it. The data path
(`training.data.to_tensor`), the augmentation (`training.augment.apply`), the served model's example arrays and
signature (`inference.example_arrays`), the cache's modalities and what invalidates them
(`preprocess.modalities`), `preprocess.modalities`' validation (config.py) and the tests all derive from this
registry, so a new input is one entry here (plus its builder in `preprocess.sample`), the way timm lets a model own
its data config.

Producer: every key is one preprocessing modality of the same name, one cache entry (holding the key and its
`companions`), computed by `preprocess.sample`'s builder of that name from the preprocessing settings in `depends`;
registration order is the cache's canonical modality order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from mer.model.data.aus import AU_LIST
from mer.model.registry import Registry

if TYPE_CHECKING:  # config.py validates modalities against this registry: no import back at run time
    from mer.model.config import PreprocessConfig


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
    is what point sets are mapped in. Producer: `depends` = the `preprocess` settings (dotted) that shape the
    array, so a change recomputes this modality and nothing else (face_size the 224 px crops, not the flows);
    `companions` = further arrays stored in the same cache entry (e.g. `au_coded` beside `aus`)."""

    name: str
    dtype: type
    shape: Callable[[PreprocessConfig], tuple[int, ...]]
    layout: str
    geometry: Geometry
    meaning: str
    pixels: bool = False
    hwc: bool = False
    frame_of: tuple[str, int] | None = None
    depends: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()

    @property
    def stored(self) -> tuple[str, ...]:
        """The arrays this key's cache entry holds."""
        return (self.name, *self.companions)


BATCH_KEYS: Registry[BatchKey] = Registry("batch key", "preprocess.modalities", "mer_model/batch_keys.py")

_ALIGN = ("detector", "detector_upsample", "margin")
_TVL1 = tuple(f"flow.{k}" for k in ("tau", "lambda", "theta", "nscales", "warps", "epsilon", "inner_iterations",
                                    "outer_iterations", "scale_step", "median_filtering"))
for _key in (
    BatchKey("flow28", np.float32, lambda c: (3, c.flow.map_size, c.flow.map_size), "C,H,W",
             Geometry.MINMAX_FLOW_MAP, "onset->apex u, v, optical strain, each min-max normalised to [0, 1]",
             depends=_ALIGN + ("flow",)),
    BatchKey("points5", np.float32, lambda c: (5, 2), "P,xy", Geometry.POINTS5,
             "eyes, nose tip, mouth corners in the flow28 frame (MTCNN order)", frame_of=("flow28", 28),
             depends=_ALIGN + ("flow.map_size",)),
    BatchKey("onset224", np.uint8, lambda c: (c.face_size, c.face_size, 3), "H,W,RGB", Geometry.IMAGE,
             "aligned RGB onset face crop", pixels=True, hwc=True, depends=_ALIGN + ("face_size",)),
    BatchKey("apex224", np.uint8, lambda c: (c.face_size, c.face_size, 3), "H,W,RGB", Geometry.IMAGE,
             "aligned RGB apex face crop", pixels=True, hwc=True, depends=_ALIGN + ("face_size",)),
    BatchKey("frames128", np.uint8, lambda c: (c.seq_frames, c.seq_size, c.seq_size), "N,H,W",
             Geometry.FRAME_STACK, "aligned grey frames sampled onset..offset", pixels=True,
             depends=_ALIGN + ("seq_frames", "seq_size")),
    BatchKey("landmarks68", np.float32, lambda c: (c.seq_frames, 68, 2), "N,68,xy", Geometry.LANDMARKS68,
             "68 landmarks per sampled frame in pixels of the 128 frame", frame_of=("frames128", 128),
             depends=_ALIGN + ("seq_frames", "seq_size")),
    BatchKey("flows128", np.float16, lambda c: (c.seq_frames - 1, 2, c.seq_size, c.seq_size), "N-1,uv,H,W",
             Geometry.FLOW_VECTORS, "TV-L1 flow between consecutive sampled frames, pixels of the 128 frame",
             frame_of=("frames128", 128), depends=_ALIGN + ("seq_frames", "seq_size") + _TVL1),
    BatchKey("aus", np.uint8, lambda c: (len(AU_LIST),), "AU", Geometry.NONE, "multi-hot over AU_LIST",
             companions=("au_coded",)),
):
    BATCH_KEYS.add(_key.name, _key)


def example_array(name: str, cfg: PreprocessConfig) -> np.ndarray:
    """A zero array with the cache shape and dtype of `name` under `cfg`."""
    spec = BATCH_KEYS[name]
    return np.zeros(spec.shape(cfg), dtype=spec.dtype)
