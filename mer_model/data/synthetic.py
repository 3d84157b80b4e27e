"""Embedded synthetic micro-expression dataset, written in the CASME II native layout.

Why: the demo and CI need data that exercises the real loader, face detector and preprocessing without licensed
material. Faces are built from scikit-image's public-domain `astronaut()` photo, in which dlib finds the face and its
68 landmarks (stored below as ASTRONAUT_LANDMARKS; tests/test_synthetic.py re-detects them).

Model of one clip, all in pixels of the S x S frame:

* identity (per subject): the astronaut face crop warped by a smooth per-subject shape field (face width, eye spacing,
  brow height, nose, mouth, chin), optionally mirrored, re-toned (skin tone, hair/background tint, contrast) and
  re-textured (blotches, grain). Its 68 landmarks `l` follow from the same field.
* per clip: a static displacement `D_static` -- neutral-face variation along the same landmark directions as the AUs
  and as large as an AU (so the apex frame alone is ambiguous) -- a pose `P` (a few px / degrees), the AU displacement
  `D_au` with an onset-apex-offset profile `a(t)`, sub-pixel head motion `H_t`, lighting gradient, gain drift, sensor
  noise and JPEG coding.
* a point `p` of the identity image is at `Q_t(p) = H_t P (p + D_static(p) + a(t) D_au(p))` in frame t. Displacements
  are given at landmarks and spread to the image by a normalised Gaussian kernel (`_kernel`), so motion stays local.

Ground truth per clip (`groundtruth/subXX/<clip>.npz`):

* `landmarks` float32 (T, 68, 2): `Q_t(l)`, x, y in pixels, dlib 68-point order;
* `flow` float16 (T-1, S, S, 2): forward flow between CONSECUTIVE frames at the pixels of the earlier frame,
  `flow[t](x) = Q_{t+1}(p) - Q_t(p)` for `x = Q_t(p)`, channels (dx, dy), quantised to FLOW_STEP pixels;
* `frame_numbers` int32 (T,): the frame numbers onset..offset the rows belong to.

Every file is byte-identical for the same configuration (zip entries carry a fixed timestamp), so DVC sees no change
when the stage re-runs. Random streams are seeded per (seed, subject[, clip]): subject 3 does not change when the
number of subjects does.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mer.model.config import SynthConfig
from mer.model.errors import ConfigError, DataError
from mer.model.io import atomic_write

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the output for a given configuration changes
SHEET_NAME = "CASME2-coding-synthetic.xlsx"
SHEET_COLUMNS = ("Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "Action Units", "Estimated Emotion")
MANIFEST_NAME = "manifest.json"
GROUNDTRUTH_DIR = "groundtruth"
DATASET_COLUMN = "Dataset"  # only with synth.datasets > 1: the source dataset of the row (a composite-like set)
FRAME_TEMPLATE = "img{}.jpg"
FLOW_STEP = 1 / 128  # exact in float16 for |flow| < 8 px; makes the smooth flow fields compress well
JPEG_QUALITY = 95
REFERENCE_SIZE = 256  # every amplitude below is in pixels of a 256-pixel frame and scales with image_size
EMOTIONS = ("happiness", "surprise", "disgust", "repression", "others")

# The 68 dlib landmarks of skimage.data.astronaut() (512 x 512), x, y in pixels, as dlib's frontal detector and
# shape_predictor_68_face_landmarks find them (face_recognition_models); tests re-detect them.
ASTRONAUT_LANDMARKS = np.array([
    179, 104, 180, 116, 181, 127, 182, 139, 185, 150, 191, 160, 200, 168, 209, 176,
    220, 178, 232, 177, 243, 171, 253, 163, 260, 154, 265, 143, 268, 131, 270, 120,
    272, 108, 186, 94, 192, 88, 200, 87, 208, 89, 216, 92, 236, 93, 244, 91,
    252, 91, 260, 92, 265, 99, 226, 102, 225, 111, 225, 119, 225, 127, 214, 131,
    219, 133, 224, 134, 229, 133, 234, 132, 195, 101, 200, 98, 207, 98, 212, 104,
    206, 104, 199, 104, 237, 106, 243, 100, 250, 100, 255, 105, 250, 107, 244, 107,
    201, 139, 209, 139, 218, 139, 224, 141, 230, 140, 238, 140, 246, 141, 238, 151,
    229, 155, 222, 156, 216, 155, 208, 150, 204, 141, 218, 143, 223, 144, 230, 143,
    243, 142, 229, 150, 223, 151, 217, 150,
], dtype=np.float32).reshape(68, 2)


def _mirror_index() -> np.ndarray:
    """MIRROR[i] = the landmark that i becomes under a left-right flip (dlib 68-point order)."""
    pairs = [(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] + [(31, 35), (32, 34)]
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
    mirror = np.arange(68)
    for a, b in pairs:
        mirror[a], mirror[b] = b, a
    return mirror


MIRROR = _mirror_index()

# AU motions at apex: displacement (dx, dy) of the IMAGE-LEFT landmarks (the subject's right side) and of midline
# landmarks, in px of a 256 px frame; the image-right side is the mirror image. Up is -y, towards the midline is +x.
AU_MOTIONS: dict[int, dict[int, tuple[float, float]]] = {
    1: {19: (0.0, -1.2), 20: (0.0, -2.2), 21: (0.3, -2.6)},  # inner brow raiser
    2: {17: (0.0, -2.2), 18: (0.0, -2.6), 19: (0.0, -1.6)},  # outer brow raiser
    4: {18: (0.4, 0.8), 19: (0.8, 1.6), 20: (1.2, 2.0), 21: (1.6, 1.6)},  # brow lowerer: down and together
    5: {37: (0.0, -2.4), 38: (0.0, -2.4)},  # upper lid raiser
    6: {40: (0.0, -1.8), 41: (0.0, -1.8), 36: (0.0, -0.6), 48: (-0.3, -0.5)},  # cheek raiser
    7: {37: (0.0, 1.0), 38: (0.0, 1.0), 40: (0.0, -2.2), 41: (0.0, -2.2)},  # lid tightener
    9: {31: (0.2, -2.0), 32: (0.0, -1.6), 33: (0.0, -1.2), 30: (0.0, -0.8), 29: (0.0, -0.6), 21: (0.0, 0.8),
        39: (0.0, -0.5)},  # nose wrinkler
    10: {48: (0.0, -0.6), 49: (0.0, -1.4), 50: (0.0, -2.2), 51: (0.0, -2.2), 61: (0.0, -1.8), 62: (0.0, -1.8),
         31: (0.0, -0.6)},  # upper lip raiser
    12: {48: (-2.0, -1.8), 60: (-1.8, -1.6), 49: (-0.8, -1.0), 59: (-0.8, -0.6), 61: (-0.4, -0.4),
         67: (-0.4, -0.3)},  # lip corner puller: out and up
    14: {48: (-2.2, 0.2), 60: (-2.0, 0.2), 49: (-0.6, 0.0), 59: (-0.6, 0.0), 61: (-0.3, 0.0),
         67: (-0.3, 0.0)},  # dimpler: corners straight out
    15: {48: (0.3, 2.2), 60: (0.3, 2.0), 59: (0.0, 1.0), 49: (0.0, 0.6), 67: (0.0, 0.6)},  # lip corner depressor
    17: {57: (0.0, -2.0), 58: (0.0, -1.6), 59: (0.0, -0.6), 66: (0.0, -1.2), 67: (0.0, -1.0), 8: (0.0, -1.6),
         7: (0.0, -1.2)},  # chin raiser
}

# AU codings per emotion, in the CASME II dialect (R/L = the subject's right/left side only).
EMOTION_CODINGS: dict[str, tuple[str, ...]] = {
    "happiness": ("12", "6+12", "R12", "L12"),
    "surprise": ("1+2", "1", "2", "R1+R2", "L1+L2", "1+2+5"),
    "disgust": ("9", "4+9", "10", "4+10", "4+7", "R10", "4+L10"),
    "repression": ("14", "15", "17", "15+17", "R14", "L14"),
    "others": ("4", "R4", "L4", "7", "5", "4+5"),
}

_AU_TOKEN = re.compile(r"^([LR]?)(\d+)$")


def parse_coding(text: str) -> list[tuple[str, int]]:
    """'4+L10' -> [('', 4), ('L', 10)]; only the dialect this generator writes."""
    parts = []
    for token in str(text).split("+"):
        match = _AU_TOKEN.match(token.strip())
        if match is None or int(match.group(2)) not in AU_MOTIONS:
            raise DataError(f"synthetic AU coding {text!r}: cannot generate {token!r}")
        parts.append((match.group(1), int(match.group(2))))
    return parts


def emotion_from_aus(text: str) -> str:
    """The emotion a coding implies, by the CASME II rules (Yan et al. 2014) restricted to the generated AUs."""
    aus = {au for _, au in parse_coding(text)}
    if 12 in aus:
        return "happiness"
    if aus & {9, 10} or {4, 7} <= aus:
        return "disgust"
    if aus & {1, 2}:
        return "surprise"
    if aus & {14, 15, 17}:
        return "repression"
    return "others"


def au_pattern(au: int, side: str = "") -> np.ndarray:
    """(68, 2) apex displacement of one AU in px of a 256 px frame; side '' both, 'R' image-left, 'L' image-right."""
    out = np.zeros((68, 2), np.float32)
    for index, (dx, dy) in AU_MOTIONS[au].items():
        midline = MIRROR[index] == index
        if side in ("", "R"):
            out[index] += (dx, dy) if side == "" or not midline else (0.5 * dx, 0.5 * dy)
        if side in ("", "L") and not midline:
            out[MIRROR[index]] += (-dx, dy)
        elif side == "L":
            out[index] += (0.5 * dx, 0.5 * dy)
    return out


@dataclass(frozen=True)
class SynthClip:
    """One generated clip in memory: what the writer stores, and what a quick experiment can use directly."""

    subject: str  # sheet form, '01'
    filename: str  # 'EP01_01'
    onset: int
    apex: int
    offset: int
    coding: str  # Action Units, e.g. '4+L10'
    emotion: str
    frames: np.ndarray  # uint8 (T, S, S, 3) RGB, before JPEG coding
    landmarks: np.ndarray  # float32 (T, 68, 2)
    flow: np.ndarray  # float16 (T-1, S, S, 2)

    @property
    def frame_numbers(self) -> np.ndarray:
        return np.arange(self.onset, self.offset + 1, dtype=np.int32)


@dataclass(frozen=True)
class _Grid:
    """Smooth fields (displacements, maps, flow) are computed on a grid of half the resolution and upsampled: 4x less
    work, and exact for the affine parts (linear interpolation), ~0.01 px for the Gaussian ones (sigma >= 4 samples)."""

    size: int
    points: np.ndarray  # float32 (c, c, 2): x, y of the coarse samples, in pixels of the S x S frame
    ratio: float  # coarse index per frame pixel
    upsample: np.ndarray  # float32 (S, S, 2): frame pixel -> coarse index, a cv2.remap map

    def sample(self, field: np.ndarray, points: np.ndarray) -> np.ndarray:
        """A coarse field (c, c, k) at frame coordinates `points` (..., 2), bilinear, borders replicated."""
        return cv2.remap(field, points * np.float32(self.ratio), None, cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)

    def full(self, field: np.ndarray) -> np.ndarray:
        """A coarse field upsampled to every frame pixel (S, S, k)."""
        return cv2.remap(field, self.upsample, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> _Grid:
    coarse = size // 2 + 1
    ratio = (coarse - 1) / (size - 1)
    axis = np.arange(coarse, dtype=np.float32) / np.float32(ratio)
    return _Grid(size, _mesh(axis), ratio, _mesh(np.arange(size, dtype=np.float32) * np.float32(ratio)))


def _mesh(axis: np.ndarray) -> np.ndarray:
    xs, ys = np.meshgrid(axis, axis)
    return np.stack([xs, ys], axis=-1)


@dataclass(frozen=True)
class _Face:
    """An image with its 68 landmarks and the kernel that spreads landmark displacements over it."""

    image: np.ndarray  # uint8 (S, S, 3)
    landmarks: np.ndarray  # float32 (68, 2)
    kernel: np.ndarray  # float32 (c*c, 68) at the coarse grid: field = (kernel @ d).reshape(c, c, 2)
    kernel_at_landmarks: np.ndarray  # float32 (68, 68)

    def field(self, displacement: np.ndarray) -> np.ndarray:
        """Dense coarse field (c, c, 2) of landmark displacements (68, 2)."""
        side = int(round(np.sqrt(self.kernel.shape[0])))
        return (self.kernel @ displacement.astype(np.float32)).reshape(side, side, 2)


def _kernel(points: np.ndarray, centres: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised Gaussian weights (N, 68): displacement(x) = K(x) @ d.

    Near the landmarks this interpolates their displacements (landmarks with zero displacement pin their area), and it
    fades to zero farther than ~2 sigma from every landmark, which keeps AU motion local.
    """
    d2 = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    weights = np.exp(-d2 / (2 * sigma**2))
    return (weights / (weights.sum(1, keepdims=True) + np.exp(-2.0))).astype(np.float32)


