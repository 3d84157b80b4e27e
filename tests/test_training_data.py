"""SampleStore, batch conversion, and augmentation applied identically to all images of a sample.

`write_cache` writes a small preprocessed cache in the documented format (docs/architecture.md) for these tests and
the trainer tests.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mer.model.errors import ConfigError, DataError
from mer.model.training import augment
from mer.model.training.data import SampleStore

CLASSES = ["negative", "positive", "surprise"]
N_AUS = 21


def signal_flow28(label: int, rng: np.random.Generator) -> np.ndarray:
    """A flow28 map in [0, 1] whose u channel has a bright 8x8 block at a class-specific place: trivially separable."""
    flow = (0.5 + 0.05 * rng.standard_normal((3, 28, 28))).astype(np.float32)
    r, c = [(4, 4), (4, 16), (16, 10)][label]
    flow[0, r:r + 8, c:c + 8] = 0.95
    return np.clip(flow, 0, 1)


IMAGE_MODALITIES = ("onset224", "apex224", "frames128", "landmarks68", "flows128")


def write_cache(root: Path, subjects: int = 4, per_subject: int = 6, seed: int = 0, images: bool = False,
                failed: int = 0, uncoded: tuple[int, ...] = (), silent: tuple[int, ...] = (),
                one_class: tuple[int, ...] = ()) -> Path:
    """A cache of `subjects` x `per_subject` samples (labels cycle over 3 classes) with flow28, points5, aus, and
    optionally onset224/apex224/frames128/flows128/landmarks68 (small random content), written through the
    library's own cache writer; `failed` samples of subject `bad` failed every modality; subjects in `uncoded`
    have no AU coding (`au_coded` 0), subjects in `silent` are coded but show no AU (all-zero vectors), subjects in
    `one_class` have every sample in class 0."""
    from mer.model.config import PreprocessConfig
    from mer.model.data.schema import make_table
    from mer.model.preprocess.cache import Cache, EntryResult, SampleResult, encode_npz, failed_result

    rng = np.random.default_rng(seed)
    modalities = ("flow28", "points5", "aus") + (IMAGE_MODALITIES if images else ())
    records, results = [], []
    for s in range(subjects):
        for k in range(per_subject):
            label = 0 if s in one_class else (k + s) % 3
            arrays = {
                "flow28": signal_flow28(label, rng),
                "points5": np.array([[9, 10], [19, 10], [14, 15], [10, 20], [18, 20]], dtype=np.float32),
                "aus": (rng.random(N_AUS) < 0.2).astype(np.uint8) * (s not in silent),
            }
            if images:
                arrays["onset224"] = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
                arrays["apex224"] = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
                arrays["frames128"] = rng.integers(0, 255, (4, 128, 128), dtype=np.uint8)
                arrays["flows128"] = rng.standard_normal((3, 2, 128, 128)).astype(np.float16)
                arrays["landmarks68"] = (30 + 60 * rng.random((4, 68, 2))).astype(np.float32)
            companions = {"aus": {"au_coded": np.array(s not in uncoded, dtype=np.uint8)}}
            records.append({"dataset": "synthetic", "collection": "synthetic", "subject": f"synthetic/s{s:02d}",
                            "clip": f"clip{k}", "label": label, "emotion": CLASSES[label], "au_coded": True,
                            "source_file": "sheet.xlsx", "source_row": len(records) + 2})
            entries = {m: EntryResult("ok", data=encode_npz({m: arrays[m], **companions.get(m, {})}))
                       for m in modalities}
            results.append(SampleResult(f"synthetic/s{s:02d}/clip{k}", entries, face="annotation"))
    for f in range(failed):
        records.append({"dataset": "synthetic", "collection": "synthetic", "subject": "synthetic/bad",
                        "clip": f"clip{f}", "label": 0, "emotion": CLASSES[0], "source_file": "sheet.xlsx",
                        "source_row": len(records) + 2})
        results.append(failed_result(f"synthetic/bad/clip{f}", modalities, f"sample synthetic/bad/clip{f}: no face",
                                     "no face"))
    table = make_table(records)
    cfg = PreprocessConfig()
    cache = Cache(root)
    cache.plan(table, cfg, modalities)
    for result in results:
        cache.write(result)
    cache.finish(table, cfg, modalities, {"class_names": CLASSES})
    return root


@pytest.fixture()
def image_cache(tmp_path: Path) -> Path:
    return write_cache(tmp_path / "cache", subjects=2, per_subject=2, images=True, failed=1)


def test_store_reads_ok_rows_and_class_names(image_cache: Path) -> None:
    store = SampleStore.open(image_cache)
    assert store.class_names == CLASSES and store.num_classes == 3
    assert store.subjects() == ["synthetic/s00", "synthetic/s01"]  # the failed subject is gone
    assert len(store.index) == 4
    assert store.sample_ids(["synthetic/s01"]) == ["synthetic/s01/clip0", "synthetic/s01/clip1"]


def test_batch_conversion(image_cache: Path) -> None:
    store = SampleStore.open(image_cache)
    ids = store.sample_ids(store.subjects())
    keys = ("onset224", "apex224", "frames128", "flows128", "landmarks68", "flow28", "points5")
    ds = store.torch_dataset(ids, keys, augment=False, seed=0, optional=("aus", "not_there"))
    item = ds[1]
    raw = np.load(store.entry_path(ids[1], "onset224"))
    assert item["onset224"].shape == (3, 224, 224) and item["onset224"].dtype == torch.float32
    assert torch.allclose(item["onset224"], torch.from_numpy(raw["onset224"]).permute(2, 0, 1).float() / 255)
    assert item["frames128"].shape == (4, 128, 128) and float(item["frames128"].max()) <= 1.0
    assert item["flows128"].dtype == torch.float32 and item["aus"].shape == (N_AUS,)
    assert item["label"].dtype == torch.long and int(item["label"]) == store.labels(ids)[1]
    assert "not_there" not in item


def test_store_pickles_without_its_array_cache(image_cache: Path) -> None:
    store = SampleStore.open(image_cache)
    sid = store.sample_ids(store.subjects())[0]
    before = store.arrays(sid, ("flow28",))["flow28"]
    copy = pickle.loads(pickle.dumps(store))
    assert not copy._cache
    assert np.array_equal(copy.arrays(sid, ("flow28",))["flow28"], before)


def test_missing_input_is_a_one_line_error(tmp_path: Path) -> None:
    store = SampleStore.open(write_cache(tmp_path / "c", subjects=2, per_subject=1))
    with pytest.raises(DataError) as err:
        store.torch_dataset(store.sample_ids(store.subjects()), ("flow28", "onset224"), augment=False, seed=0)
    message = str(err.value)
    assert "\n" not in message and "onset224" in message and "synthetic/s00/clip0" in message


def test_aus_mask_follows_au_coding(tmp_path: Path) -> None:
    """`aus_mask` (B,) comes with `aus`: 0 for a dataset without AU coding, 1 for coded."""
    from torch.utils.data import DataLoader

    store = SampleStore.open(write_cache(tmp_path / "c", subjects=3, per_subject=2, uncoded=(1,)))
    ids = store.sample_ids(store.subjects())
    ds = store.torch_dataset(ids, ("flow28",), augment=True, seed=0, optional=("aus",))
    batch = next(iter(DataLoader(ds, batch_size=len(ids))))
    assert batch["aus_mask"].dtype == torch.float32 and batch["aus_mask"].tolist() == [1, 1, 0, 0, 1, 1]
    assert "aus_mask" not in store.torch_dataset(ids, ("flow28",), augment=False, seed=0)[0]  # no aus, no mask


def test_store_selects_the_samples_that_have_what_the_model_reads(tmp_path: Path) -> None:
    """Two samples lack apex224 and one lacks points5 (e.g. a crop the face detector missed): a flow28 model keeps
    every sample, an FPF model loses the two, HTNet (flow28 + points5) the one; `coverage` says how many of the
    collection's samples each uses (the failed sample counts in the total)."""
    root = write_cache(tmp_path / "c", subjects=2, per_subject=3, images=True, failed=1)
    entries = pd.read_csv(root / "modalities.csv", dtype=str, keep_default_na=False)
    lost = {("synthetic/s00/clip0", "apex224"), ("synthetic/s01/clip2", "apex224"), ("synthetic/s00/clip1", "points5")}
    for i, row in entries.iterrows():
        if (row["sample_id"], row["modality"]) in lost:
            entries.loc[i, ["status", "reason", "file", "bytes", "sha256"]] = ["failed", "no face", "", "", ""]
    entries.to_csv(root / "modalities.csv", index=False)
    index = pd.read_csv(root / "index.csv", dtype=str, keep_default_na=False)
    for sid, modality in lost:
        row = index["sample_id"] == sid
        index.loc[row, "modalities"] = index.loc[row, "modalities"].str.replace(f"+{modality}", "")
    index.to_csv(root / "index.csv", index=False)

    assert len(SampleStore.open(root, keys=("flow28",)).index) == 6
    fpf = SampleStore.open(root, keys=("flow28", "apex224"))
    assert fpf.sample_ids(fpf.subjects()) == [f"synthetic/s0{s}/clip{k}" for s, k in ((0, 1), (0, 2), (1, 0), (1, 1))]
    assert fpf.coverage() == {"usable": 4, "total": 7, "per_dataset": {"synthetic": {"usable": 4, "total": 7}}}
    htnet = SampleStore.open(root, keys=("flow28", "points5"))
    assert "synthetic/s00/clip1" not in htnet.sample_ids(htnet.subjects()) and len(htnet.index) == 5
    assert htnet.keys("synthetic/s00/clip0") >= {"flow28", "points5", "onset224"}
    with pytest.raises(ConfigError, match="SampleStore keys: unknown cache array 'flow27'"):
        SampleStore.open(root, keys=("flow27",))


