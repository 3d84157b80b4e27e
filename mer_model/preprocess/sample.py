"""One annotation row -> the arrays of its cache entries, modality by modality (docs/architecture.md,
"Preprocessed cache").

Pure and single-threaded (the caller parallelises over samples). Only the requested modalities are computed, and
the work they share (reading frames, the face, the alignment, the key frames) is done once per sample and only when
a requested modality needs it, so asking for `flow28` never pays for the 128 px sequence flows. Every problem is a
`SampleError` naming the sample and the file, recorded against each modality it affects; the others still succeed
(a face the detector misses on a composite's apex crop gets the template points, said and counted).

Frame-based rows (frames_dir set):

1. Key frames: onset must be annotated; a missing offset is the clip's last frame where the folder holds just the
   clip, and stays unknown (sequence modalities unavailable) where it is a recording of several samples; a missing
   apex is estimated from the flow magnitude (`keyframes`, as `mer predict` does). What was estimated is returned
   (`SampleOutput.estimated`) and recorded in the index. The apex ON the onset frame is refused (zero motion).
2. Every frame present in onset..offset must have the onset frame's size (mixed raw and cropped frames would show
   up as motion) and decode the same way: the same EXIF orientation (OpenCV applies it, so one tagged frame in a
   clip would be rotated against the others) and the same sample depth. The first one that differs is named
   (`check_frames`). 16-bit frames are scaled to 0-255 by the bits the clip's values use (12-bit values in 16-bit
   PNGs come out full range, not near black), one scale for every frame of the clip.
3. Face on the ONSET frame: dlib's frontal detector (largest face) and the 68-point shape predictor inside its box.
   When no face is found, the landmarks saved with the dataset (`landmarks_path`) are used instead; without them the
   sample fails naming the onset file. `detector: annotation` uses the saved landmarks directly.
4. One alignment (eyes level, square crop with margin, see face.py) from the onset landmarks, applied to every frame.
5. Landmarks of the other frames: the dataset's ground truth when it has any (exact, and it is the MOL landmark
   target), otherwise the shape predictor re-run on that frame INSIDE THE FIXED ONSET FACE BOX, so that the points
   follow the expression while the box, like the alignment, stays put. `points5` come from the apex frame's landmarks.
6. TV-L1 onset->apex on the aligned grey crops of `flow.size` px -> `flow28` (refused when the motion is (near) zero
   or the map degenerate, flow.py); TV-L1 between consecutive sampled 128 px frames -> `flows128`.

Composite rows (flow_path set, no frames): the PNG -> `flow28` (a grey or flat map is refused); `points5` from the
table, else detected with dlib on the apex crop, else (no face found) the template points of an aligned crop
(`face.TEMPLATE_POINTS5`), the last two recorded as estimated (`points5=dlib` / `points5=template`), as are table
points that the table marks as a fallback (`points5_estimated`, e.g. `points5=whole_image_box`); `apex224` = the distributed apex crop resized to `face_size` (the distribution
has no onset crops, so `onset224` and the sequence modalities are unavailable).

Every array of every modality is checked for NaN/inf before it is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from mer.model.config import PreprocessConfig
from mer.model.data.aus import AU_LIST, aus_from_string, to_multi_hot
from mer.model.data.schema import SEVERAL_SAMPLES_PER_CLIP
from mer.model.errors import MerError, SampleError
from mer.model.preprocess import face as facelib
from mer.model.preprocess.flow import check_flow_map, check_motion, compute_flow, flow_map, read_flow_png, tvl1
from mer.model.preprocess.keyframes import apex_by_motion, present_frames
from mer.model.preprocess.modalities import MODALITIES

log = logging.getLogger(__name__)

FACE_SOURCES = ("dlib", "annotation", "composite")
T = TypeVar("T")


@dataclass(frozen=True)
class ModalityOutcome:
    """One modality of one sample: `ok` with its arrays, `failed` (bad input or degenerate data), or `unavailable`
    (the source cannot provide it, e.g. onset crops of the composite); `reason` is the short category counted in
    the stage's summary, `error` the one line naming sample and file."""

    status: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    reason: str = ""
    error: str = ""