def _make_face(image: np.ndarray, landmarks: np.ndarray, sigma: float) -> _Face:
    landmarks = landmarks.astype(np.float32)
    grid = _grid(image.shape[0])
    return _Face(image, landmarks, _kernel(grid.points.reshape(-1, 2), landmarks, sigma),
                 _kernel(landmarks, landmarks, sigma))


def _transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to points (..., 2)."""
    return cv2.transform(points.reshape(-1, 1, 2), matrix).reshape(points.shape)


def _inverse_map(grid: _Grid, field: np.ndarray, targets: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Solve p + field(p) = targets for p by fixed-point iteration (fields are smooth, |grad| << 1)."""
    points = targets
    for _ in range(iterations):
        points = targets - grid.sample(field, points)
    return points


def _similarity(size: int, dx: float, dy: float, angle_deg: float, scale: float) -> np.ndarray:
    """2x3 rotation/scale about the image centre followed by a shift."""
    centre = ((size - 1) / 2, (size - 1) / 2)
    matrix = cv2.getRotationMatrix2D(centre, angle_deg, scale)
    matrix[:, 2] += (dx, dy)
    return matrix


@functools.lru_cache(maxsize=4)
def _base_face(size: int) -> _Face:
    """The astronaut's face cropped to S x S (face ~60 % of the frame, room for the forehead), with its kernel."""
    from skimage.data import astronaut

    lo, hi = ASTRONAUT_LANDMARKS.min(0), ASTRONAUT_LANDMARKS.max(0)
    extent = float((hi - lo).max())
    side = int(round(1.7 * extent))
    centre = (lo + hi) / 2 - (0, 0.12 * extent)
    x0, y0 = (int(round(c - side / 2)) for c in centre)
    shift = np.array([[1.0, 0, -x0], [0, 1.0, -y0]])  # integer shift: an exact crop, borders reflected
    crop = cv2.warpAffine(astronaut(), shift, (side, side), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT101)
    image = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    landmarks = (ASTRONAUT_LANDMARKS - (x0, y0) + 0.5) * (size / side) - 0.5  # pixel centres at integers
    return _make_face(image, landmarks, sigma=0.09 * size)