def test_corrupt_or_non_finite_entry_is_named_not_trained_on(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "c", subjects=2, per_subject=1)
    store = SampleStore.open(root)
    sid = "synthetic/s00/clip0"
    path = store.entry_path(sid, "flow28")
    path.write_bytes(path.read_bytes()[:-10])  # truncated after it was written
    with pytest.raises(DataError, match=rf"^{path}: sample {sid}: cache entry changed since it was written"):
        store.arrays(sid, ("flow28",))

    nan = np.full((3, 28, 28), np.nan, np.float32)
    from mer.model.io import digest
    from mer.model.preprocess.cache import encode_npz

    data = encode_npz({"flow28": nan})  # a NaN array recorded as if it were valid: still refused on load
    path.write_bytes(data)
    entries = pd.read_csv(root / "modalities.csv", dtype=str, keep_default_na=False)
    row = (entries["sample_id"] == sid) & (entries["modality"] == "flow28")
    entries.loc[row, ["bytes", "sha256"]] = [str(len(data)), digest(data)]
    entries.to_csv(root / "modalities.csv", index=False)
    with pytest.raises(DataError, match=rf"sample {sid}: 'flow28' has NaN/inf values"):
        SampleStore.open(root).arrays(sid, ("flow28",))

    (root / "manifest.json").write_text('{"class_names": ["a", ')
    with pytest.raises(DataError, match=r"manifest.json: preprocessing manifest is not valid JSON"):
        SampleStore.open(root)


