"""One annotation row -> the arrays of its cache entry (docs/architecture.md, "Preprocessed cache").

Pure and single-threaded (the caller parallelises over samples); every bad input raises `SampleError` naming the
sample and the file, so that a stage can record the failure and carry on.

Frame-based rows (frames_dir set):

1. onset, apex, offset must be known, onset <= apex <= offset, and onset..offset must hold at least
   `seq_frames` frames; the N sampled frame numbers are `linspace(onset, offset, N)` rounded.
2. Face on the ONSET frame: dlib's frontal detector (largest face) and the 68-point shape predictor inside its box.
   When no face is found, the landmarks saved with the dataset (`landmarks_path`) are used instead; without them the
   sample fails naming the onset file. `detector: annotation` uses the saved landmarks directly.
3. One alignment (eyes level, square crop with margin, see face.py) from the onset landmarks, applied to every frame.
4. Landmarks of the other frames: the dataset's ground truth when it has any (exact, and it is the MOL landmark
   target), otherwise the shape predictor re-run on that frame INSIDE THE FIXED ONSET FACE BOX, so that the points
   follow the expression while the box, like the alignment, stays put. `points5` come from the apex frame's landmarks.
5. TV-L1 onset->apex on the aligned grey crops of `flow.size` px -> `flow28`; TV-L1 between consecutive sampled
   128 px frames -> `flows128`.

Composite rows (flow_path set, no frames): the PNG -> `flow28`; `points5` from the table, else detected on the apex crop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from mer_model.config import PreprocessConfig
from mer_model.data.aus import AU_LIST, aus_from_string, to_multi_hot
from mer_model.errors import MerError, SampleError
from mer_model.preprocess import face as facelib
from mer_model.preprocess.flow import compute_flow, flow_map, read_flow_png, tvl1

log = logging.getLogger(__name__)

FACE_SOURCES = ("dlib", "annotation", "composite")


@dataclass(frozen=True)
class SampleOutput:
    """The npz arrays of one sample and where its face/landmarks came from (`dlib`, `annotation`, `composite`)."""

    arrays: dict[str, np.ndarray]
    face: str


def resolve(path: str, root: Path) -> Path:
    """Table paths are absolute or relative to the working directory (as ingest wrote them), else to the data root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return root / candidate


def read_image(path: Path, sample_id: str) -> np.ndarray:
    """BGR uint8 image; missing, unreadable or truncated files raise SampleError naming the file.

    A truncated JPEG decodes without error in OpenCV (libjpeg pads it with grey and only warns), so JPEGs must also
    end with the end-of-image marker (a few padding bytes after it are tolerated).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SampleError(sample_id, f"frame file missing: {path}") from None
    except OSError as err:
        raise SampleError(sample_id, f"cannot read {path}: {err.strerror}") from None
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-16:]:
        raise SampleError(sample_id, f"corrupt image (truncated JPEG): {path}")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise SampleError(sample_id, f"corrupt or unsupported image: {path}")
    return image


def sampled_frames(onset: int, offset: int, count: int) -> np.ndarray:
    """`count` distinct frame numbers spread evenly over onset..offset, both ends included."""
    return np.round(np.linspace(onset, offset, count)).astype(int)


def _int_or_none(value: Any) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


class _GroundTruth:
    """Landmarks saved with the dataset, looked up by frame number."""

    def __init__(self, path: Path, sample_id: str) -> None:
        try:
            with np.load(path) as npz:
                self.landmarks = np.asarray(npz["landmarks"], dtype=np.float32)
                numbers = np.asarray(npz["frame_numbers"]) if "frame_numbers" in npz else None
        except (OSError, ValueError, KeyError) as err:
            raise SampleError(sample_id, f"cannot read landmarks from {path}: {err}") from None
        if self.landmarks.ndim != 3 or self.landmarks.shape[1:] != (68, 2):
            raise SampleError(sample_id, f"{path}: landmarks must be (T, 68, 2), got {self.landmarks.shape}")
        self.index = {int(n): i for i, n in enumerate(numbers)} if numbers is not None else None
        self.path = path
        self.sample_id = sample_id

    def at(self, number: int, onset: int) -> np.ndarray:
        """Frame `number`'s landmarks; without `frame_numbers` the rows are taken to start at the onset."""
        i = self.index.get(number) if self.index is not None else number - onset
        if i is None or not 0 <= i < len(self.landmarks):
            raise SampleError(self.sample_id, f"{self.path} has no landmarks for frame {number}")
        return self.landmarks[i]


