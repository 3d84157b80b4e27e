"""Inference on a new clip: a folder of frames or a video -> the cache arrays of training -> class probabilities.

Why it is built on the preprocessing library: a model only means something on inputs made exactly like its training
inputs, so a new clip is turned into an annotation-like row and handed to `mer.model.preprocess.preprocess_sample`
(alignment, TV-L1 flow and strain, crops, landmarks) with the preprocessing parameters the model was trained with.

Frame numbers: in a folder whose image files share one name pattern (`img46.jpg`, `001.png`, `006_00123.jpg`) the
number in the name is the frame number, so `--onset/--apex` use the dataset's own numbering; a video's frames are
numbered 1..T in decoding order.

Key frames, when not given (`default_key_frames`): onset = the first frame, offset = the last frame, apex = the frame
whose TV-L1 flow FROM THE ONSET has the largest mean magnitude, computed on the aligned grey face (alignment from the
onset frame's landmarks, as in preprocessing) at `APEX_SEARCH_SIZE` px -- the rule of
`mer.model.preprocess.keyframes`, which preprocessing also applies to dataset rows whose apex or offset the sheet
does not give.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from mer.model.batch_keys import BATCH_KEYS, example_array
from mer.model.config import PreprocessConfig
from mer.model.errors import DataError, NonFiniteError, SampleError
from mer.model.preprocess import face as facelib
from mer.model.preprocess import MODALITIES, preprocess_sample
from mer.model.preprocess.keyframes import APEX_SEARCH_SIZE, apex_by_motion
from mer.model.preprocess.sample import check_frames, read_image
from mer.model.training.augment import tta_forward
from mer.model.training.data import to_tensor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)(?P<suffix>\.[A-Za-z]+)$")


@dataclass(frozen=True)
class Clip:
    """The frames of one clip on disk: frame n is `frames_dir / template.format(n)` for n in `numbers`."""

    clip_id: str
    frames_dir: Path
    template: str
    numbers: tuple[int, ...]
    source: str  # "folder" | "video"

    def frame(self, number: int) -> Path:
        return self.frames_dir / self.template.format(number)


@dataclass(frozen=True)
class KeyFrames:
    """Onset, apex, offset frame numbers and how each was chosen (`given` or the default rule)."""

    onset: int
    apex: int
    offset: int
    chosen: Mapping[str, str]


def open_clip(path: str | Path, work_dir: Path) -> Clip:
    """A frames folder or a video file as a `Clip`; a video is decoded into `work_dir` as PNG frames 1..T."""
    path = Path(path)
    clip_id = path.name or str(path)
    if path.is_dir():
        return _folder_clip(path, clip_id)
    if path.is_file():
        return _video_clip(path, clip_id, work_dir)
    raise SampleError(clip_id, f"{path}: no such file or directory")


def _folder_clip(path: Path, clip_id: str) -> Clip:
    images = sorted(p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise SampleError(clip_id, f"{path}: no image frames ({', '.join(IMAGE_SUFFIXES)})")
    matches = [_NUMBERED.match(name) for name in images]
    unnumbered = [name for name, match in zip(images, matches) if match is None]
    if unnumbered:
        raise SampleError(clip_id, f"{path / unnumbered[0]}: frame file name has no frame number")
    patterns = {(m["prefix"], m["suffix"]) for m in matches if m is not None}
    if len(patterns) > 1:
        examples = ", ".join(f"{p}<N>{s}" for p, s in sorted(patterns)[:3])
        raise SampleError(clip_id, f"{path}: frame files follow more than one name pattern ({examples})")
    digits = [m["number"] for m in matches if m is not None]
    widths = {len(d) for d in digits}
    padded = any(d.startswith("0") and len(d) > 1 for d in digits)
    if padded and len(widths) > 1:
        raise SampleError(clip_id, f"{path}: frame numbers are zero-padded to different widths")
    prefix, suffix = patterns.pop()
    number = "{:0%dd}" % widths.pop() if padded else "{}"
    template = prefix.replace("{", "{{").replace("}", "}}") + number + suffix.replace("{", "{{").replace("}", "}}")
    return Clip(clip_id, path, template, tuple(sorted(int(d) for d in digits)), "folder")


def _video_clip(path: Path, clip_id: str, work_dir: Path) -> Clip:
    """Decode every frame; a decoder that stops before the frame count the container declares (a truncated or
    corrupt file: OpenCV just reports the end) is a SampleError, not a shorter clip."""
    capture = cv2.VideoCapture(str(path))
    declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    frames_dir = work_dir / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            count += 1
            if not cv2.imwrite(str(frames_dir / f"{count:06d}.png"), image):
                raise SampleError(clip_id, f"cannot write decoded frame {count} to {frames_dir}")
    finally:
        capture.release()
    if count == 0:
        raise SampleError(clip_id, f"{path}: not a folder of frames and not a video OpenCV can decode")
    if count < declared:
        raise SampleError(clip_id, f"{path}: the decoder stopped after {count} of the {declared} frames the video "
                          "declares (truncated or corrupt file)", reason="truncated video")
    log.info("%s: decoded %d video frames", path, count)
    return Clip(clip_id, frames_dir, "{:06d}.png", tuple(range(1, count + 1)), "video")


def _in_clip(clip: Clip, name: str, number: int) -> int:
    if number not in clip.numbers:
        raise SampleError(clip.clip_id, f"--{name} {number}: no such frame (frames {clip.numbers[0]}..{clip.numbers[-1]})")
    return number


def default_key_frames(clip: Clip, cfg: PreprocessConfig, onset: int | None = None, apex: int | None = None,
                       offset: int | None = None, search_size: int = APEX_SEARCH_SIZE) -> KeyFrames:
    """Fill in missing key frames with the documented defaults (module docstring); given ones are checked."""
    chosen = {"onset": "given" if onset is not None else "first frame",
              "offset": "given" if offset is not None else "last frame",
              "apex": "given" if apex is not None else "max flow magnitude from onset"}
    onset = _in_clip(clip, "onset", onset) if onset is not None else clip.numbers[0]
    offset = _in_clip(clip, "offset", offset) if offset is not None else clip.numbers[-1]
    if offset < onset:
        raise SampleError(clip.clip_id, f"offset {offset} is before onset {onset}")
    if apex is None:
        apex = max_motion_frame(clip, onset, offset, cfg, search_size)
    else:
        _in_clip(clip, "apex", apex)
    return KeyFrames(onset, apex, offset, chosen)


def max_motion_frame(clip: Clip, onset: int, offset: int, cfg: PreprocessConfig, size: int) -> int:
    """The frame in onset..offset with the largest mean TV-L1 flow magnitude from the onset (aligned grey face)."""
    def grey(number: int) -> np.ndarray:
        return cv2.cvtColor(read_image(clip.frame(number), clip.clip_id, bits), cv2.COLOR_BGR2GRAY)

    candidates = [n for n in clip.numbers if onset < n <= offset]
    if not candidates:
        return onset
    bits = check_frames([clip.frame(onset)] + [clip.frame(n) for n in candidates], clip.clip_id)
    onset_grey = grey(onset)
    box = facelib.detect_face(onset_grey, cfg.detector_upsample)
    if box is None:
        raise SampleError(clip.clip_id, f"no face found in the onset frame {clip.frame(onset)}", reason="no face")
    align = facelib.alignment_from_landmarks(facelib.predict_landmarks(onset_grey, box), cfg.margin)
    return apex_by_motion(grey, onset, candidates, align, cfg.flow, clip.clip_id, size)


def preprocess_clip(clip: Clip, keys: KeyFrames, cfg: PreprocessConfig, aus: str = "",
                    modalities: Sequence[str] = MODALITIES) -> dict[str, np.ndarray]:
    """The clip's cache arrays of `modalities` (default: all; pass the model's inputs to compute only those), by the
    preprocessing library itself (annotation-like row, no dataset landmarks); the first that cannot be computed
    raises its SampleError.

    `aus` ("4+7") is only for models that read annotated AUs; otherwise the AU vector is all zeros and unused."""
    row: dict[str, Any] = {
        "sample_id": clip.clip_id, "onset": keys.onset, "apex": keys.apex, "offset": keys.offset,
        "frames_dir": str(clip.frames_dir), "frame_template": clip.template, "landmarks_path": "",
        "flow_path": "", "apex_path": "", "points5": "", "aus": aus,
    }
    if cfg.detector != "dlib":
        cfg = cfg.model_copy(update={"detector": "dlib"})  # a new clip has no saved landmarks to use instead
    return preprocess_sample(row, cfg, clip.frames_dir, modalities).arrays()


def input_batch(arrays: Mapping[str, np.ndarray], inputs: Sequence[str], batched: bool = False) -> dict[str, torch.Tensor]:
    """Cache arrays -> the model's batch tensors (the training conversion, `to_tensor`). With `batched`, every array
    already has a leading batch dimension."""
    missing = [k for k in inputs if k not in arrays]
    if missing:
        raise DataError(f"input has no {', '.join(repr(k) for k in missing)} (the model reads {', '.join(inputs)})")
    if not batched:
        return {k: to_tensor(k, np.asarray(arrays[k])).unsqueeze(0) for k in inputs}
    return {k: torch.stack([to_tensor(k, np.asarray(a)) for a in arrays[k]]) for k in inputs}


@torch.no_grad()
def predict_proba(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Softmax class probabilities (B, C) float32 of a model in eval mode, on the model's device, with the test-time
    augmentation it was trained with (`model.tta`, saved in its checkpoint). NonFiniteError when any sample's
    outputs are NaN/inf: such numbers are no prediction, and argmax would still name a class."""
    model.eval()
    device = next(model.parameters()).device
    logits = tta_forward(model, {k: v.to(device) for k, v in batch.items()}, getattr(model, "tta", "none"))["logits"]
    finite = torch.isfinite(logits.float()).all(dim=1)
    if not bool(finite.all()):
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        raise NonFiniteError(f"model output has NaN/inf values for {len(bad)} of {len(finite)} input(s) (first: "
                             f"#{bad[0]}); no prediction")
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


def example_arrays(inputs: Sequence[str], cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Zero arrays with the cache shapes and dtypes of `inputs` under `cfg` (mer.model.batch_keys): the model
    signature's example, so that the served model documents what a request must contain."""
    unknown = [k for k in inputs if k not in BATCH_KEYS]
    if unknown:
        raise DataError(f"no cache array named {', '.join(unknown)}")
    return {k: example_array(k, cfg) for k in inputs}


def class_names_for(names: Any, model: torch.nn.Module, source: str) -> list[str]:
    """The model's class names, one per output class (a logged model's info); DataError naming `source` when they
    are missing or do not fit the model's class count (an edited info file must not relabel predictions)."""
    if not isinstance(names, list) or len(names) != model.num_classes:
        count = len(names) if isinstance(names, list) else "no list of"
        raise DataError(f"{count} class names for a model with {model.num_classes} classes", file=source)
    return [str(n) for n in names]