def test_label_outside_class_set_is_rejected(tmp_path: Path) -> None:
    root = write_cache(tmp_path / "c", subjects=2, per_subject=3)
    with pytest.raises(DataError, match="label 2 outside the 2 classes"):
        SampleStore.open(root, class_names=["a", "b"])


def _marked_sample() -> dict[str, np.ndarray]:
    """One bright square at the same relative place in every image; flow u is a constant +1 px (rightwards)."""
    onset = np.zeros((224, 224, 3), np.uint8)
    onset[40:80, 40:80] = 255
    frames = np.zeros((4, 128, 128), np.uint8)
    frames[:, 23:46, 23:46] = 255
    flows = np.zeros((3, 2, 128, 128), np.float16)
    flows[:, 0] = 1.0
    flow28 = np.full((3, 28, 28), 0.5, np.float32)
    flow28[:, 5:10, 5:10] = 1.0
    landmarks = np.tile(np.array([[30.0, 30.0]], np.float32), (4, 68, 1))
    landmarks[:, 36:42] = [30.0, 40.0]  # image-left eye
    landmarks[:, 42:48] = [90.0, 40.0]  # image-right eye
    return {"onset224": onset, "apex224": onset.copy(), "frames128": frames, "flows128": flows, "flow28": flow28,
            "landmarks68": landmarks, "points5": np.array([[7, 7]] * 5, np.float32), "aus": np.ones(N_AUS, np.uint8)}


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask > mask.max() / 2)
    return (np.array([xs.mean(), ys.mean()]) + 0.5) / mask.shape[-1]  # pixel centres


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_is_identical_across_images_of_a_sample(seed: int) -> None:
    sample = _marked_sample()
    aug = augment.Augmentation.draw(np.random.default_rng(seed))
    out = augment.apply(sample, aug)
    assert np.array_equal(out["onset224"], out["apex224"])
    for f in range(1, 4):
        assert np.array_equal(out["frames128"][0], out["frames128"][f])
    # The same geometric change at every resolution: relative positions of the square agree to about a pixel.
    ref = _centroid(out["onset224"][..., 0])
    assert np.allclose(_centroid(out["frames128"][0]), ref, atol=2 / 128)
    assert np.allclose(_centroid(out["flow28"][2]), ref, atol=1.5 / 28)
    # Flow vectors: a flip reverses u, the small rotation barely changes it.
    u = float(np.median(out["flows128"][:, 0].astype(np.float32)[:, 40:90, 40:90]))
    assert u == pytest.approx(-1.0 if aug.flip else 1.0, abs=0.01)
    # Landmarks: index 36-41 stays the image-left eye after a flip.
    lm = out["landmarks68"][0]
    assert lm[36:42, 0].mean() < lm[42:48, 0].mean()
    assert np.array_equal(out["aus"], sample["aus"])