def _check_frames(row: Mapping[str, Any], cfg: PreprocessConfig) -> tuple[int, int, int]:
    sample_id = str(row["sample_id"])
    onset, apex, offset = (_int_or_none(row[k]) for k in ("onset", "apex", "offset"))
    if onset is None or apex is None or offset is None:
        missing = [k for k, v in (("onset", onset), ("apex", apex), ("offset", offset)) if v is None]
        raise SampleError(sample_id, f"{'/'.join(missing)} frame not annotated")
    if not onset <= apex <= offset:
        raise SampleError(sample_id, f"apex {apex} outside onset..offset {onset}..{offset}")
    if offset - onset + 1 < cfg.seq_frames:
        raise SampleError(
            sample_id, f"clip onset..offset {onset}..{offset} has {offset - onset + 1} frames, "
            f"fewer than preprocess.seq_frames={cfg.seq_frames}"
        )
    return onset, apex, offset


def _aus(row: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`aus` (multi-hot) and `au_coded` (uint8 scalar): an empty `aus` means "no AU" only where the dataset codes AUs,
    so training masks the AU loss of uncoded samples (SMIC, composite rows without joined coding) instead of teaching
    "no AU". A hand-made row without `au_coded` (inference, tools) counts as uncoded."""
    try:
        aus = to_multi_hot(aus_from_string(row["aus"]), AU_LIST)
    except MerError as err:
        raise SampleError(str(row["sample_id"]), str(err)) from None
    return {"aus": aus, "au_coded": np.array(bool(row.get("au_coded", False)), dtype=np.uint8)}


def preprocess_frames(row: Mapping[str, Any], cfg: PreprocessConfig, root: Path) -> SampleOutput:
    """A sample with frames on disk -> every cache key (see the module docstring for the steps)."""
    sample_id = str(row["sample_id"])
    onset, apex, offset = _check_frames(row, cfg)
    numbers = sampled_frames(onset, offset, cfg.seq_frames)
    frames_dir = resolve(str(row["frames_dir"]), root)
    template = str(row["frame_template"])
    colour: dict[int, np.ndarray] = {}
    grey: dict[int, np.ndarray] = {}

    def path_of(number: int) -> Path:
        return frames_dir / template.format(number)

    def grey_of(number: int) -> np.ndarray:
        if number not in grey:
            colour[number] = read_image(path_of(number), sample_id)
            grey[number] = cv2.cvtColor(colour[number], cv2.COLOR_BGR2GRAY)
        return grey[number]

    for number in sorted({onset, apex, *numbers.tolist()}):  # read everything first: bad files fail fast
        grey_of(number)

    truth = _GroundTruth(resolve(str(row["landmarks_path"]), root), sample_id) if row["landmarks_path"] else None
    onset_landmarks: np.ndarray
    box: facelib.FaceBox | None = None
    if cfg.detector == "dlib":
        box = facelib.detect_face(grey[onset], cfg.detector_upsample)
    if box is not None:
        onset_landmarks, source = facelib.predict_landmarks(grey[onset], box), "dlib"
    elif truth is not None:
        if cfg.detector == "dlib":
            log.info("sample %s: no face found in %s; using the dataset's landmarks", sample_id, path_of(onset))
        onset_landmarks, source = truth.at(onset, onset), "annotation"
    elif cfg.detector == "annotation":
        raise SampleError(sample_id, "preprocess.detector=annotation but the dataset has no landmarks for it")
    else:
        raise SampleError(sample_id, f"no face found in {path_of(onset)} and no dataset landmarks to fall back on")

    def landmarks_of(number: int) -> np.ndarray:
        if truth is not None:
            return truth.at(number, onset)
        if number == onset:
            return onset_landmarks
        assert box is not None  # no ground truth -> the onset face came from the detector
        return facelib.predict_landmarks(grey[number], box)

    align = facelib.alignment_from_landmarks(onset_landmarks, cfg.margin)
    frames128 = np.stack([align.warp(grey[n], cfg.seq_size) for n in numbers])
    solver = tvl1(cfg.flow)
    flows128 = np.stack([compute_flow(solver, a, b) for a, b in zip(frames128[:-1], frames128[1:])])
    flow = compute_flow(solver, align.warp(grey[onset], cfg.flow.size), align.warp(grey[apex], cfg.flow.size))
    arrays = {
        "flow28": flow_map(flow, cfg.flow.map_size),
        "points5": align.points(facelib.points5(landmarks_of(apex)), cfg.flow.map_size),
        "onset224": cv2.cvtColor(align.warp(colour[onset], cfg.face_size), cv2.COLOR_BGR2RGB),
        "apex224": cv2.cvtColor(align.warp(colour[apex], cfg.face_size), cv2.COLOR_BGR2RGB),
        "frames128": frames128,
        "flows128": flows128.transpose(0, 3, 1, 2).astype(np.float16),
        "landmarks68": np.stack([align.points(landmarks_of(n), cfg.seq_size) for n in numbers]),
        **_aus(row),
    }
    return SampleOutput(arrays, source)


def parse_points5(text: str, sample_id: str) -> np.ndarray:
    """The table's `points5` column, "x1,y1,...,x5,y5", as float32 (5, 2)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 10:
        raise SampleError(sample_id, f"points5 {text!r} is not ten comma-separated numbers")
    return np.asarray(values, dtype=np.float32).reshape(5, 2)


def preprocess_composite(row: Mapping[str, Any], cfg: PreprocessConfig, root: Path) -> SampleOutput:
    """A flow-only composite row -> flow28, points5, aus, au_coded."""
    sample_id = str(row["sample_id"])
    flow28 = read_flow_png(resolve(str(row["flow_path"]), root), sample_id, cfg.flow.map_size)
    if row["points5"]:
        points = parse_points5(str(row["points5"]), sample_id)
    elif row["apex_path"]:
        path = resolve(str(row["apex_path"]), root)
        grey = cv2.cvtColor(read_image(path, sample_id), cv2.COLOR_BGR2GRAY)
        box = facelib.detect_face(grey, cfg.detector_upsample)
        if box is None:
            raise SampleError(sample_id, f"no points5 in the table and no face found in {path}")
        scale = cfg.flow.map_size / np.array([grey.shape[1], grey.shape[0]], dtype=np.float32)
        points = (facelib.points5(facelib.predict_landmarks(grey, box)) + 0.5) * scale - 0.5
    else:
        raise SampleError(sample_id, "composite row has neither points5 nor an apex crop")
    return SampleOutput({"flow28": flow28, "points5": points.astype(np.float32), **_aus(row)}, "composite")


def preprocess_sample(row: Mapping[str, Any], cfg: PreprocessConfig, root: Path) -> SampleOutput:
    """Dispatch on what the row provides: frames on disk, or a precomputed composite flow map."""
    if row["frames_dir"]:
        return preprocess_frames(row, cfg, root)
    if row["flow_path"]:
        return preprocess_composite(row, cfg, root)
    raise SampleError(str(row["sample_id"]), "row has neither frames_dir nor flow_path")