def _shape_displacement(rng: np.random.Generator, landmarks: np.ndarray, unit: float) -> np.ndarray:
    """Per-subject face-shape change at the landmarks (68, 2): proportions, features' size and position."""
    centre = landmarks.mean(0)
    d = np.zeros_like(landmarks)
    d += (landmarks - centre) * rng.normal(0, (0.05, 0.04))  # face width / height
    side = np.where(landmarks[:, 0] < centre[0], -1.0, 1.0)  # -1 = image-left half
    eyes_brows = np.r_[17:27, 36:48]
    d[eyes_brows, 0] += side[eyes_brows] * rng.normal(0, 2.5) * unit  # eye spacing
    d[17:27, 1] += rng.normal(0, 3.0) * unit  # brow height
    for eye in (np.r_[36:42], np.r_[42:48]):
        d[eye] += (landmarks[eye] - landmarks[eye].mean(0)) * rng.normal(0, 0.12)  # eye size
    nose = np.r_[31:36]
    d[nose, 1] += rng.normal(0, 3.0) * unit  # nose length
    d[nose, 0] += (landmarks[nose, 0] - landmarks[nose, 0].mean()) * rng.normal(0, 0.12)  # nostril width
    mouth = np.r_[48:68]
    d[mouth, 1] += rng.normal(0, 3.0) * unit
    d[mouth, 0] += (landmarks[mouth, 0] - landmarks[mouth, 0].mean()) * rng.normal(0, 0.1)  # mouth width
    d[np.r_[49:54], 1] -= abs(rng.normal(0, 1.5)) * unit  # upper lip thickness
    d[np.r_[55:60], 1] += abs(rng.normal(0, 1.5)) * unit  # lower lip thickness
    d[np.r_[6:11], 1] += rng.normal(0, 4.0) * unit  # chin length
    d += rng.normal(0, 0.8, d.shape) * unit
    return d.astype(np.float32)


