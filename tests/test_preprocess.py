"""Preprocessing: face alignment on real CASME II frames, the flow-map convention of the MEGC2019 composite, bad input.

Frames for the tiny datasets are cut from scikit-image's public-domain astronaut photo (dlib finds its face), so only
the tests that are about real data need ../shared.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data

from mer.model.config import FlowConfig, PreprocessConfig
from mer.model.data.aus import AU_LIST
from mer.model.errors import SampleError
from mer.model.preprocess import face as facelib
from mer.model.preprocess.cache import SampleResult, process_row
from mer.model.preprocess.flow import compute_flow, flow_map, read_flow_png, tvl1
from mer.model.preprocess.sample import preprocess_sample, read_image, sampled_frames

# Small sizes and few TV-L1 iterations: these tests are about behaviour, not flow quality.
CHEAP = PreprocessConfig(
    seq_frames=3, seq_size=64, face_size=64,
    flow=FlowConfig(size=64, nscales=2, warps=2, inner_iterations=5, outer_iterations=2, median_filtering=3),
)
CONTRACT = {  # key -> (dtype, shape) for the default configuration (docs/architecture.md)
    "flow28": ("float32", (3, 28, 28)),
    "points5": ("float32", (5, 2)),
    "onset224": ("uint8", (224, 224, 3)),
    "apex224": ("uint8", (224, 224, 3)),
    "frames128": ("uint8", (8, 128, 128)),
    "flows128": ("float16", (7, 2, 128, 128)),
    "landmarks68": ("float32", (8, 68, 2)),
    "aus": ("uint8", (len(AU_LIST),)),
    "au_coded": ("uint8", ()),
}


def astronaut_face() -> np.ndarray:
    """BGR 180x180 crop around the astronaut's face."""
    return cv2.cvtColor(skimage.data.astronaut()[40:220, 130:310], cv2.COLOR_RGB2BGR)


