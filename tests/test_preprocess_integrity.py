"""Issue 12, preprocessing side (no Ray): data that is wrong but looks valid is refused per modality with a one-line
reason naming the file, missing key frames are estimated the way `mer predict` estimates them, and the composite's
apex crops become `apex224` (issue 11) while a crop the face detector misses costs `points5` only."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from mer.model.config import PreprocessConfig, SynthConfig
from mer.model.data.synthetic import iter_clips
from mer.model.errors import DataError, SampleError
from mer.model.inference import default_key_frames, open_clip
from mer.model.preprocess import face as facelib
from mer.model.preprocess.sample import preprocess_sample
from tests.test_preprocess import CHEAP, astronaut_face, make_row

FRAME_MODALITIES = ("flow28", "points5", "onset224", "apex224", "frames128", "landmarks68", "flows128")


def write_motion_clip(folder: Path, shifts: list[float], first: int = 10) -> None:
    """Frames img<first>.. of the astronaut face, frame k shifted right by shifts[k] px."""
    folder.mkdir(parents=True, exist_ok=True)
    base = astronaut_face()
    for k, dx in enumerate(shifts):
        moved = cv2.warpAffine(base, np.float32([[1, 0, dx], [0, 1, 0]]), base.shape[1::-1],
                               borderMode=cv2.BORDER_REFLECT)
        cv2.imwrite(str(folder / f"img{first + k}.jpg"), moved)


def outcome(out, status: str = "ok") -> set[str]:
    return {m for m, o in out.modalities.items() if o.status == status}


# ------------------------------------------------------------------------------------------ missing key frames


def test_missing_apex_and_offset_are_estimated_like_mer_predict(tmp_path: Path) -> None:
    """A clip whose motion peaks at frame 13: without apex and offset in the sheet, the apex is the frame of largest
    motion from the onset (the rule `mer predict` uses, the same frame it picks), the offset the clip's last frame;
    both are recorded as estimated."""
    folder = tmp_path / "sub01" / "EP01"
    write_motion_clip(folder, [0, 0.5, 1.5, 3.0, 1.5, 0.5])  # frames 10..15
    row = make_row("synthetic/sub01/EP01", folder, apex=None, offset=None, dataset="synthetic")
    out = preprocess_sample(row, CHEAP, Path("."))
    assert outcome(out) == set(out.modalities), {m: o.error for m, o in out.modalities.items()}
    assert out.estimated == "apex=13;offset=15"
    keys = default_key_frames(open_clip(folder, tmp_path), CHEAP)
    assert (keys.onset, keys.apex, keys.offset) == (10, 13, 15)
    annotated = preprocess_sample(make_row("synthetic/sub01/EP01", folder, apex=13, offset=15), CHEAP, Path("."),
                                  ("flow28",))
    np.testing.assert_array_equal(out.arrays(["flow28"])["flow28"], annotated.arrays()["flow28"])
    assert annotated.estimated == ""


def test_recording_without_offset_keeps_what_needs_only_onset_and_apex(tmp_path: Path) -> None:
    """CAS(ME)^3: the folder is a recording of several samples, so its last frame is not this sample's offset; the
    flow map and crops are made, the sequence modalities are refused with the reason."""
    folder = tmp_path / "spNO.1" / "a" / "color"
    write_motion_clip(folder, [0, 0.5, 1.5, 3.0, 1.5, 0.5, 0.2, 0.1])
    row = make_row("casme3/spNO.1/a", folder, apex=13, offset=None, dataset="casme3")
    out = preprocess_sample(row, CHEAP, Path("."))
    assert outcome(out) == {"flow28", "points5", "onset224", "apex224", "aus"} and out.estimated == ""
    failed = {m: o for m, o in out.modalities.items() if o.status == "failed"}
    assert set(failed) == {"frames128", "landmarks68", "flows128"}
    assert {o.reason for o in failed.values()} == {"offset not annotated"}
    assert failed["frames128"].error == ("sample casme3/spNO.1/a: offset not annotated and the recording holds "
                                         "several samples: no sequence")


# ---------------------------------------------------------------------------------- wrong data that looks valid


def test_zero_motion_flow_is_refused_naming_the_frames(tmp_path: Path) -> None:
    """The apex frame a byte copy of the onset (a frozen video, a duplicated file): TV-L1 gives exactly zero, which
    min-max normalisation would turn into a valid-looking map. Only the flow map is refused; the crops are fine."""
    folder = tmp_path / "clip"
    write_motion_clip(folder, [0, 0.5, 1.0, 1.5, 2.0, 2.5])
    (folder / "img12.jpg").write_bytes((folder / "img10.jpg").read_bytes())
    out = preprocess_sample(make_row("s/sub01/frozen", folder), CHEAP, Path("."), FRAME_MODALITIES)
    assert outcome(out, "failed") == {"flow28"}
    flow = out.modalities["flow28"]
    assert flow.reason == "zero motion"
    assert flow.error.startswith(f"sample s/sub01/frozen: no motion: flow onset img10.jpg -> apex img12.jpg in {folder}"
                                 " has mean magnitude 0 px at 64 px")
    with pytest.raises(SampleError, match="apex 10 is the onset frame: zero motion"):
        preprocess_sample(make_row("s/sub01/same", folder, apex=10), CHEAP, Path("."), ("flow28",)).arrays()


def test_frame_size_changing_inside_the_clip_is_refused_naming_the_frame(tmp_path: Path) -> None:
    """Frames of two dataset variants mixed in one clip: every frame-based modality is refused (the jump would be
    motion), naming the first frame of another size, even where only the onset and apex are read."""
    folder = tmp_path / "clip"
    write_motion_clip(folder, [0, 0.3, 0.6, 0.9, 1.2, 1.5])
    for n in (14, 15):
        image = cv2.imread(str(folder / f"img{n}.jpg"))
        cv2.imwrite(str(folder / f"img{n}.jpg"), cv2.resize(image, (150, 160))[:150])
    out = preprocess_sample(make_row("s/sub01/mixed", folder), CHEAP, Path("."))
    assert outcome(out, "failed") == set(FRAME_MODALITIES) and outcome(out) == {"aus"}
    error = out.modalities["flow28"].error
    assert error == (f"sample s/sub01/mixed: frame size changes inside the clip: {folder / 'img14.jpg'} is 150x150, "
                     f"onset frame {folder / 'img10.jpg'} is 180x180")
    assert {o.reason for m, o in out.modalities.items() if m != "aus"} == {"frame size changes"}


def test_non_finite_values_are_refused(tmp_path: Path) -> None:
    """NaN in the dataset's saved landmarks reaches only landmarks68 (and points5): refused there, by name."""
    folder = tmp_path / "clip"
    write_motion_clip(folder, [0, 0.3, 0.6, 0.9, 1.2, 1.5])
    grey = cv2.cvtColor(astronaut_face(), cv2.COLOR_BGR2GRAY)
    landmarks = np.repeat(facelib.predict_landmarks(grey, facelib.detect_face(grey, 1))[None], 6, axis=0)
    landmarks[5, 10] = np.nan  # frame 15 (the offset)
    np.savez(tmp_path / "truth.npz", landmarks=landmarks, frame_numbers=np.arange(10, 16))
    row = make_row("s/sub01/nan", folder, landmarks_path=str(tmp_path / "truth.npz"))
    out = preprocess_sample(row, CHEAP, Path("."), ("flow28", "points5", "landmarks68"))
    assert outcome(out) == {"flow28", "points5"} and out.modalities["landmarks68"].reason == "non-finite values"
    assert out.modalities["landmarks68"].error == "sample s/sub01/nan: landmarks68 has NaN/inf values"