def _skin_mask(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Soft mask (S, S, 1) of the face: landmark hull extended to the forehead."""
    forehead = landmarks[17:27] - (0, 0.12 * size)
    hull = cv2.convexHull(np.concatenate([landmarks, forehead]).astype(np.float32)).astype(np.int32)
    mask = np.zeros((size, size), np.float32)
    cv2.fillConvexPoly(mask, hull, 1.0)
    return cv2.GaussianBlur(mask, (0, 0), 0.03 * size)[..., None]


def _make_identity(seed: int, subject: int, size: int) -> _Face:
    """A subject: the base face re-shaped, maybe mirrored, re-toned and re-textured."""
    rng = np.random.default_rng([seed, subject])
    unit = size / REFERENCE_SIZE
    base = _base_face(size)
    shape = _shape_displacement(rng, base.landmarks, unit)
    grid = _grid(size)
    source = grid.full(_inverse_map(grid, base.field(shape), grid.points))
    image = cv2.remap(base.image, source, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    landmarks = base.landmarks + base.kernel_at_landmarks @ shape
    if rng.random() < 0.5:
        image = np.ascontiguousarray(image[:, ::-1])
        landmarks = np.stack([size - 1 - landmarks[:, 0], landmarks[:, 1]], axis=1)[MIRROR]

    mask = _skin_mask(landmarks, size)
    pigment = rng.random()  # 0 = the astronaut's light skin, 1 = dark
    skin_gain = (1 - pigment) * np.array([1.05, 1.0, 0.97]) + pigment * np.array([0.55, 0.42, 0.36])
    skin_gain = skin_gain * rng.normal(1, 0.04, 3)
    rest_gain = rng.uniform(0.65, 1.2, 3)
    img = image.astype(np.float32) * (mask * skin_gain + (1 - mask) * rest_gain).astype(np.float32)
    blotches = cv2.resize(rng.normal(0, 1, (8, 8)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    img *= 1 + mask * rng.uniform(0.02, 0.08) * blotches[..., None]
    grain = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 0.6 * unit + 0.3)
    img += mask * rng.uniform(2, 6) * grain[..., None]
    contrast, mean = rng.uniform(0.85, 1.15), img.mean()
    img = (img - mean) * contrast + mean
    return _make_face(np.clip(img, 0, 255).astype(np.uint8), landmarks, sigma=0.035 * size)


@dataclass(frozen=True)
class _ClipSpec:
    filename: str
    coding: str
    emotion: str
    onset: int
    n_frames: int
    apex_index: int


def _clip_specs(cfg: SynthConfig, subject: int) -> list[_ClipSpec]:
    """The subject's clips: emotions cycle in a random order (balanced classes), coding drawn within the emotion."""
    rng = np.random.default_rng([cfg.seed, subject, 10**6])
    order = rng.permutation(len(EMOTIONS))
    specs = []
    for j in range(cfg.clips_per_subject):
        emotion = EMOTIONS[order[j % len(EMOTIONS)]]
        codings = EMOTION_CODINGS[emotion]
        coding = codings[rng.integers(len(codings))]
        n_frames = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
        apex_index = int(round(rng.uniform(0.3, 0.6) * (n_frames - 1)))
        specs.append(_ClipSpec(f"EP{j + 1:02d}_01", coding, emotion, int(rng.integers(5, 300)), n_frames, apex_index))
    return specs


def _profile(n_frames: int, apex_index: int, residual: float) -> np.ndarray:
    """AU intensity per frame: raised cosine 0 -> 1 at the apex -> `residual` at the offset."""
    t = np.arange(n_frames, dtype=np.float64)
    rise = 0.5 - 0.5 * np.cos(np.pi * np.clip(t / apex_index, 0, 1))
    fall = residual + (1 - residual) * (0.5 + 0.5 * np.cos(np.pi * np.clip((t - apex_index) /
                                                                           (n_frames - 1 - apex_index), 0, 1)))
    return np.where(t <= apex_index, rise, fall)


def _render_clip(face: _Face, spec: _ClipSpec, rng: np.random.Generator, size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames (T,S,S,3) uint8, landmarks (T,68,2) float32 and consecutive forward flow (T-1,S,S,2) float16."""
    unit = size / REFERENCE_SIZE
    au_disp = sum(au_pattern(au, side) * rng.uniform(0.7, 1.3) for side, au in parse_coding(spec.coding)) * unit
    static = sum(au_pattern(au) * rng.normal(0, 0.5) for au in AU_MOTIONS) * unit
    static = static + rng.normal(0, 0.3, (68, 2)).astype(np.float32) * unit
    dense_au, dense_static = face.field(au_disp), face.field(static)
    intensity = _profile(spec.n_frames, spec.apex_index, rng.uniform(0.0, 0.3))

    pose = _similarity(size, *rng.normal(0, 3 * unit, 2), rng.normal(0, 1.5), 1 + rng.normal(0, 0.025))
    t = np.arange(spec.n_frames) / spec.n_frames
    wobble = [rng.uniform(0.2, 0.8) * unit * np.sin(2 * np.pi * (rng.uniform(0.3, 1.0) * t + rng.random()))
              for _ in range(2)]
    tilt = rng.uniform(0, 0.3) * np.sin(2 * np.pi * (rng.uniform(0.3, 1.0) * t + rng.random()))

    grid = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    xs = np.arange(size, dtype=np.float32) / size - 0.5
    ramp = xs[None, :] * np.cos(angle) + xs[:, None] * np.sin(angle)
    light = np.repeat((rng.uniform(0.85, 1.15) * (1 + rng.uniform(0, 0.3) * ramp))[..., None], 3, axis=2)
    light = light.astype(np.float32)
    drift = 1 + 0.01 * np.sin(2 * np.pi * (t + rng.random()))
    noise_sigma = rng.uniform(1.0, 2.5)

    frames = np.empty((spec.n_frames, size, size, 3), np.uint8)
    landmarks = np.empty((spec.n_frames, 68, 2), np.float32)
    flow = np.empty((spec.n_frames - 1, size, size, 2), np.float16)
    previous: tuple[np.ndarray, np.ndarray] | None = None
    for k in range(spec.n_frames):
        head = _similarity(size, wobble[0][k], wobble[1][k], tilt[k], 1.0)
        matrix = np.vstack([head, (0, 0, 1)]) @ np.vstack([pose, (0, 0, 1)])
        field = dense_static + np.float32(intensity[k]) * dense_au
        forward = _transform(matrix[:2], grid.points + field)  # Q_k at the identity's coarse grid points
        source = _inverse_map(grid, field, _transform(cv2.invertAffineTransform(matrix[:2]), grid.points))
        image = cv2.remap(face.image, grid.full(source), None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        lit = cv2.multiply(image, light, dtype=cv2.CV_32F, scale=float(drift[k]))
        lit += rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(noise_sigma)  # luminance noise
        frames[k] = cv2.convertScaleAbs(cv2.max(lit, 0.0))  # rounds and saturates to uint8
        disp = static + np.float32(intensity[k]) * au_disp
        landmarks[k] = _transform(matrix[:2], face.landmarks + face.kernel_at_landmarks @ disp)
        if previous is not None:
            prev_forward, prev_source = previous
            step = grid.full(grid.sample(forward - prev_forward, prev_source))
            flow[k - 1] = np.round(step * np.float32(1 / FLOW_STEP)) * np.float32(FLOW_STEP)
        previous = (forward, source)
    return frames, landmarks, flow


def iter_clips(cfg: SynthConfig) -> Iterator[SynthClip]:
    """Generate the dataset clip by clip, subject by subject (deterministic in cfg.seed)."""
    for s in range(1, cfg.subjects + 1):
        face = _make_identity(cfg.seed, s, cfg.image_size)
        for j, spec in enumerate(_clip_specs(cfg, s)):
            rng = np.random.default_rng([cfg.seed, s, j])
            frames, landmarks, flow = _render_clip(face, spec, rng, cfg.image_size)
            yield SynthClip(f"{s:02d}", spec.filename, spec.onset, spec.onset + spec.apex_index,
                            spec.onset + spec.n_frames - 1, spec.coding, spec.emotion, frames, landmarks, flow)


# ---------------------------------------------------------------------------------------------------------- writing

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _write_zip(path: Path, entries: list[tuple[str, bytes]], level: int) -> None:
    """A zip whose bytes depend only on the entries (fixed timestamps), written atomically."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=level)
    atomic_write(path, buffer.getvalue())


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    entries = []
    for key, array in arrays.items():
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
        entries.append((f"{key}.npy", buffer.getvalue()))
    _write_zip(path, entries, level=1)


def _sheet_cell_au(coding: str) -> int | str:
    """Like the real sheet: a single bilateral AU is a number cell, anything else text."""
    return int(coding) if coding.isdigit() else coding


def _write_sheet(path: Path, rows: list[list[object]], columns: tuple[str, ...] = SHEET_COLUMNS) -> None:
    """The coding sheet, byte-reproducible: fixed document dates and zip timestamps."""
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(list(columns))
    for row in rows:
        sheet.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    entries = []
    with zipfile.ZipFile(buffer) as archive:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:(created|modified)[^>]*>)[^<]*", rb"\g<1>2014-05-08T00:00:00Z", data)
            entries.append((info.filename, data))
    _write_zip(path, entries, level=6)


def dataset_name(cfg: SynthConfig, subject: int) -> str:
    """The source dataset of a subject: `synthetic`, or with synth.datasets = n > 1, `synthetic1` .. `syntheticN`
    (subjects dealt round robin), so the leave-one-dataset-out split has a composite to run on."""
    return "synthetic" if cfg.datasets == 1 else f"synthetic{(subject - 1) % cfg.datasets + 1}"


def _manifest(cfg: SynthConfig) -> dict[str, object]:
    # `datasets` only when used, so a single-dataset configuration keeps the manifest (and DVC hash) it had.
    exclude = {"out"} | ({"datasets"} if cfg.datasets == 1 else set())
    return {"generator": __name__, "version": GENERATOR_VERSION, "config": cfg.model_dump(exclude=exclude)}


def is_up_to_date(cfg: SynthConfig, root: Path) -> bool:
    """True when `root` holds a complete dataset generated from this configuration by this generator version."""
    path = root / MANIFEST_NAME
    if not path.is_file() or not (root / SHEET_NAME).is_file():
        return False
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return {k: stored.get(k) for k in ("generator", "version", "config")} == _manifest(cfg)


def _clear(root: Path) -> None:
    """Remove what a previous generation wrote (and nothing else: `root` may hold unrelated files)."""
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    (root / SHEET_NAME).unlink(missing_ok=True)
    shutil.rmtree(root / GROUNDTRUTH_DIR, ignore_errors=True)
    for child in root.glob("sub[0-9]*"):
        if child.is_dir() and re.fullmatch(r"sub\d+", child.name):
            shutil.rmtree(child)


def write_dataset(cfg: SynthConfig, root: Path | None = None) -> Path:
    """Write the dataset under `root` (default cfg.out); the manifest, written last, marks it complete."""
    root = Path(cfg.out if root is None else root)
    if cfg.min_frames > cfg.max_frames:
        raise ConfigError(f"synth.min_frames ({cfg.min_frames}) is larger than synth.max_frames ({cfg.max_frames})")
    root.mkdir(parents=True, exist_ok=True)
    _clear(root)
    rows: list[list[object]] = []
    counts = dict.fromkeys(EMOTIONS, 0)
    n_frames = 0
    for clip in iter_clips(cfg):
        folder = f"sub{clip.subject}"
        clip_dir = root / folder / clip.filename
        clip_dir.mkdir(parents=True)
        for number, frame in zip(clip.frame_numbers, clip.frames):
            ok, data = cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise DataError("JPEG encoding failed", file=str(clip_dir))
            # Plain writes: the manifest, written last and atomically, is what marks the dataset complete.
            (clip_dir / FRAME_TEMPLATE.format(number)).write_bytes(data.tobytes())
        truth_dir = root / GROUNDTRUTH_DIR / folder
        truth_dir.mkdir(parents=True, exist_ok=True)
        _write_npz(truth_dir / f"{clip.filename}.npz",
                   {"landmarks": clip.landmarks, "flow": clip.flow, "frame_numbers": clip.frame_numbers})
        rows.append([clip.subject, clip.filename, clip.onset, clip.apex, clip.offset, _sheet_cell_au(clip.coding),
                     clip.emotion, *([dataset_name(cfg, int(clip.subject))] if cfg.datasets > 1 else [])])
        counts[clip.emotion] += 1
        n_frames += len(clip.frames)
    _write_sheet(root / SHEET_NAME, rows, SHEET_COLUMNS + ((DATASET_COLUMN,) if cfg.datasets > 1 else ()))
    manifest = _manifest(cfg) | {"clips": len(rows), "frames": n_frames, "emotions": counts}
    atomic_write(root / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")  # last: complete
    return root
