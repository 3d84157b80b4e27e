"""Face detection, 68-point landmarks and the per-clip alignment transform.

A micro-expression is a movement of a few pixels, so the alignment is computed ONCE per clip, on the onset frame, and
the same similarity transform is applied to every frame: re-detecting per frame would add jitter of the same size as
the expression and show up as spurious optical flow.

The transform rotates the image so that the two eye centres are level and crops a square around the 68 landmarks
(eyebrows to chin) enlarged by `margin` on every side. It is stored in unit coordinates (the crop square = [0, 1]^2)
so that the 224, 128 and 28 pixel frames of one sample are exact rescalings of each other.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np

# dlib 68-point indices (iBUG 300-W). Points 36-41 are the eye that appears on the image LEFT (the subject's right).
LEFT_EYE = slice(36, 42)
RIGHT_EYE = slice(42, 48)
NOSE_TIP = 30
MOUTH_LEFT = 48
MOUTH_RIGHT = 54


@functools.lru_cache(maxsize=1)
def dlib_models() -> tuple[object, object]:
    """dlib's HOG face detector and the 68-point shape predictor of face-recognition-models, loaded once per process."""
    import dlib

    with warnings.catch_warnings():
        # face-recognition-models 0.3 finds its files through setuptools' deprecated pkg_resources: a warning about
        # that package, not the user's data, printed by every process (Ray worker) that loads the predictor.
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated as an API", category=UserWarning)
        import face_recognition_models

    return dlib.get_frontal_face_detector(), dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())


@dataclass(frozen=True)
class FaceBox:
    """The face rectangle found on the onset frame, in source pixels; later frames reuse it (no re-detection)."""

    left: int
    top: int
    right: int
    bottom: int


def detect_face(gray: np.ndarray, upsample: int) -> FaceBox | None:
    """The largest face dlib finds in a greyscale uint8 image, or None."""
    detector, _ = dlib_models()
    faces = list(detector(gray, upsample))
    if not faces:
        return None
    best = max(faces, key=lambda r: r.width() * r.height())
    return FaceBox(best.left(), best.top(), best.right(), best.bottom())


def predict_landmarks(gray: np.ndarray, box: FaceBox) -> np.ndarray:
    """68 (x, y) landmarks in source pixels, float32 (68, 2), from the shape predictor run inside `box`."""
    import dlib

    _, predictor = dlib_models()
    shape = predictor(gray, dlib.rectangle(box.left, box.top, box.right, box.bottom))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


@dataclass(frozen=True)
class Alignment:
    """Similarity transform from source pixels to unit crop coordinates; `matrix` is 2x3."""

    matrix: np.ndarray

    def to_size(self, size: int) -> np.ndarray:
        """The 2x3 matrix for a `size` px crop; unit coordinate u maps to size*u - 0.5 (pixel centres at integers)."""
        scaled = self.matrix * float(size)
        scaled[:, 2] -= 0.5
        return scaled

    def warp(self, image: np.ndarray, size: int) -> np.ndarray:
        """The aligned square crop of `image`, black outside the source image.

        Black, not replicated borders: a constant region is static, so TV-L1 finds (almost) no motion there, whereas
        replicated edge pixels form streaks that flicker with sensor noise and show up as spurious flow (measured on
        the pre-cropped CASME II clip: replicated borders carried more flow than the face itself).
        """
        return cv2.warpAffine(
            image, self.to_size(size), (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
        )

    def points(self, points: np.ndarray, size: int) -> np.ndarray:
        """Source-pixel points (..., 2) mapped into the `size` px crop, float32."""
        m = self.to_size(size)
        return (np.asarray(points, dtype=np.float64) @ m[:, :2].T + m[:, 2]).astype(np.float32)


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image-left eye, image-right eye) centres from 68 landmarks."""
    return landmarks[LEFT_EYE].mean(axis=0), landmarks[RIGHT_EYE].mean(axis=0)


def alignment_from_landmarks(landmarks: np.ndarray, margin: float) -> Alignment:
    """Rotate so the eye centres are level, then take the square around the landmarks enlarged by `margin` per side."""
    left, right = eye_centres(landmarks.astype(np.float64))
    angle = math.atan2(right[1] - left[1], right[0] - left[0])
    cos, sin = math.cos(-angle), math.sin(-angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    rotated = landmarks.astype(np.float64) @ rotation.T
    low, high = rotated.min(axis=0), rotated.max(axis=0)
    side = float((high - low).max()) * (1.0 + 2.0 * margin)
    centre = (low + high) / 2.0
    linear = rotation / side
    offset = 0.5 - centre / side
    return Alignment(np.hstack([linear, offset[:, None]]))


def points5(landmarks: np.ndarray) -> np.ndarray:
    """MTCNN-order five points from 68 landmarks: left eye, right eye, nose tip, left and right mouth corner."""
    left, right = eye_centres(landmarks)
    return np.stack(
        [left, right, landmarks[NOSE_TIP], landmarks[MOUTH_LEFT], landmarks[MOUTH_RIGHT]]
    ).astype(np.float32)


# Where the five points of an ALIGNED face crop lie, as fractions of the crop's side (x, y; MTCNN order: image-left
# eye, image-right eye, nose tip, left and right mouth corner): the fallback of a crop on which dlib finds no face.
# An aligned crop puts the face where such a template expects it: measured as the mean of dlib's five points on the
# 285 of 309 apex crops of the shared MEGC2019 CASME II + SMIC part where it finds a face (per-coordinate standard
# deviation 0.01-0.03 of the side, i.e. under a pixel of the 28 px map), then mirrored to be left-right symmetric.
# HTNet's authors likewise fall back to fixed points.
TEMPLATE_POINTS5 = np.array([[0.23, 0.28], [0.77, 0.28], [0.50, 0.51], [0.28, 0.72], [0.72, 0.72]], dtype=np.float32)


def template_points5(size: float) -> np.ndarray:
    """The template five points (`TEMPLATE_POINTS5`) in a frame of `size` px, pixel centres at integers: (5, 2)."""
    return (TEMPLATE_POINTS5 * size - 0.5).astype(np.float32)