def write_clip(folder: Path, first: int = 10, count: int = 6) -> None:
    """`count` frames img<first>.jpg.. of the astronaut face drifting by 0.3 px per frame (a little real motion)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = astronaut_face()
    for k in range(count):
        shifted = cv2.warpAffine(base, np.float32([[1, 0, 0.3 * k], [0, 1, 0]]), base.shape[1::-1],
                                 borderMode=cv2.BORDER_REFLECT)
        cv2.imwrite(str(folder / f"img{first + k}.jpg"), shifted)


def make_row(sample_id: str, frames_dir: Path | str = "", onset: Any = 10, apex: Any = 12, offset: Any = 15,
             **extra: Any) -> dict[str, Any]:
    row = {"sample_id": sample_id, "frames_dir": str(frames_dir), "frame_template": "img{}.jpg", "onset": onset,
           "apex": apex, "offset": offset, "aus": "4+7", "landmarks_path": "", "flow_path": "", "apex_path": "",
           "points5": ""}
    row.update(extra)
    return row


def mirror_correlation(channel: np.ndarray) -> float:
    """Correlation of a map with its left-right mirror image: -1 antisymmetric (like u), +1 symmetric (like v)."""
    centred = channel - channel.mean()
    return float(np.corrcoef(centred.ravel(), centred[:, ::-1].ravel())[0, 1])


# ------------------------------------------------------------------------------------------ real CASME II frames


def _casme2_grey(clip: Path, number: int) -> np.ndarray:
    return cv2.imread(str(clip / f"{number:03d}.jpg"), cv2.IMREAD_GRAYSCALE)


def test_casme2_face_found_and_one_alignment_for_all_frames(casme2_clip_dir: Path) -> None:
    cfg = PreprocessConfig()
    row = make_row("casme2/sub/clip", casme2_clip_dir, onset=1, apex=5, offset=10, frame_template="{:03d}.jpg")
    out = preprocess_sample(row, cfg, Path("."))
    arrays = out.arrays()
    assert out.face == "dlib" and out.estimated == ""
    for key, (dtype, shape) in CONTRACT.items():
        assert (str(arrays[key].dtype), arrays[key].shape) == (dtype, shape), key

    onset = _casme2_grey(casme2_clip_dir, 1)
    box = facelib.detect_face(onset, cfg.detector_upsample)
    assert box is not None, "dlib finds no face on the real CASME II onset frame"
    align = facelib.alignment_from_landmarks(facelib.predict_landmarks(onset, box), cfg.margin)
    # Every sampled frame is the ONSET transform applied to that frame: no per-frame re-detection.
    for k, number in enumerate(sampled_frames(1, 10, cfg.seq_frames)):
        np.testing.assert_array_equal(arrays["frames128"][k], align.warp(_casme2_grey(casme2_clip_dir, number), 128))
    landmarks = arrays["landmarks68"]
    left, right = facelib.eye_centres(landmarks[0])
    assert abs(left[1] - right[1]) < 0.5 and right[0] - left[0] > 30  # eyes level, a face-sized crop
    assert np.abs(landmarks - landmarks[0]).max() < 5  # predicted in the fixed box: points move only a little
    assert arrays["points5"].min() > 0 and arrays["points5"].max() < 28


def test_casme2_flow_small_nonzero_and_on_the_face(casme2_clip_dir: Path) -> None:
    first, last = _casme2_grey(casme2_clip_dir, 1), _casme2_grey(casme2_clip_dir, 10)
    landmarks = facelib.predict_landmarks(first, facelib.detect_face(first, 1))
    align = facelib.alignment_from_landmarks(landmarks, 0.15)
    flow = compute_flow(tvl1(FlowConfig()), align.warp(first, 224), align.warp(last, 224))
    magnitude = np.linalg.norm(flow, axis=2)
    face = np.zeros((224, 224), np.uint8)
    cv2.fillConvexPoly(face, cv2.convexHull(align.points(landmarks, 224)).astype(np.int32), 1)
    assert 0.02 < magnitude.mean() < 2.0  # 45 ms at 200 fps: sub-pixel motion, but not none
    assert magnitude.max() < 10
    assert magnitude[face == 1].mean() > 1.5 * magnitude[face == 0].mean()


# ------------------------------------------------------------------------------ the MEGC2019 flow-map convention


def _composite_maps(composite_dir: Path, count: int = 60) -> list[np.ndarray]:
    paths = sorted((composite_dir / "datasets" / "STSNet_whole_norm_u_v_os").glob("*.png"))[:count]
    assert paths
    return [read_flow_png(p, p.stem, 28) for p in paths]


def _convention(maps: list[np.ndarray]) -> dict[str, Any]:
    stack = np.stack(maps)
    return {
        "endpoints": bool(np.allclose(stack.min(axis=(2, 3)), 0) and np.allclose(stack.max(axis=(2, 3)), 1)),
        "mirror": [float(np.mean([mirror_correlation(m[c]) for m in maps])) for c in range(3)],
        "means": stack.mean(axis=(0, 2, 3)),
        "strain_skewed": bool(np.median(stack[:, 2]) < stack[:, 2].mean()),
    }


def test_composite_maps_are_per_channel_minmax_u_v_strain(composite_dir: Path) -> None:
    conv = _convention(_composite_maps(composite_dir))
    assert conv["endpoints"]  # every channel of every map spans exactly 0..1
    assert conv["mirror"][0] < 0 < conv["mirror"][1]  # channel 0 = u (antisymmetric), channel 1 = v
    assert conv["means"][2] < 0.25 and conv["means"][2] < conv["means"][:2].min()  # strain: low, heavy-tailed
    assert conv["strain_skewed"]


def _symmetric_expression() -> tuple[np.ndarray, np.ndarray]:
    """Aligned, mirror-symmetric face and the same face after a symmetric 'smile': mouth corners out and up."""
    grey = cv2.cvtColor(astronaut_face(), cv2.COLOR_BGR2GRAY)
    landmarks = facelib.predict_landmarks(grey, facelib.detect_face(grey, 1))
    align = facelib.alignment_from_landmarks(landmarks, 0.15)
    face = align.warp(grey, 224).astype(np.float32)
    face = (face + face[:, ::-1]) / 2
    corners = align.points(landmarks[[48, 54]], 224)
    centre_x = (224 - 1) / 2
    ys, xs = np.mgrid[0:224, 0:224].astype(np.float32)
    u = np.zeros_like(xs)
    v = np.zeros_like(xs)
    for cx, sign in ((2 * centre_x - corners[1, 0], -1.0), (corners[1, 0], 1.0)):  # mirrored corner positions
        blob = np.exp(-((xs - cx) ** 2 + (ys - corners[1, 1]) ** 2) / (2 * 12.0**2))
        u += sign * 1.2 * blob
        v += -0.8 * blob
    apex = cv2.remap(face, xs - u, ys - v, cv2.INTER_LINEAR)  # content at p moves to p + (u, v)
    return face.astype(np.uint8), apex.astype(np.uint8)


def test_computed_maps_match_composite_convention(composite_dir: Path) -> None:
    onset, apex = _symmetric_expression()
    ours = flow_map(compute_flow(tvl1(FlowConfig()), onset, apex), 28)
    assert ours.dtype == np.float32 and ours.shape == (3, 28, 28)
    mine, theirs = _convention([ours]), _convention(_composite_maps(composite_dir))
    assert mine["endpoints"] and theirs["endpoints"]
    for conv in (mine, theirs):  # same channel order: u antisymmetric, v symmetric, strain low and skewed
        assert conv["mirror"][0] < 0 < conv["mirror"][1]
        assert conv["means"][2] < conv["means"][:2].min() and conv["strain_skewed"]


def test_composite_row(composite_dir: Path) -> None:
    path = sorted((composite_dir / "datasets" / "STSNet_whole_norm_u_v_os").glob("*.png"))[0]
    row = make_row("casme2/sub01/x", onset=None, apex=None, offset=None, flow_path=str(path),
                   points5="6,7.5,21.5,7.8,13.9,14.6,7.1,21.1,20.2,21.4")
    out = preprocess_sample(row, PreprocessConfig(), Path("."))
    arrays = out.arrays(["flow28", "points5", "aus"])
    assert out.face == "composite" and set(arrays) == {"flow28", "points5", "aus", "au_coded"}
    bgr = cv2.imread(str(path))
    np.testing.assert_allclose(arrays["flow28"][0], bgr[..., 2] / 255.0, atol=1e-6)  # channel 0 = PNG red
    np.testing.assert_allclose(arrays["points5"][2], [13.9, 14.6])
    assert out.estimated == ""  # the table's points, measured: read as given
    # ... unless the table marks them as a fallback (landmarks5_28px.csv `source` whole_image_box): then counted
    fallback = preprocess_sample(dict(row, points5_estimated="whole_image_box"), PreprocessConfig(), Path("."),
                                 ("points5",))
    assert fallback.modalities["points5"].status == "ok" and fallback.estimated == "points5=whole_image_box"
    # Neither onset crops nor frames are distributed with the composite; apex crops only where present.
    unavailable = {m: o.reason for m, o in out.modalities.items() if o.status == "unavailable"}
    assert unavailable == dict.fromkeys(("onset224", "apex224", "frames128", "landmarks68", "flows128"), "unavailable")


# ------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "sub01" / "EP01"
    write_clip(folder)
    return folder


def entry_arrays(result: SampleResult) -> dict[str, np.ndarray]:
    """The arrays of a worker's ok entries (what the cache would store)."""
    out: dict[str, np.ndarray] = {}
    for entry in result.entries.values():
        if entry.status == "ok":
            out.update(np.load(io.BytesIO(entry.data)))
    return out