@dataclass(frozen=True)
class SampleOutput:
    """Per-modality outcomes of one sample, where its face/landmarks came from (`dlib`, `annotation`, `composite`;
    "" when no face was needed) and which key frames were estimated (e.g. "apex=23;offset=40")."""

    sample_id: str
    modalities: dict[str, ModalityOutcome]
    face: str = ""
    estimated: str = ""

    def arrays(self, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays of `keys` (default: every requested modality); the first that is not ok raises its
        SampleError (what a caller that needs them all, such as `mer predict`, wants)."""
        out: dict[str, np.ndarray] = {}
        for key in keys if keys is not None else list(self.modalities):
            outcome = self.modalities[key]
            if outcome.status != "ok":
                raise SampleError(self.sample_id, outcome.error.removeprefix(f"sample {self.sample_id}: "),
                                  reason=outcome.reason)
            out.update(outcome.arrays)
        return out


def resolve(path: str, root: Path) -> Path:
    """Table paths are absolute or relative to the working directory (as ingest wrote them), else to the data root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return root / candidate


def read_image(path: Path, sample_id: str, bits: int | None = None) -> np.ndarray:
    """BGR uint8 image (EXIF orientation applied); missing, unreadable or truncated files raise SampleError naming
    the file. A 16-bit image is scaled from `bits` significant bits to 0-255 (`check_frames` gives the clip's; None:
    this image's own maximum).

    A truncated JPEG decodes without error in OpenCV (libjpeg pads it with grey and only warns), so JPEGs must also
    end with the end-of-image marker (a few padding bytes after it are tolerated).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SampleError(sample_id, f"frame file missing: {path}", reason="frame file missing") from None
    except OSError as err:
        raise SampleError(sample_id, f"cannot read {path}: {err.strerror}", reason="unreadable file") from None
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-16:]:
        raise SampleError(sample_id, f"corrupt image (truncated JPEG): {path}", reason="corrupt image")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise SampleError(sample_id, f"corrupt or unsupported image: {path}", reason="corrupt image")
    if image.dtype == np.uint16:
        top = 2 ** (bits or max(8, int(image.max()).bit_length())) - 1
        image = np.clip(np.rint(image.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)
    return image


EXIF_ORIENTATION = 0x0112
_PNG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class FrameFormat:
    """What decides how a frame file decodes, from its header: stored size (width, height), EXIF orientation (1 =
    as stored) and bits per sample in the file (8 or 16)."""

    size: tuple[int, int]
    orientation: int
    depth: int


def frame_format(path: Path) -> FrameFormat | None:
    """The frame's header facts, or None when the header cannot be read (the file then fails where it is decoded,
    with the precise reason)."""
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
        with path.open("rb") as handle:
            head = handle.read(26)
    except (OSError, ValueError):
        return None
    if head[:8] == _PNG and head[12:16] == b"IHDR":  # PIL opens 16-bit colour PNGs as 8-bit RGB: ask the header
        depth = 16 if head[24] == 16 else 8
    else:
        depth = 16 if mode.startswith("I;16") or mode == "I" else 8
    return FrameFormat(size, orientation, depth)


def check_frames(paths: Sequence[Path], sample_id: str) -> int | None:
    """Every frame of `paths` (the first is the clip's onset frame) has the onset frame's size, EXIF orientation and
    sample depth, else SampleError naming the first that differs ("frame size changes" / "frame decoding differs").
    Returns the significant bits of a 16-bit clip (the bit length of its largest value, at least 8) for
    `read_image`, None for an 8-bit one. Headers only, but for 16-bit clips, whose frames are all decoded once."""
    first = frame_format(paths[0]) if paths else None
    if first is None:
        return None
    for path in paths[1:]:
        other = frame_format(path)
        if other is None:
            continue
        if other.size != first.size:
            raise SampleError(sample_id, f"frame size changes inside the clip: {path} is {other.size[0]}x"
                              f"{other.size[1]}, onset frame {paths[0]} is {first.size[0]}x{first.size[1]}",
                              reason="frame size changes")
        if other.orientation != first.orientation:
            raise SampleError(sample_id, f"frames decode differently inside the clip: {path} has EXIF orientation "
                              f"{other.orientation}, onset frame {paths[0]} has {first.orientation} (1 = as stored)",
                              reason="frame decoding differs")
        if other.depth != first.depth:
            raise SampleError(sample_id, f"frames decode differently inside the clip: {path} is {other.depth}-bit, "
                              f"onset frame {paths[0]} is {first.depth}-bit", reason="frame decoding differs")
    if first.depth == 8:
        return None
    top = 0
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is not None:
            top = max(top, int(image.max()))
    return max(8, top.bit_length())


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
            raise SampleError(sample_id, f"cannot read landmarks from {path}: {err}", reason="landmarks unreadable"
                              ) from None
        if self.landmarks.ndim != 3 or self.landmarks.shape[1:] != (68, 2):
            raise SampleError(sample_id, f"{path}: landmarks must be (T, 68, 2), got {self.landmarks.shape}",
                              reason="landmarks unreadable")
        self.index = {int(n): i for i, n in enumerate(numbers)} if numbers is not None else None
        self.path = path
        self.sample_id = sample_id

    def at(self, number: int, onset: int) -> np.ndarray:
        """Frame `number`'s landmarks; without `frame_numbers` the rows are taken to start at the onset."""
        i = self.index.get(number) if self.index is not None else number - onset
        if i is None or not 0 <= i < len(self.landmarks):
            raise SampleError(self.sample_id, f"{self.path} has no landmarks for frame {number}",
                              reason="landmarks missing")
        return self.landmarks[i]


def _aus(row: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`aus` (multi-hot) and `au_coded` (uint8 scalar): an empty `aus` means "no AU" only where the dataset codes AUs,
    so training masks the AU loss of uncoded samples (SMIC, composite rows without joined coding) instead of teaching
    "no AU". A hand-made row without `au_coded` (inference, tools) counts as uncoded."""
    try:
        aus = to_multi_hot(aus_from_string(row["aus"]), AU_LIST)
    except MerError as err:
        raise SampleError(str(row["sample_id"]), str(err), reason="bad AU string") from None
    return {"aus": aus, "au_coded": np.array(bool(row.get("au_coded", False)), dtype=np.uint8)}


class _Steps:
    """Shared work of one sample, each step run at most once: a step that failed fails the same way (the same
    SampleError) for every modality that needs it, without being retried."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[bool, Any]] = {}

    def once(self, name: str, step: Callable[[], T]) -> T:
        if name not in self._done:
            try:
                self._done[name] = (True, step())
            except SampleError as err:
                self._done[name] = (False, err)
        ok, value = self._done[name]
        if not ok:
            raise value
        return value


@dataclass(frozen=True)
class _Keys:
    onset: int
    apex: int
    offset: int | None  # None: unknown (a recording of several samples without an annotated offset)
    estimated: dict[str, int]


class _FrameSample(_Steps):
    """A row with frames on disk; the modality builders below read what they need through these steps."""

    def __init__(self, row: Mapping[str, Any], cfg: PreprocessConfig, root: Path) -> None:
        super().__init__()
        self.row, self.cfg = row, cfg
        self.sample_id = str(row["sample_id"])
        self.dir = resolve(str(row["frames_dir"]), root)
        self.template = str(row["frame_template"])
        self.landmarks_path = resolve(str(row["landmarks_path"]), root) if row.get("landmarks_path") else None
        self.face_source = ""
        self.bits: int | None = None  # significant bits of a 16-bit clip (sizes_checked)

    def error(self, message: str, reason: str) -> SampleError:
        return SampleError(self.sample_id, message, reason=reason)

    def path(self, number: int) -> Path:
        return self.dir / self.template.format(number)

    # --- key frames and the clip's frames ---------------------------------------------------------------------

    def present(self) -> list[int]:
        return self.once("present", lambda: present_frames(self.dir, self.template))

    def bounds(self) -> tuple[int, int | None, dict[str, int]]:
        """(onset, offset or None, estimated) -- what the apex search and the size check need."""
        def step() -> tuple[int, int | None, dict[str, int]]:
            onset, offset = _int_or_none(self.row["onset"]), _int_or_none(self.row["offset"])
            if onset is None:
                raise self.error("onset frame not annotated", "key frame not annotated")
            estimated: dict[str, int] = {}
            if offset is None and str(self.row.get("dataset", "")) not in SEVERAL_SAMPLES_PER_CLIP:
                later = [n for n in self.present() if n >= onset]
                if later:
                    offset = estimated["offset"] = later[-1]
            if offset is not None and offset < onset:
                raise self.error(f"offset {offset} before onset {onset}", "apex outside onset..offset")
            return onset, offset, estimated
        return self.once("bounds", step)

    def keys(self) -> _Keys:
        def step() -> _Keys:
            onset, offset, bounded = self.bounds()
            estimated = dict(bounded)
            apex = _int_or_none(self.row["apex"])
            if apex is None:
                if offset is None:
                    raise self.error("apex and offset not annotated: nothing bounds the apex search",
                                     "key frame not annotated")
                self.sizes_checked()
                candidates = [n for n in self.present() if onset < n <= offset]
                apex = estimated["apex"] = apex_by_motion(self.grey, onset, candidates, self.alignment(),
                                                          self.cfg.flow, self.sample_id)
                log.info("sample %s: apex not annotated; estimated as frame %d (largest motion from onset %d)",
                         self.sample_id, apex, onset)
            if offset is not None and not onset <= apex <= offset:
                raise self.error(f"apex {apex} outside onset..offset {onset}..{offset}", "apex outside onset..offset")
            if apex == onset:
                raise self.error(f"apex {apex} is the onset frame: zero motion", "apex equals onset (zero motion)")
            return _Keys(onset, apex, offset, estimated)
        return self.once("keys", step)

    def estimated(self) -> dict[str, int]:
        """Key frames estimated so far (without computing anything that no modality asked for)."""
        for name in ("keys", "bounds"):
            ok, value = self._done.get(name, (False, None))
            if ok:
                return value.estimated if name == "keys" else value[2]
        return {}

    def sizes_checked(self) -> None:
        """Every frame present in onset..offset (..apex without an offset) has the onset frame's size and decodes the
        same way (`check_frames`: headers only, 16-bit clips excepted); sets the clip's bit scale. A frame whose
        header cannot be read is left to fail where it is read (only the modalities that read it are lost)."""
        def step() -> int | None:
            onset, offset, _ = self.bounds()
            end = offset if offset is not None else _int_or_none(self.row["apex"])
            if frame_format(self.path(onset)) is None:  # decoding says precisely what is wrong
                self.image_unchecked(onset)
            numbers = [n for n in self.present() if onset < n <= (end if end is not None else onset)]
            return check_frames([self.path(onset)] + [self.path(n) for n in numbers], self.sample_id)
        self.bits = self.once("sizes", step)

    def image_unchecked(self, number: int) -> np.ndarray:
        return self.once(f"image{number}", lambda: read_image(self.path(number), self.sample_id, self.bits))

    def image(self, number: int) -> np.ndarray:
        """BGR frame `number` (the clip's frame sizes are checked first)."""
        self.sizes_checked()
        return self.image_unchecked(number)

    def grey(self, number: int) -> np.ndarray:
        return self.once(f"grey{number}", lambda: cv2.cvtColor(self.image(number), cv2.COLOR_BGR2GRAY))

    # --- face, alignment, landmarks ---------------------------------------------------------------------------

    def truth(self) -> _GroundTruth | None:
        return self.once("truth", lambda: _GroundTruth(self.landmarks_path, self.sample_id)
                         if self.landmarks_path is not None else None)

    def face(self) -> tuple[np.ndarray, facelib.FaceBox | None]:
        """Onset landmarks and the detector's box (None when they came from the dataset's landmarks)."""
        def step() -> tuple[np.ndarray, facelib.FaceBox | None]:
            onset = self.bounds()[0]
            grey = self.grey(onset)
            box = facelib.detect_face(grey, self.cfg.detector_upsample) if self.cfg.detector == "dlib" else None
            if box is not None:
                self.face_source = "dlib"
                return facelib.predict_landmarks(grey, box), box
            truth = self.truth()
            if truth is not None:
                if self.cfg.detector == "dlib":
                    log.info("sample %s: no face found in %s; using the dataset's landmarks", self.sample_id,
                             self.path(onset))
                self.face_source = "annotation"
                return truth.at(onset, onset), None
            if self.cfg.detector == "annotation":
                raise self.error("preprocess.detector=annotation but the dataset has no landmarks for it", "no face")
            raise self.error(f"no face found in {self.path(onset)} and no dataset landmarks to fall back on",
                             "no face")
        return self.once("face", step)

    def alignment(self) -> facelib.Alignment:
        return self.once("alignment", lambda: facelib.alignment_from_landmarks(self.face()[0], self.cfg.margin))

    def landmarks_of(self, number: int) -> np.ndarray:
        onset_landmarks, box = self.face()
        truth = self.truth()
        if truth is not None:
            return truth.at(number, self.bounds()[0])
        if number == self.bounds()[0]:
            return onset_landmarks
        assert box is not None  # no ground truth -> the onset face came from the detector
        return facelib.predict_landmarks(self.grey(number), box)

    # --- the sampled sequence ---------------------------------------------------------------------------------

    def sequence(self) -> np.ndarray:
        def step() -> np.ndarray:
            keys = self.keys()
            if keys.offset is None:
                raise self.error("offset not annotated and the recording holds several samples: no sequence",
                                 "offset not annotated")
            if keys.offset - keys.onset + 1 < self.cfg.seq_frames:
                raise self.error(f"clip onset..offset {keys.onset}..{keys.offset} has {keys.offset - keys.onset + 1} "
                                 f"frames, fewer than preprocess.seq_frames={self.cfg.seq_frames}", "clip too short")
            return sampled_frames(keys.onset, keys.offset, self.cfg.seq_frames)
        return self.once("sequence", step)

    def frames128(self) -> np.ndarray:
        return self.once("frames128", lambda: np.stack(
            [self.alignment().warp(self.grey(n), self.cfg.seq_size) for n in self.sequence()]))


def _flow28(s: _FrameSample) -> dict[str, np.ndarray]:
    keys = s.keys()
    align, size = s.alignment(), s.cfg.flow.size
    flow = compute_flow(tvl1(s.cfg.flow), align.warp(s.grey(keys.onset), size), align.warp(s.grey(keys.apex), size))
    what = f"onset {s.path(keys.onset).name} -> apex {s.path(keys.apex).name} in {s.dir}"
    check_motion(flow, s.sample_id, what)
    flow28 = flow_map(flow, s.cfg.flow.map_size)
    check_flow_map(flow28, s.sample_id, what)
    return {"flow28": flow28}


def _points5(s: _FrameSample) -> dict[str, np.ndarray]:
    apex = s.keys().apex
    return {"points5": s.alignment().points(facelib.points5(s.landmarks_of(apex)), s.cfg.flow.map_size)}


def _crop(which: str) -> Callable[[_FrameSample], dict[str, np.ndarray]]:
    def build(s: _FrameSample) -> dict[str, np.ndarray]:
        number = getattr(s.keys(), which)
        aligned = s.alignment().warp(s.image(number), s.cfg.face_size)
        return {f"{which}224": cv2.cvtColor(aligned, cv2.COLOR_BGR2RGB)}
    return build


def _frames128(s: _FrameSample) -> dict[str, np.ndarray]:
    return {"frames128": s.frames128()}


def _landmarks68(s: _FrameSample) -> dict[str, np.ndarray]:
    align = s.alignment()
    return {"landmarks68": np.stack([align.points(s.landmarks_of(n), s.cfg.seq_size) for n in s.sequence()])}


def _flows128(s: _FrameSample) -> dict[str, np.ndarray]:
    frames, solver = s.frames128(), tvl1(s.cfg.flow)
    flows = np.stack([compute_flow(solver, a, b) for a, b in zip(frames[:-1], frames[1:])])
    return {"flows128": flows.transpose(0, 3, 1, 2).astype(np.float16)}


FRAME_BUILDERS: dict[str, Callable[[_FrameSample], dict[str, np.ndarray]]] = {
    "flow28": _flow28, "points5": _points5, "onset224": _crop("onset"), "apex224": _crop("apex"),
    "frames128": _frames128, "landmarks68": _landmarks68, "flows128": _flows128,
    "aus": lambda s: _aus(s.row),
}


def parse_points5(text: str, sample_id: str) -> np.ndarray:
    """The table's `points5` column, "x1,y1,...,x5,y5", as float32 (5, 2)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 10:
        raise SampleError(sample_id, f"points5 {text!r} is not ten comma-separated numbers", reason="bad points5")
    return np.asarray(values, dtype=np.float32).reshape(5, 2)


class _CompositeSample(_Steps):
    """A flow-only composite row: the distributed flow map, optional apex crop, optional five points."""

    def __init__(self, row: Mapping[str, Any], cfg: PreprocessConfig, root: Path) -> None:
        super().__init__()
        self.row, self.cfg = row, cfg
        self.sample_id = str(row["sample_id"])
        self.flow_path = resolve(str(row["flow_path"]), root)
        self.apex_path = resolve(str(row["apex_path"]), root) if row.get("apex_path") else None
        self.face_source = "composite"
        self.points_source = ""  # where computed points5 came from: dlib on the apex crop, or the template

    def estimated(self) -> dict[str, Any]:
        """What preprocessing estimated rather than read: the five points, when not from the table."""
        return {"points5": self.points_source} if self.points_source else {}

    def apex_crop(self) -> np.ndarray:
        if self.apex_path is None:
            raise SampleError(self.sample_id, "the composite row has no apex crop (datasets/combined_datasets_whole)",
                              reason="unavailable")
        return self.once("apex", lambda: read_image(self.apex_path, self.sample_id))


def _composite_points5(s: _CompositeSample) -> dict[str, np.ndarray]:
    if s.row.get("points5"):
        s.points_source = str(s.row.get("points5_estimated") or "")  # the table's own fallback rows count as estimated
        return {"points5": parse_points5(str(s.row["points5"]), s.sample_id)}
    if s.apex_path is None:
        raise SampleError(s.sample_id, "composite row has neither points5 nor an apex crop", reason="unavailable")
    grey = cv2.cvtColor(s.apex_crop(), cv2.COLOR_BGR2GRAY)
    box = facelib.detect_face(grey, s.cfg.detector_upsample)
    if box is None:  # the crop is an aligned face: its points are where the template puts them
        s.points_source = "template"
        log.debug("%s: no face found in %s; points5 from the template", s.sample_id, s.apex_path)
        return {"points5": facelib.template_points5(s.cfg.flow.map_size)}
    s.points_source = "dlib"
    scale = s.cfg.flow.map_size / np.array([grey.shape[1], grey.shape[0]], dtype=np.float32)
    points = (facelib.points5(facelib.predict_landmarks(grey, box)) + 0.5) * scale - 0.5
    return {"points5": points.astype(np.float32)}


def _composite_apex224(s: _CompositeSample) -> dict[str, np.ndarray]:
    size = s.cfg.face_size
    crop = cv2.resize(s.apex_crop(), (size, size), interpolation=cv2.INTER_AREA)
    return {"apex224": cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)}


def _unavailable(what: str) -> Callable[[_CompositeSample], dict[str, np.ndarray]]:
    def build(s: _CompositeSample) -> dict[str, np.ndarray]:
        raise SampleError(s.sample_id, f"the composite has no {what}", reason="unavailable")
    return build


COMPOSITE_BUILDERS: dict[str, Callable[[_CompositeSample], dict[str, np.ndarray]]] = {
    "flow28": lambda s: {"flow28": read_flow_png(s.flow_path, s.sample_id, s.cfg.flow.map_size)},
    "points5": _composite_points5, "apex224": _composite_apex224,
    "onset224": _unavailable("onset crop (only apex crops are distributed)"),
    "frames128": _unavailable("frames"), "landmarks68": _unavailable("frames"), "flows128": _unavailable("frames"),
    "aus": lambda s: _aus(s.row),
}


def _finite(arrays: dict[str, np.ndarray], sample_id: str, modality: str) -> dict[str, np.ndarray]:
    for key, array in arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise SampleError(sample_id, f"{key} has NaN/inf values", reason="non-finite values")
    return arrays


def preprocess_sample(row: Mapping[str, Any], cfg: PreprocessConfig, root: Path,
                      modalities: Sequence[str] = MODALITIES) -> SampleOutput:
    """The requested modalities of one row (frames on disk, or a precomputed composite flow map). Never raises for
    bad input: each modality's outcome says ok / failed / unavailable with its reason (see the module docstring)."""
    sample: _FrameSample | _CompositeSample
    if row["frames_dir"]:
        sample, builders = _FrameSample(row, cfg, root), FRAME_BUILDERS
    elif row["flow_path"]:
        sample, builders = _CompositeSample(row, cfg, root), COMPOSITE_BUILDERS
    else:
        error = SampleError(str(row["sample_id"]), "row has neither frames_dir nor flow_path", reason="no input")
        return SampleOutput(error.sample_id,
                            {m: ModalityOutcome("failed", reason=error.reason, error=str(error)) for m in modalities})
    outcomes: dict[str, ModalityOutcome] = {}
    for modality in modalities:
        try:
            arrays = _finite(builders[modality](sample), sample.sample_id, modality)  # type: ignore[arg-type]
        except SampleError as err:
            status = "unavailable" if err.reason == "unavailable" else "failed"
            outcomes[modality] = ModalityOutcome(status, reason=err.reason, error=str(err))
        else:
            outcomes[modality] = ModalityOutcome("ok", arrays)
    estimated = sample.estimated()
    return SampleOutput(sample.sample_id, outcomes, sample.face_source,
                        ";".join(f"{k}={v}" for k, v in sorted(estimated.items())))