def test_flip_maps_points_like_pixels() -> None:
    img = np.zeros((28, 28), np.float32)
    img[5, 3] = 1.0
    flow = np.stack([img, img, img])
    aug = augment.Augmentation(flip=True, angle=0.0, shift_x=0.0, shift_y=0.0)
    out = augment.apply({"flow28": flow, "points5": np.array([[3, 5], [20, 5], [14, 14], [3, 20], [20, 20]],
                                                             np.float32)}, aug)
    y, x = np.unravel_index(np.argmax(out["flow28"][2]), (28, 28))
    assert (x, y) == (24, 5)
    # Point order after the flip: the old right eye (20 -> 7) is now the image-left eye.
    assert out["points5"][0].tolist() == [7.0, 5.0] and out["points5"][1].tolist() == [24.0, 5.0]
    assert np.allclose(out["flow28"][0], 1.0 - np.fliplr(flow[0]))


def test_mirror_batch_is_the_flip_of_apply_batch() -> None:
    """The test-time mirror (pure indexing) equals the batched augmentation drawn as a flip without rotation or shift,
    for every geometric kind, and mirroring twice gives the batch back."""
    g = torch.Generator().manual_seed(0)
    batch = {
        "flow28": torch.rand(2, 3, 28, 28, generator=g),
        "points5": torch.rand(2, 5, 2, generator=g) * 27,
        "apex224": torch.rand(2, 3, 224, 224, generator=g),
        "frames128": torch.rand(2, 4, 128, 128, generator=g),
        "flows128": torch.randn(2, 3, 2, 128, 128, generator=g),
        "landmarks68": torch.rand(2, 4, 68, 2, generator=g) * 127,
        "aus": (torch.rand(2, N_AUS, generator=g) > 0.5).float(),
        "label": torch.tensor([0, 2]),
    }
    mirrored = augment.mirror_batch(batch)
    flipped = augment.apply_batch(batch, np.tile([[1.0, 0.0, 0.0, 0.0]], (2, 1)))
    assert set(mirrored) == set(batch)
    for key in batch:
        torch.testing.assert_close(mirrored[key], flipped[key], atol=1e-4, rtol=0, msg=key)
    for key, value in augment.mirror_batch(mirrored).items():
        torch.testing.assert_close(value, batch[key], atol=1e-5, rtol=0, msg=key)
    assert torch.equal(mirrored["aus"], batch["aus"]) and torch.equal(mirrored["label"], batch["label"])