# ----------------------------------------------------------------------------------------------- the composite


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)
    return path


@pytest.mark.parametrize(
    ("image", "reason", "message"),
    [
        (np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), "grey flow map",
         "one channel, not u, v and strain"),
        (np.repeat(np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8), 3, axis=2),
         "grey flow map", "u, v and strain are one identical plane"),
        (np.dstack([np.zeros((28, 28), np.uint8)]  # OpenCV's channel order is BGR: B = strain
                   + [np.random.default_rng(k).integers(0, 256, (28, 28), dtype=np.uint8) for k in range(2)]),
         "zero motion", "channel strain has no variation"),
        (np.dstack([np.random.default_rng(k).integers(0, 256, (28, 28), dtype=np.uint8) for k in range(3)]), "", ""),
    ],
)
def test_degenerate_composite_maps(tmp_path: Path, image: np.ndarray, reason: str, message: str) -> None:
    path = write_png(tmp_path / "datasets" / "m .png", image)
    row = make_row("casme2/sub01/x", onset=None, apex=None, offset=None, flow_path=str(path))
    out = preprocess_sample(row, PreprocessConfig(), Path("."), ("flow28",)).modalities["flow28"]
    if not reason:
        assert out.status == "ok" and out.arrays["flow28"].shape == (3, 28, 28)
        return
    assert (out.status, out.reason) == ("failed", reason)
    assert out.error.startswith("sample casme2/sub01/x: ") and str(path) in out.error and message in out.error


