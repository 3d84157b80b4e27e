"""TV-L1 optical flow, optical strain and the 28x28 u/v/strain map of the MEGC2019 STSTNet/HTNet convention.

What the published maps are (studied on all 309 PNGs of `STSNet_whole_norm_u_v_os`, CASME II + SMIC part):

* 28x28, 8-bit RGB, no alpha.
* EVERY channel of EVERY map spans exactly 0..255, with typically a single pixel at 0 and a single pixel at 255: each
  channel is min-max normalised on its own, per image. Consequently 128 means nothing in particular: zero motion lands
  wherever -min/(max-min) puts it (the u/v medians range from about 40 to 200 across maps), and maps are not comparable
  in absolute magnitude, only in shape.
* Channel 3 (B) is the optical strain: non-negative and heavy-tailed (mean 10-40 of 255), and it is well explained by
  the strain computed from the gradients of channels 1 and 2 (mean correlation 0.88 over the 309 maps).
* Channel order R, G = u (horizontal), v (vertical): R is ANTI-symmetric under a left-right mirror (mean correlation
  with its mirror image -0.23; mouth corners and brows move outwards in opposite x directions) while G is symmetric
  (+0.61); R is the less symmetric channel in 271 of 309 maps. Fitting the strain with R=u,G=v also beats the swapped
  order (0.878 vs 0.858 mean correlation, better in 248 of 309 maps).

So `flow28` = per-channel min-max of (u, v, strain) on the flow resized to 28x28, as float32 in [0, 1] = PNG / 255, in
the PNG's RGB order. (HTNet itself reads the PNGs with cv2.imread, i.e. BGR; that reordering belongs to the model's
paper-compatible mode, not to the cache.)
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mer_model.config import FlowConfig
from mer_model.errors import SampleError


def tvl1(cfg: FlowConfig) -> cv2.optflow.DualTVL1OpticalFlow:
    """A Dual TV-L1 solver with the configured parameters (cheap to build; one per sample keeps workers stateless)."""
    return cv2.optflow.DualTVL1OpticalFlow_create(
        tau=cfg.tau,
        lambda_=cfg.lambda_,
        theta=cfg.theta,
        nscales=cfg.nscales,
        warps=cfg.warps,
        epsilon=cfg.epsilon,
        innnerIterations=cfg.inner_iterations,  # sic: OpenCV's keyword has three n's
        outerIterations=cfg.outer_iterations,
        scaleStep=cfg.scale_step,
        medianFiltering=cfg.median_filtering,
    )


def compute_flow(solver: cv2.optflow.DualTVL1OpticalFlow, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Flow (H, W, 2) float32 in pixels from greyscale uint8 `first` to `second`."""
    return solver.calc(first, second, None)


def optical_strain(flow: np.ndarray) -> np.ndarray:
    """Magnitude of the infinitesimal strain tensor, sqrt(exx^2 + eyy^2 + 2 exy^2), from central-difference gradients."""
    u, v = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
    du_dy, du_dx = np.gradient(u)
    dv_dy, dv_dx = np.gradient(v)
    shear = 0.5 * (du_dy + dv_dx)
    return np.sqrt(du_dx**2 + dv_dy**2 + 2.0 * shear**2).astype(np.float32)


def _minmax(channel: np.ndarray) -> np.ndarray:
    low, high = float(channel.min()), float(channel.max())
    if high - low <= 1e-12:
        return np.zeros_like(channel, dtype=np.float32)
    return ((channel - low) / (high - low)).astype(np.float32)


def flow_map(flow: np.ndarray, size: int) -> np.ndarray:
    """(3, size, size) float32 u, v, strain, each channel min-max normalised to [0, 1] (the composite convention).

    Strain is computed at full resolution (where the gradients are meaningful) and then area-resized with u and v.
    """
    stack = np.dstack([flow[..., 0], flow[..., 1], optical_strain(flow)])
    small = cv2.resize(stack, (size, size), interpolation=cv2.INTER_AREA)
    return np.stack([_minmax(small[..., c]) for c in range(3)])


def read_flow_png(path: Path, sample_id: str, size: int) -> np.ndarray:
    """A composite u/v/strain PNG as (3, size, size) float32 in [0, 1], channel order = the file's RGB = u, v, strain."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SampleError(sample_id, f"cannot read flow map {path}")
    if image.shape[:2] != (size, size):
        raise SampleError(sample_id, f"flow map {path} is {image.shape[1]}x{image.shape[0]}, expected {size}x{size}")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return (rgb.transpose(2, 0, 1).astype(np.float32) / 255.0).copy()
