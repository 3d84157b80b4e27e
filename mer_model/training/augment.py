"""Training-time augmentation applied IDENTICALLY to every array of one sample (MMNet recipe).

Onset and apex (or the frames of a sequence) must move together: a different flip or crop per frame would itself look
like motion, which is exactly the signal the models learn. One affine transform (horizontal flip, rotation up to
3 degrees, random crop with padding 15 px of a 224 image) is drawn per sample in RESOLUTION-FREE units and instantiated
for each array's size, so a 28 px flow map and a 224 px crop of the same sample get the same geometric change.
Vector fields are transformed too: raw flow (`flows128`) gets the affine's linear part applied to (u, v); the
min-max-normalised `flow28` maps get u -> 1 - u on a flip (exact for a min-max normalised map) and no vector rotation
(not exact under per-map normalisation; at 3 degrees the mixing is below 5%). Landmarks follow the points and, on a
flip, are re-indexed by the mirror permutation so that index 36 still means the image-left eye corner.

Two implementations of the same transform: `apply` (OpenCV, one sample's cache arrays on the CPU: the reference) and
`apply_batch` (torch `affine_grid`/`grid_sample` on a whole batch where it lives, e.g. device-resident data on a GPU),
which uses the same per-sample matrices; they agree within interpolation tolerance (tests/test_training_data.py).
`mirror_batch` is the flip alone, exact and without interpolation: the second view of flip test-time augmentation
(`tta_forward`, train.tta).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mer.model.batch_keys import BATCH_KEYS, Geometry

REFERENCE_SIZE = 224  # the MMNet recipe is stated for 224 px crops
MAX_ROTATION_DEG = 3.0
CROP_PADDING = 15  # at REFERENCE_SIZE


def _mirror_68() -> np.ndarray:
    """Index permutation of the 68-point (iBUG) scheme under a horizontal flip."""
    perm = np.arange(68)
    pairs = [(i, 16 - i) for i in range(8)]  # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]  # brows
    pairs += [(31, 35), (32, 34)]  # nose base
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lips
    pairs += [(60, 64), (61, 63), (65, 67)]  # inner lips
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


MIRROR_68 = _mirror_68()
MIRROR_5 = np.array([1, 0, 2, 4, 3])  # left eye, right eye, nose, left mouth, right mouth


@dataclass(frozen=True)
class Augmentation:
    """One draw of the sample-level transform; shifts are fractions of the image side."""

    flip: bool
    angle: float  # degrees, counter-clockwise
    shift_x: float
    shift_y: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Augmentation:
        # RandomCrop(padding=p) on a padded image == an integer translation in [-p, p].
        sx, sy = (rng.integers(-CROP_PADDING, CROP_PADDING + 1, size=2) / REFERENCE_SIZE).tolist()
        return cls(bool(rng.random() < 0.5), float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)), sx, sy)

    def matrix(self, height: int, width: int) -> np.ndarray:
        """2x3 affine (pixel-centre coordinates, as cv2.warpAffine uses) for an image of this size."""
        flip = np.array([[-1.0, 0, width - 1], [0, 1, 0], [0, 0, 1]]) if self.flip else np.eye(3)
        rot = np.vstack([cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), self.angle, 1.0), [0, 0, 1]])
        shift = np.array([[1.0, 0, round(self.shift_x * width)], [0, 1, round(self.shift_y * height)], [0, 0, 1]])
        return (shift @ rot @ flip)[:2]


def _warp(image_hwc: np.ndarray, m: np.ndarray, border: int) -> np.ndarray:
    """warpAffine for any channel count (cv2 handles at most 4 per call in some builds, so chunk)."""
    h, w = image_hwc.shape[:2]
    squeeze = image_hwc.ndim == 2
    img = image_hwc[..., None] if squeeze else image_hwc
    chunks = [
        cv2.warpAffine(np.ascontiguousarray(img[..., i:i + 4]), m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border)
        for i in range(0, img.shape[-1], 4)
    ]
    out = np.concatenate([c.reshape(h, w, -1) for c in chunks], axis=-1)
    return out[..., 0] if squeeze else out


def _points(points: np.ndarray, m: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    out = points @ m[:, :2].T + m[:, 2]
    if perm is not None:
        out = out[..., perm, :]
    return out.astype(points.dtype)


def _spatial(geometry: Geometry, array: np.ndarray) -> tuple[int, int]:
    """(H, W) of an image-like array of this geometric kind."""
    if geometry is Geometry.IMAGE:
        return array.shape[0], array.shape[1]
    if geometry is Geometry.FLOW_VECTORS:
        return array.shape[2], array.shape[3]
    return array.shape[1], array.shape[2]  # FRAME_STACK (N, H, W), MINMAX_FLOW_MAP (C, H, W)


def _warp_kind(geometry: Geometry, array: np.ndarray, aug: Augmentation) -> np.ndarray:
    """The augmented copy of one image-like array (geometry IMAGE, FRAME_STACK, FLOW_VECTORS, MINMAX_FLOW_MAP)."""
    m = aug.matrix(*_spatial(geometry, array))
    if geometry is Geometry.IMAGE:
        return _warp(array, m, cv2.BORDER_CONSTANT)
    if geometry is Geometry.FRAME_STACK:
        n, h, w = array.shape
        return _warp(np.moveaxis(array, 0, -1), m, cv2.BORDER_CONSTANT).reshape(h, w, -1).transpose(2, 0, 1)
    if geometry is Geometry.FLOW_VECTORS:
        flows = array.astype(np.float32)  # (N-1, 2, H, W), pixels
        n, _, h, w = flows.shape
        warped = _warp(flows.reshape(n * 2, h, w).transpose(1, 2, 0), m, cv2.BORDER_CONSTANT)
        warped = warped.reshape(h, w, n, 2).transpose(2, 3, 0, 1)
        # A displacement d maps to A d under x -> A x + b.
        return np.einsum("ij,njhw->nihw", m[:, :2], warped).astype(array.dtype)
    # MINMAX_FLOW_MAP (3, H, W): replicate borders, as 0 in a min-max normalised map is the most negative motion.
    warped = _warp(array.transpose(1, 2, 0), m, cv2.BORDER_REPLICATE).transpose(2, 0, 1).copy()
    if aug.flip:
        warped[0] = 1.0 - warped[0]
    return warped.astype(array.dtype)


_MIRRORS = {Geometry.POINTS5: MIRROR_5, Geometry.LANDMARKS68: MIRROR_68}


def _by_geometry(arrays: Mapping[str, Any], size_of: Callable[[Geometry, Any], tuple[int, int]]
                 ) -> tuple[list[tuple[str, Geometry]], list[tuple[str, Geometry, tuple[int, int]]]]:
    """Split the keys that move into image-like ones (key, geometry) and point sets (key, geometry, (H, W) of the
    pixel frame the points live in: the key their spec names, e.g. points5 -> flow28, landmarks68 -> frames128, or
    its default side when that key is absent). Keys without geometry (`aus`, ...) are left out: they pass through."""
    images, points, sizes = [], [], {}
    for key, array in arrays.items():
        spec = BATCH_KEYS[key] if key in BATCH_KEYS else None
        if spec is None or spec.geometry is Geometry.NONE:
            continue
        if spec.geometry in _MIRRORS:
            points.append((key, spec))
        else:
            images.append((key, spec.geometry))
            sizes[spec.frame_of[0] if spec.frame_of else key] = size_of(spec.geometry, array)
    framed = []
    for key, spec in points:
        frame, side = spec.frame_of or (key, 0)
        framed.append((key, spec.geometry, sizes.get(frame, (side, side))))
    return images, framed


def apply(arrays: dict[str, np.ndarray], aug: Augmentation) -> dict[str, np.ndarray]:
    """Return augmented copies of the cache arrays of one sample, each moved by its geometric kind
    (mer.model.batch_keys); keys without geometry (`aus`, ...) pass through."""
    out = dict(arrays)
    images, points = _by_geometry(arrays, _spatial)
    for key, geometry in images:
        out[key] = _warp_kind(geometry, arrays[key], aug)
    for key, geometry, (h, w) in points:
        out[key] = _points(arrays[key], aug.matrix(h, w), _MIRRORS[geometry] if aug.flip else None)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Batched, on tensors (device-resident data)


class DrawTable:
    """The draws `Augmentation.draw(default_rng((seed, epoch, i)))` of positions i = 0, 1, ... as arrays, computed
    once per (seed, epoch) and shared by every dataset with that seed (the folds of a group): a 68-fold group's step
    then costs no per-sample Python. Columns: flip (0/1), angle (degrees), shift_x, shift_y (fractions)."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._table = np.zeros((0, 4))

    def params(self, seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
        """(len(positions), 4) draw parameters."""
        top = int(positions.max(initial=-1)) + 1
        if self._key != (seed, epoch):
            self._key, self._table = (seed, epoch), np.zeros((0, 4))
        if top > len(self._table):
            new = [Augmentation.draw(np.random.default_rng((seed, epoch, i))) for i in range(len(self._table), top)]
            rows = np.array([[a.flip, a.angle, a.shift_x, a.shift_y] for a in new], dtype=np.float64).reshape(-1, 4)
            self._table = np.concatenate([self._table, rows])
        return self._table[positions]


def matrices(params: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, 2, 3) `Augmentation.matrix` of every row of `params` (DrawTable columns), vectorised (float64, the same
    arithmetic: flip, then cv2.getRotationMatrix2D's rotation about the centre, then the rounded shift)."""
    flip, angle, sx, sy = params.T
    b = len(params)
    f = np.tile(np.eye(3), (b, 1, 1))
    f[flip > 0.5, 0, 0], f[flip > 0.5, 0, 2] = -1.0, width - 1
    rad = np.deg2rad(angle)
    alpha, beta = np.cos(rad), np.sin(rad)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    r = np.tile(np.eye(3), (b, 1, 1))
    r[:, 0, 0], r[:, 0, 1], r[:, 0, 2] = alpha, beta, (1 - alpha) * cx - beta * cy
    r[:, 1, 0], r[:, 1, 1], r[:, 1, 2] = -beta, alpha, beta * cx + (1 - alpha) * cy
    t = np.tile(np.eye(3), (b, 1, 1))
    t[:, 0, 2], t[:, 1, 2] = np.round(sx * width), np.round(sy * height)  # half to even, as Python's round
    return (t @ r @ f)[:, :2]


def _theta(params: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, 2, 3) `affine_grid` matrices (normalised output -> input coordinates, align_corners=True) of the
    pixel-space matrices, which map input to output pixels as cv2.warpAffine reads them."""
    norm = np.array([[2.0 / max(width - 1, 1), 0, -1], [0, 2.0 / max(height - 1, 1), -1], [0, 0, 1]])
    forward = np.concatenate([matrices(params, height, width), np.tile([[[0.0, 0.0, 1.0]]], (len(params), 1, 1))],
                             axis=1)
    return (norm @ np.linalg.inv(forward) @ np.linalg.inv(norm))[:, :2]


def _warp_batch(x: Tensor, params: np.ndarray, padding: str) -> Tensor:
    """Warp (B, C, H, W) maps, sample b by params[b], bilinear like the reference."""
    b, c, h, w = x.shape
    theta = torch.as_tensor(_theta(params, h, w), dtype=torch.float32, device=x.device)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=True)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=padding, align_corners=True).to(x.dtype)


def apply_batch(batch: dict[str, Tensor], params: np.ndarray) -> dict[str, Tensor]:
    """The batched counterpart of `apply`: batch tensors (the model's layout: CHW images in [0, 1], (B, N, H, W)
    frames, (B, N-1, 2, H, W) flows, (B, 3, H, W) flow maps, (B, 5, 2) / (B, N, 68, 2) points) moved by sample b's
    draw params[b] (DrawTable columns), on their own device. Borders as the reference: zeros, replicated for
    min-max flow maps."""
    out = dict(batch)
    some = next(iter(batch.values()))
    flips = torch.as_tensor(params[:, 0] > 0.5, device=some.device)
    images, points = _by_geometry(batch, lambda _, x: tuple(x.shape[-2:]))
    for key, geometry in images:
        x = batch[key]
        h, w = x.shape[-2:]
        if geometry is Geometry.FLOW_VECTORS:
            b, n = x.shape[:2]
            warped = _warp_batch(x.reshape(b, n * 2, h, w), params, "zeros").reshape(x.shape)
            linear = torch.as_tensor(matrices(params, h, w)[:, :, :2], dtype=x.dtype, device=x.device)
            out[key] = torch.einsum("bij,bnjhw->bnihw", linear, warped)  # a displacement d maps to A d
        elif geometry is Geometry.MINMAX_FLOW_MAP:
            warped = _warp_batch(x, params, "border")
            u = torch.where(flips.view(-1, 1, 1), 1.0 - warped[:, 0], warped[:, 0])
            out[key] = torch.cat([u.unsqueeze(1), warped[:, 1:]], dim=1)
        else:  # IMAGE (B, C, H, W) and FRAME_STACK (B, N, H, W): every channel / frame alike
            out[key] = _warp_batch(x, params, "zeros")
    for key, geometry, (h, w) in points:
        x = batch[key]
        m = torch.as_tensor(matrices(params, h, w), dtype=x.dtype, device=x.device)
        shape = (x.shape[0],) + (1,) * (x.ndim - 3)
        moved = x @ m[:, :, :2].transpose(1, 2).reshape(*shape, 2, 2) + m[:, :, 2].reshape(*shape, 1, 2)
        mirror = torch.as_tensor(_MIRRORS[geometry], device=x.device)
        out[key] = torch.where(flips.view(*shape, 1, 1), moved.index_select(-2, mirror), moved)
    return out


def mirror_batch(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The horizontal mirror image of a batch in the model's layout (what `apply_batch` does with a flip and no
    rotation or shift, exactly: pure indexing, no resampling): image-like keys reversed along W, `flow28`'s u
    -> 1 - u, raw flow's u negated, points x -> W - 1 - x in their frame and re-indexed by the mirror permutation;
    keys without geometry (labels, AUs, class weights) pass through. Shape-generic over leading dimensions and free of
    data-dependent control flow, so it also runs under torch.func.vmap (fold groups).
    """
    out = dict(batch)
    images, points = _by_geometry(batch, lambda _, x: tuple(x.shape[-2:]))
    for key, geometry in images:
        x = batch[key].flip(-1)
        if geometry is Geometry.MINMAX_FLOW_MAP:
            x = torch.cat([1.0 - x[..., :1, :, :], x[..., 1:, :, :]], dim=-3)
        elif geometry is Geometry.FLOW_VECTORS:
            x = torch.cat([-x[..., :1, :, :], x[..., 1:, :, :]], dim=-3)
        out[key] = x
    for key, geometry, (_, w) in points:
        x = batch[key]
        moved = torch.cat([(w - 1) - x[..., :1], x[..., 1:]], dim=-1)
        out[key] = moved.index_select(-2, torch.as_tensor(_MIRRORS[geometry], device=x.device))
    return out


def tta_forward(forward: Callable[[Mapping[str, Tensor]], dict[str, Tensor]], batch: Mapping[str, Tensor],
                mode: str) -> dict[str, Tensor]:
    """A model's outputs for `batch` under test-time augmentation `mode` (MERModel.tta, from train.tta): "none" =
    `forward(batch)`; "flip" = also `forward(mirror_batch(batch))`, with `logits` replaced by the log of the two
    views' mean class probabilities (so a softmax or cross-entropy of the result is that of the mean; the other
    outputs are the plain view's). `forward` is the model, or a functional_call of it under vmap. Every evaluation
    (validation, test, fold groups, the final model's `inference.predict_proba`) goes through here, so they predict
    alike. The mirror is the flip the training augmentation draws, so it is in the training distribution."""
    outputs = forward(batch)
    if mode == "none":
        return outputs
    if mode != "flip":
        raise ValueError(f"test-time augmentation {mode!r}: expected 'none' or 'flip'")
    mirrored = forward(mirror_batch(batch))
    views = torch.stack([F.log_softmax(outputs["logits"].float(), dim=-1),
                         F.log_softmax(mirrored["logits"].float(), dim=-1)])
    return {**outputs, "logits": torch.logsumexp(views, dim=0) - math.log(2.0)}