def test_dataset_augmentation_is_seeded_per_epoch(image_cache: Path) -> None:
    store = SampleStore.open(image_cache)
    ids = store.sample_ids(store.subjects())
    a = store.torch_dataset(ids, ("onset224",), augment=True, seed=3)
    b = store.torch_dataset(ids, ("onset224",), augment=True, seed=3)
    assert torch.equal(a[0]["onset224"], b[0]["onset224"])
    views = set()
    for epoch in range(4):
        a.set_epoch(epoch)
        views.add(a[0]["onset224"].numpy().tobytes())
    assert len(views) > 1


def test_device_arrays_serve_the_reference_batches(tmp_path: Path) -> None:
    """Device-resident data (DeviceArrays + augment.apply_batch) against the CPU reference path (SampleDataset items,
    OpenCV warps, collated): the same draws give the same arrays, every geometric kind included. Without
    augmentation they are equal; with it, within interpolation tolerance: the reference warps uint8 pixels (rounded
    to 1/255) and float16 flows (OpenCV's bilinear weights sit on a 1/32-pixel grid, which on this random
    unit-variance flow field moves single values by up to ~0.12 while the mean difference stays at fp16 rounding);
    points and landmarks are the same matrix products."""
    from torch.utils.data import default_collate

    from mer.model.training.data import DeviceArrays

    store = SampleStore.open(write_cache(tmp_path / "cache", subjects=2, per_subject=2, images=True))
    ids = store.sample_ids(store.subjects())
    keys = ("onset224", "apex224", "frames128", "flows128", "landmarks68", "flow28", "points5")
    positions = np.array([3, 0, 2])
    for augment_on in (False, True):
        dataset = store.torch_dataset(ids, keys, augment=augment_on, seed=5, optional=("aus",))
        device = DeviceArrays(store, ids, dataset.keys, torch.device("cpu"))
        for epoch in (1, 2)[:1 + augment_on]:  # two draws of the augmentation
            dataset.set_epoch(epoch)
            want = default_collate([dataset[int(i)] for i in positions])
            got = {k: v[0] for k, v in device.group_batch([dataset], positions[None], dataset.keys).items()}
            assert set(got) == set(want)
            for key, value in want.items():
                assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
                if not augment_on or key in ("label", "index", "aus", "aus_mask"):
                    assert torch.equal(got[key], value), key
                elif key == "flows128":
                    diff = (got[key] - value).abs()
                    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.25
                else:  # pixels in [0, 1]; flow28 in [0, 1]; points in pixels
                    torch.testing.assert_close(got[key], value, atol=2.5 / 255, rtol=0, msg=key)
    assert DeviceArrays.nbytes(store, ids, ("flow28",)) == len(ids) * 3 * 28 * 28 * 4


def test_vectorised_matrices_are_the_augmentation_matrices() -> None:
    """The batched path's draw table and matrices are exactly `Augmentation.draw` / `.matrix` of each position."""
    table = augment.DrawTable()
    positions = np.array([5, 0, 17, 5, 3])
    params = table.params(3, 2, positions)
    for size in ((28, 28), (224, 224), (128, 96)):
        batch = augment.matrices(params, *size)
        for row, i in zip(batch, positions, strict=True):
            aug = augment.Augmentation.draw(np.random.default_rng((3, 2, int(i))))
            assert np.allclose(row, aug.matrix(*size), atol=1e-12)
    assert np.array_equal(table.params(3, 2, positions[:2]), params[:2])