def failures(result: SampleResult) -> dict[str, str]:
    """modality -> error of the entries that are not ok."""
    return {m: e.error for m, e in result.entries.items() if e.status != "ok"}


def test_good_clip_cheap_config(clip: Path) -> None:
    result = process_row(make_row("synthetic/sub01/EP01", clip), CHEAP, Path("."))
    assert failures(result) == {} and result.face == "dlib"
    arrays = entry_arrays(result)
    assert arrays["frames128"].shape == (3, 64, 64) and arrays["flows128"].shape == (2, 2, 64, 64)
    assert arrays["aus"][AU_LIST.index(4)] == 1 and arrays["aus"].sum() == 2
    assert arrays["au_coded"].shape == () and arrays["au_coded"] == 0  # a hand-made row without au_coded
    coded = process_row(make_row("synthetic/sub01/EP01", clip, au_coded=True), CHEAP, Path("."), ("aus",))
    assert set(coded.entries) == {"aus"} and entry_arrays(coded)["au_coded"] == 1


def test_only_the_requested_modalities_are_computed(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flow28 pays for the onset->apex flow only: no 128 px flows, no per-frame landmarks, no frames beyond the
    onset and apex decoded."""
    import mer.model.preprocess.sample as sample_module

    flows, reads = [], []
    real_flow, real_read = sample_module.compute_flow, sample_module.read_image
    monkeypatch.setattr(sample_module, "compute_flow", lambda *a: flows.append(a[1].shape) or real_flow(*a))
    monkeypatch.setattr(sample_module, "read_image",
                        lambda path, sid, bits=None: reads.append(path.name) or real_read(path, sid, bits))
    result = process_row(make_row("s/sub01/EP01", clip), CHEAP, Path("."), ("flow28", "aus"))
    assert set(result.entries) == {"flow28", "aus"} and failures(result) == {}
    assert flows == [(64, 64)] and sorted(reads) == ["img10.jpg", "img12.jpg"]


@pytest.mark.parametrize(
    ("change", "failed", "message"),
    [
        ({"apex": 20}, "all", "apex 20 outside onset..offset 10..15"),
        ({"apex": 11, "offset": 11}, {"frames128", "landmarks68", "flows128"},
         "has 2 frames, fewer than preprocess.seq_frames=3"),
        ({"frame_template": "frame{}.png"}, "all", "frame file missing"),
    ],
)
def test_bad_annotation_fails_what_it_affects(clip: Path, change: dict[str, Any], failed: Any, message: str) -> None:
    result = process_row(make_row("s/sub01/bad", clip, **change), CHEAP, Path("."))
    errors = failures(result)
    assert set(errors) == (set(result.entries) - {"aus"} if failed == "all" else failed)
    assert all(e.startswith("sample s/sub01/bad: ") and message in e for e in errors.values())


def test_truncated_and_garbage_images(clip: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    write_clip(folder)
    data = (folder / "img12.jpg").read_bytes()
    (folder / "img12.jpg").write_bytes(data[: len(data) // 2])
    assert cv2.imread(str(folder / "img12.jpg")) is not None  # OpenCV alone would accept the truncated file
    result = process_row(make_row("s/sub01/trunc", folder), CHEAP, Path("."), ("flow28",))
    assert f"(truncated JPEG): {folder / 'img12.jpg'}" in failures(result)["flow28"]

    (folder / "img12.jpg").write_bytes(b"not an image at all")
    with pytest.raises(SampleError, match="corrupt or unsupported image: .*img12.jpg"):
        read_image(folder / "img12.jpg", "s/sub01/garbage")


def test_no_face_falls_back_to_dataset_landmarks(tmp_path: Path) -> None:
    folder = tmp_path / "blank"
    folder.mkdir()
    for n in range(10, 16):
        cv2.imwrite(str(folder / f"img{n}.jpg"), np.full((180, 180, 3), 128, np.uint8))
    result = process_row(make_row("s/sub01/blank", folder), CHEAP, Path("."))
    assert set(failures(result)) == set(result.entries) - {"aus"}
    assert all(f"no face found in {folder / 'img10.jpg'}" in e for e in failures(result).values())

    grey = cv2.cvtColor(astronaut_face(), cv2.COLOR_BGR2GRAY)
    landmarks = facelib.predict_landmarks(grey, facelib.detect_face(grey, 1))
    truth = tmp_path / "truth.npz"
    np.savez(truth, landmarks=np.stack([landmarks + k for k in range(6)]), frame_numbers=np.arange(10, 16))
    row = make_row("s/sub01/blank", folder, landmarks_path=str(truth))
    out = preprocess_sample(row, CHEAP, Path("."), ("landmarks68",))
    assert out.face == "annotation"
    align = facelib.alignment_from_landmarks(landmarks, CHEAP.margin)
    numbers = sampled_frames(10, 15, CHEAP.seq_frames)  # ground truth is used for every sampled frame
    np.testing.assert_allclose(out.arrays()["landmarks68"], [align.points(landmarks + n - 10, 64) for n in numbers],
                               atol=1e-4)


def test_detector_annotation_uses_saved_landmarks(clip: Path, tmp_path: Path) -> None:
    cfg = CHEAP.model_copy(update={"detector": "annotation"})
    result = process_row(make_row("s/sub01/nolm", clip), cfg, Path("."), ("flow28",))
    assert "detector=annotation" in failures(result)["flow28"]

    grey = cv2.cvtColor(astronaut_face(), cv2.COLOR_BGR2GRAY)
    landmarks = facelib.predict_landmarks(grey, facelib.detect_face(grey, 1)) + 3.0  # not what dlib would find
    truth = tmp_path / "truth.npz"
    np.savez(truth, landmarks=np.repeat(landmarks[None], 6, axis=0), frame_numbers=np.arange(10, 16))
    out = preprocess_sample(make_row("s/sub01/lm", clip, landmarks_path=str(truth)), cfg, Path("."), ("landmarks68",))
    assert out.face == "annotation"
    expected = facelib.alignment_from_landmarks(landmarks, cfg.margin).points(landmarks, 64)
    np.testing.assert_allclose(out.arrays()["landmarks68"][0], expected, atol=1e-4)


def test_composite_points5_without_the_landmarks_file_dlib_else_the_template(composite_dir: Path) -> None:
    """No `points5` in the table (landmarks5_28px.csv absent): dlib on the apex crop where it finds the face, the
    template points of an aligned crop where it does not (sub13's crops); each recorded as estimated, so preprocessing
    counts them. The template sits where dlib puts the points of a crop it reads (within 1.5 px of the 28 px map)."""
    crops = composite_dir / "datasets" / "combined_datasets_whole"
    flow = sorted((composite_dir / "datasets" / "STSNet_whole_norm_u_v_os").glob("*.png"))[0]
    found = make_row("casme2/sub01/EP02_01f", onset=None, apex=None, offset=None, flow_path=str(flow),
                     apex_path=str(crops / "sub01_EP02_01f.jpg"))
    missed = make_row("casme2/sub13/EP09_10", onset=None, apex=None, offset=None, flow_path=str(flow),
                      apex_path=str(crops / "sub13_EP09_10.jpg"))
    cfg = PreprocessConfig()
    dlib_out, template_out = (preprocess_sample(row, cfg, Path("."), ("points5",)) for row in (found, missed))
    assert dlib_out.modalities["points5"].status == "ok" and dlib_out.estimated == "points5=dlib"
    assert template_out.modalities["points5"].status == "ok" and template_out.estimated == "points5=template"
    template = template_out.arrays(["points5"])["points5"]
    np.testing.assert_allclose(template, facelib.template_points5(28))
    assert np.abs(dlib_out.arrays(["points5"])["points5"] - template).max() < 1.5