def _synthetic_apex_crops(count: int) -> list[np.ndarray]:
    """BGR apex frames of synthetic clips (the generator's renderer), standing in for the composite's crops."""
    cfg = SynthConfig(subjects=2, clips_per_subject=2, min_frames=10, max_frames=12, image_size=128)
    crops = []
    for clip in iter_clips(cfg):
        apex = int(np.flatnonzero(clip.frame_numbers == clip.apex)[0])
        crops.append(cv2.resize(clip.frames[apex][..., ::-1], (224, 224), interpolation=cv2.INTER_CUBIC))
    return crops[:count]


def test_composite_apex_crops_become_apex224_and_a_missed_face_gets_the_template_points(tmp_path: Path) -> None:
    crop = _synthetic_apex_crops(1)[0]
    flow = write_png(tmp_path / "flow .png",
                     np.dstack([np.random.default_rng(k).integers(0, 256, (28, 28), dtype=np.uint8) for k in range(3)]))
    face = write_png(tmp_path / "crops" / "face.jpg", crop)
    blank = write_png(tmp_path / "crops" / "blank.jpg", np.full((224, 224, 3), 128, np.uint8))
    cfg = PreprocessConfig(face_size=112)
    good = preprocess_sample(make_row("casme2/sub01/a", onset=None, apex=None, offset=None, flow_path=str(flow),
                                      apex_path=str(face)), cfg, Path("."), ("flow28", "points5", "apex224"))
    assert outcome(good) == {"flow28", "points5", "apex224"}
    apex224 = good.arrays()["apex224"]
    assert apex224.shape == (112, 112, 3) and apex224.dtype == np.uint8
    stored = cv2.imread(str(face))
    expected = cv2.cvtColor(cv2.resize(stored, (112, 112), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(apex224, expected)  # the crop as distributed, RGB, at face_size

    missed = preprocess_sample(make_row("casme2/sub01/b", onset=None, apex=None, offset=None, flow_path=str(flow),
                                        apex_path=str(blank)), cfg, Path("."), ("flow28", "points5", "apex224"))
    # No face found on the crop: the template points of an aligned crop, said as estimated (counted by the stage).
    assert outcome(missed) == {"flow28", "points5", "apex224"} and missed.estimated == "points5=template"
    np.testing.assert_array_equal(missed.arrays()["points5"], facelib.template_points5(cfg.flow.map_size))
    assert good.estimated == "points5=dlib"


# ------------------------------------------------------------------ a tiny composite through cache and store


def _cache_composite(root: Path, cache_dir: Path, modalities: tuple[str, ...]):
    """ingest-like load of a composite, then the library's own cache writer (the stage's loop without Ray)."""
    from mer.model.data import apply_class_set, load_annotations
    from mer.model.preprocess.cache import Cache, process_row

    table, _ = apply_class_set(load_annotations("megc2019", root), "megc2019_3")
    cfg = PreprocessConfig()
    cache = Cache(cache_dir)
    todo = cache.plan(table, cfg, modalities)
    for row in table.to_dict("records"):
        cache.write(process_row(row, cfg, root, todo[row["sample_id"]]))
    return cache.finish(table, cfg, modalities, {"class_names": ["negative", "positive", "surprise"]})


def test_fpf_runs_on_the_composites_apex_crops(tmp_path: Path) -> None:
    """Issue 11: with `datasets/combined_datasets_whole/<imagename>` present, preprocessing makes `apex224` from the
    crops and CVA+FPF with `position: fpf, position_frames: [apex224]` trains on them; a composite without crops or
    landmarks still feeds a flow model completely, and HTNet (points5) is told why it cannot use it."""
    import torch

    from mer.model.models import create_model
    from mer.model.preprocess.modalities import model_modalities
    from mer.model.training.data import SampleStore
    from test_data_integrity import COMPOSITE_ROWS, write_composite

    root = write_composite(tmp_path / "composite")
    for (_, _, _, _, image), crop in zip(COMPOSITE_ROWS, _synthetic_apex_crops(len(COMPOSITE_ROWS))):
        write_png(root / "datasets" / "combined_datasets_whole" / image, crop)
    fpf = {"position": "fpf", "position_frames": ("apex224",)}
    keys = model_modalities("cva_fpf", "flow_small", **fpf)
    assert keys == ("flow28", "apex224", "aus")
    manifest = _cache_composite(root, tmp_path / "cache", keys)
    assert manifest["counts"]["ok"] == 4 and manifest["counts"]["face"] == {"composite": 4}
    store = SampleStore.open(tmp_path / "cache", keys=keys)
    ids = store.sample_ids(store.subjects())
    stored = cv2.imread(str(root / "datasets" / "combined_datasets_whole" / COMPOSITE_ROWS[0][4]))
    np.testing.assert_array_equal(store.arrays(ids[0], ("apex224",))["apex224"],
                                  cv2.cvtColor(stored, cv2.COLOR_BGR2RGB))
    model = create_model("cva_fpf", "flow_small", num_classes=3, **fpf)
    assert set(model.inputs) == {"flow28", "apex224"}
    dataset = store.torch_dataset(ids, model.inputs, augment=False, seed=0, optional=("aus",))
    batch = {k: torch.stack([dataset[i][k] for i in range(len(ids))]) for k in dataset[0]}
    outputs = model(batch)
    loss, parts = model.loss(outputs, batch)
    assert outputs["logits"].shape == (4, 3) and torch.isfinite(loss) and "loss" in parts

    bare = write_composite(tmp_path / "bare")  # no crops, no landmarks5_28px.csv
    manifest = _cache_composite(bare, tmp_path / "bare-cache", ("flow28", "points5"))
    assert manifest["counts"]["modalities"]["flow28"]["ok"] == 4
    assert manifest["counts"]["modalities"]["points5"]["unavailable"] == 4
    assert len(SampleStore.open(tmp_path / "bare-cache", keys=model_modalities("ststnet", "paper")).index) == 4
    assert {f["error"] for f in manifest["failures"]} == {
        f"sample {sid}: composite row has neither points5 nor an apex crop"
        for sid in ("casme2/sub01/EP02_01f", "casme2/sub02/EP03_02", "samm/006/006_1_2", "smic/s01/s01_ne_01")}
    with pytest.raises(DataError, match="no sample with every modality of flow28\\+points5"):
        SampleStore.open(tmp_path / "bare-cache", keys=model_modalities("htnet", "small"))


# ------------------------------------------------------------------------------- how frames decode (issue 30)


def _save_with_orientation(image_bgr: np.ndarray, path: Path, orientation: int) -> None:
    """A JPEG written by Pillow carrying an EXIF orientation tag (what cameras and photo tools write)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(image_bgr[..., ::-1]).save(path, exif=exif, quality=100)


def _flow_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a[:2].ravel(), b[:2].ravel())[0, 1])


def test_frames_that_decode_differently_are_refused_and_a_consistent_clip_is_decoded_alike(tmp_path: Path) -> None:
    """Before: one frame carrying an EXIF orientation tag was rotated by the decoder and its flow was computed
    against the others as if it were motion (correlation with the true flow 0.06). A clip whose frames disagree
    (orientation, bit depth) is now refused naming the first frame that differs; a clip whose frames all carry the
    same tag is decoded the same way for every frame (orientation applied), giving the untagged clip's flow."""
    shifts = [0, 0.5, 1.0, 1.5, 2.0, 2.5]
    mixed = tmp_path / "mixed"
    write_motion_clip(mixed, shifts)
    _save_with_orientation(cv2.imread(str(mixed / "img12.jpg")), mixed / "img12.jpg", 6)  # the apex only
    out = preprocess_sample(make_row("s/sub01/mixed", mixed), CHEAP, Path("."), FRAME_MODALITIES)
    assert outcome(out, "failed") == set(FRAME_MODALITIES)
    assert out.modalities["flow28"].reason == "frame decoding differs"
    assert out.modalities["flow28"].error == (
        f"sample s/sub01/mixed: frames decode differently inside the clip: {mixed / 'img12.jpg'} has EXIF "
        f"orientation 6, onset frame {mixed / 'img10.jpg'} has 1 (1 = as stored)")

    # Every frame stored a quarter turn counter-clockwise and tagged to be turned back (6 = rotate 90 degrees
    # clockwise), against the same frames stored upright (tag 1), both written by Pillow.
    upright, tagged = tmp_path / "upright", tmp_path / "tagged"
    write_motion_clip(tagged, [0, 1, 2, 3, 4, 5])
    upright.mkdir()
    for frame in sorted(tagged.glob("*.jpg")):
        image = cv2.imread(str(frame))
        _save_with_orientation(image, upright / frame.name, 1)
        _save_with_orientation(np.ascontiguousarray(np.rot90(image)), frame, 6)
    flows = [preprocess_sample(make_row(f"s/sub01/{d.name}", d), CHEAP, Path("."), ("flow28",)).arrays()["flow28"]
             for d in (upright, tagged)]
    assert _flow_correlation(*flows) > 0.9


def test_twelve_bit_values_in_sixteen_bit_pngs_are_scaled_to_their_range(tmp_path: Path) -> None:
    """Before: 16-bit PNG frames holding 12-bit values (0..4095) were shifted down by 8 bits to 0..15, near black,
    and their flow correlated with the true one at 0.18-0.85. One scale for the whole clip now maps the clip's bit
    range to 0..255, so the flow is the 8-bit clip's; an 8-bit frame among them is refused."""
    shifts = [0, 0.5, 1.0, 1.5, 2.0, 2.5]
    eight, deep = tmp_path / "eight", tmp_path / "deep"
    write_motion_clip(eight, shifts)
    deep.mkdir()
    for frame in sorted(eight.glob("*.jpg")):
        image = cv2.imread(str(frame))
        cv2.imwrite(str(eight / f"{frame.stem}.png"), image)
        cv2.imwrite(str(deep / f"{frame.stem}.png"), np.rint(image.astype(np.float64) * 4095 / 255).astype(np.uint16))
    row = {"frame_template": "img{}.png"}
    reference = preprocess_sample(make_row("s/sub01/eight", eight, **row), CHEAP, Path("."), ("flow28",))
    got = preprocess_sample(make_row("s/sub01/deep", deep, **row), CHEAP, Path("."), ("flow28",))
    np.testing.assert_allclose(got.arrays()["flow28"], reference.arrays()["flow28"], atol=0.02)

    cv2.imwrite(str(deep / "img13.png"), cv2.imread(str(eight / "img13.png")))  # one 8-bit frame among them
    out = preprocess_sample(make_row("s/sub01/deep", deep, **row), CHEAP, Path("."), ("flow28",))
    assert out.modalities["flow28"].error == (
        f"sample s/sub01/deep: frames decode differently inside the clip: {deep / 'img13.png'} is 8-bit, onset "
        f"frame {deep / 'img10.png'} is 16-bit")
