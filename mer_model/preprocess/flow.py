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

Degenerate maps look valid after that normalisation, so they are refused before it (`check_motion`) and after it
(`check_flow_map`): an onset->apex flow of (near) zero magnitude (identical frames give exactly 0; a JPEG re-encode of
one frame 0.008 px and consecutive frames of a real 200 fps CASME II clip 0.057 px mean magnitude at 224 px), a
channel without any variation, three identical channels (a grey single-channel map copied into u, v and strain), and
NaN/inf.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mer.model.config import FlowConfig
from mer.model.errors import SampleError


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


# Mean flow magnitude below this fraction of the crop side is no motion (0.0022 px at 224 px; see the docstring).
MIN_MOTION = 1e-5


def check_motion(flow: np.ndarray, sample_id: str, what: str) -> None:
    """SampleError (reason "zero motion") when the mean magnitude of a (H, W, 2) flow is below MIN_MOTION of its
    side; `what` names the frames, e.g. "onset img1.jpg -> apex img1.jpg"."""
    if not np.isfinite(flow).all():
        raise SampleError(sample_id, f"flow {what} has NaN/inf values", reason="non-finite values")
    mean = float(np.linalg.norm(flow, axis=-1).mean())
    if mean < MIN_MOTION * flow.shape[1]:
        raise SampleError(sample_id, f"no motion: flow {what} has mean magnitude {mean:.2g} px at {flow.shape[1]} px",
                          reason="zero motion")


def check_flow_map(flow28: np.ndarray, sample_id: str, source: str) -> None:
    """SampleError unless a (3, H, W) u/v/strain map is finite, has variation in every channel, and is not one grey
    plane copied into all three channels. `source` names where it came from (a PNG path, or the frames)."""
    if not np.isfinite(flow28).all():
        raise SampleError(sample_id, f"flow map from {source} has NaN/inf values", reason="non-finite values")
    if np.array_equal(flow28[0], flow28[1]) and np.array_equal(flow28[1], flow28[2]):
        raise SampleError(sample_id, f"grey flow map {source}: u, v and strain are one identical plane "
                                     "(a single-channel map is not a u/v/strain map)", reason="grey flow map")
    flat = [name for name, channel in zip(("u", "v", "strain"), flow28) if float(np.ptp(channel)) <= 1e-6]
    if flat:
        raise SampleError(sample_id, f"flow map from {source}: channel {', '.join(flat)} has no variation "
                                     "(zero motion)", reason="zero motion")


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
    """A composite u/v/strain PNG as (3, size, size) float32 in [0, 1], channel order = the file's RGB = u, v, strain.

    SampleError naming the file when it is unreadable, of another size, or degenerate (`check_flow_map`: a grey
    single-channel map, which OpenCV would silently copy into three channels, a flat channel)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SampleError(sample_id, f"cannot read flow map {path}", reason="flow map unreadable")
    if image.shape[:2] != (size, size):
        raise SampleError(sample_id, f"flow map {path} is {image.shape[1]}x{image.shape[0]}, expected {size}x{size}",
                          reason="flow map size")
    if image.ndim == 2:
        raise SampleError(sample_id, f"grey flow map {path}: one channel, not u, v and strain",
                          reason="grey flow map")
    if image.dtype != np.uint8 or image.shape[2] not in (3, 4):
        raise SampleError(sample_id, f"flow map {path} is {image.dtype} with {image.shape[2]} channels, expected "
                                     "8-bit RGB", reason="flow map unreadable")
    rgb = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)
    flow28 = (rgb.transpose(2, 0, 1).astype(np.float32) / 255.0).copy()
    check_flow_map(flow28, sample_id, str(path))
    return flow28
