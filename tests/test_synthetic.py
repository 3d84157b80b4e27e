"""The synthetic dataset: CASME II layout, determinism, AU-driven local motion, ground truth, learnability."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mer.components.synth import synthesize
from mer.model.config import SynthConfig
from mer.model.data import synthetic as synth
from mer.model.errors import ConfigError

SMALL = dict(subjects=3, clips_per_subject=3, image_size=128, min_frames=10, max_frames=14)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(SynthConfig(out=str(tmp_path_factory.mktemp("synth")), **SMALL))


@pytest.fixture(scope="module")
def sheet(dataset: Path) -> pd.DataFrame:
    return pd.read_excel(dataset / synth.SHEET_NAME, dtype=object)


def test_sheet_has_the_casme2_columns_and_cell_types(sheet: pd.DataFrame) -> None:
    assert tuple(sheet.columns) == synth.SHEET_COLUMNS
    assert len(sheet) == 9
    assert list(sheet["Subject"].unique()) == ["01", "02", "03"]  # text cells, like the real sheet
    assert all(isinstance(v, int) for col in ("OnsetFrame", "ApexFrame", "OffsetFrame") for v in sheet[col])
    assert (sheet["OnsetFrame"] > 1).all()  # numbering does not start at 1, like CASME II
    assert ((sheet["OnsetFrame"] < sheet["ApexFrame"]) & (sheet["ApexFrame"] < sheet["OffsetFrame"])).all()
    lengths = sheet["OffsetFrame"] - sheet["OnsetFrame"] + 1
    assert lengths.between(SMALL["min_frames"], SMALL["max_frames"]).all()
    for au in sheet["Action Units"]:  # a single bilateral AU is a number cell, combinations are text
        assert isinstance(au, int) if str(au).isdigit() else isinstance(au, str)
    assert set(sheet["Estimated Emotion"]) <= set(synth.EMOTIONS)


def test_frames_and_ground_truth_follow_the_layout(dataset: Path, sheet: pd.DataFrame) -> None:
    size = SMALL["image_size"]
    for row in sheet.itertuples(index=False):
        subject, clip, onset, apex, offset = row[:5]
        clip_dir = dataset / f"sub{subject}" / clip
        expected = {synth.FRAME_TEMPLATE.format(n) for n in range(onset, offset + 1)}
        assert {p.name for p in clip_dir.iterdir()} == expected
        frame = cv2.imread(str(clip_dir / synth.FRAME_TEMPLATE.format(apex)))
        assert frame.shape == (size, size, 3)
        truth = np.load(dataset / "groundtruth" / f"sub{subject}" / f"{clip}.npz")
        n = offset - onset + 1
        assert truth["landmarks"].dtype == np.float32 and truth["landmarks"].shape == (n, 68, 2)
        assert truth["flow"].dtype == np.float16 and truth["flow"].shape == (n - 1, size, size, 2)
        assert list(truth["frame_numbers"]) == list(range(onset, offset + 1))
        assert ((truth["landmarks"] > 0) & (truth["landmarks"] < size)).all()


def test_emotions_are_derived_from_the_aus(sheet: pd.DataFrame) -> None:
    for emotion, codings in synth.EMOTION_CODINGS.items():
        assert all(synth.emotion_from_aus(c) == emotion for c in codings), emotion
    for au, emotion in zip(sheet["Action Units"], sheet["Estimated Emotion"]):
        assert synth.emotion_from_aus(str(au)) == emotion
    assert synth.emotion_from_aus("4+7") == "disgust" and synth.emotion_from_aus("4") == "others"


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = synthesize(SynthConfig(out=str(tmp_path / "again"), **SMALL))
    assert _digest(again) == _digest(dataset)
    other = synthesize(SynthConfig(out=str(tmp_path / "other"), seed=1, **SMALL))
    a, b = _digest(dataset), _digest(other)
    assert a[synth.SHEET_NAME] != b[synth.SHEET_NAME]
    assert a.keys() != b.keys() or all(a[k] != b[k] for k in a if k.endswith(".npz"))


def test_rerun_is_skipped_and_a_new_config_replaces_the_old_output(tmp_path: Path) -> None:
    cfg = SynthConfig(out=str(tmp_path), **SMALL)
    synthesize(cfg)
    (tmp_path / "unrelated.txt").write_text("kept")
    stamp = (tmp_path / synth.SHEET_NAME).stat().st_mtime_ns
    synthesize(cfg)
    assert (tmp_path / synth.SHEET_NAME).stat().st_mtime_ns == stamp  # up to date: nothing rewritten
    synthesize(cfg.model_copy(update={"subjects": 2}))
    assert not (tmp_path / "sub03").exists() and not (tmp_path / "groundtruth" / "sub03").exists()
    assert (tmp_path / "unrelated.txt").read_text() == "kept"
    assert len(pd.read_excel(tmp_path / synth.SHEET_NAME)) == 6


def test_min_frames_above_max_frames_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="synth.min_frames"):
        synthesize(SynthConfig(out=str(tmp_path), **(SMALL | {"min_frames": 20, "max_frames": 15})))


def _without_head_motion(moving: np.ndarray, still: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Landmark motion left after the best similarity transform of the landmarks the AU does not drive."""
    matrix, _ = cv2.estimateAffinePartial2D(still[fixed], moving[fixed], method=cv2.LMEDS)
    return moving - cv2.transform(still[None], matrix)[0]


def test_motion_is_small_local_and_matches_the_flow() -> None:
    cfg = SynthConfig(**(SMALL | {"image_size": 256}))
    for clip in itertools.islice(synth.iter_clips(cfg), 6):
        driven = np.zeros(68, bool)
        for side, au in synth.parse_coding(clip.coding):
            driven |= np.abs(synth.au_pattern(au, side)).sum(1) > 0
        k = clip.apex - clip.onset
        residual = np.linalg.norm(_without_head_motion(clip.landmarks[k], clip.landmarks[0], ~driven), axis=1)
        assert residual.max() < 4.5, clip.coding  # a few pixels at most
        assert residual[driven].max() > 0.6, clip.coding  # but visible (sub-pixel for the subtlest AUs)
        assert residual[~driven].mean() < 0.25 * residual[driven].mean(), clip.coding  # local to the AU
        flow = clip.flow.astype(np.float32)
        assert np.abs(flow).max() < 2.0
        for t in range(len(flow)):  # ground-truth flow carries the ground-truth landmarks to the next frame
            points = clip.landmarks[t][None]  # (1, 68, 2) as a cv2 map
            at_landmarks = cv2.remap(flow[t], points, None, cv2.INTER_LINEAR)[0]
            np.testing.assert_allclose(at_landmarks, clip.landmarks[t + 1] - clip.landmarks[t], atol=0.05)


def test_unilateral_aus_move_one_side() -> None:
    right, left = synth.au_pattern(12, "R"), synth.au_pattern(12, "L")
    assert np.abs(right[48]).sum() > 0 and np.abs(right[54]).sum() == 0  # R = subject's right = image left
    np.testing.assert_allclose(left[synth.MIRROR] * (-1, 1), right)


def test_apex_alone_is_ambiguous_but_onset_to_apex_motion_is_learnable() -> None:
    """Subject-wise CV of a linear classifier: apex pixels stay near chance, apex-minus-onset pixels do not."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import f1_score
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = SynthConfig(subjects=8, clips_per_subject=20, image_size=128, min_frames=10, max_frames=10)

    def grey(frame: np.ndarray) -> np.ndarray:
        small = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
        return small.astype(np.float32).ravel()

    apex, motion, labels, groups = [], [], [], []
    for clip in synth.iter_clips(cfg):
        a, o = grey(clip.frames[clip.apex - clip.onset]), grey(clip.frames[0])
        apex.append(a)
        motion.append(a - o)
        labels.append(synth.EMOTIONS.index(clip.emotion))
        groups.append(clip.subject)
    scores = {}
    for name, features in (("apex", apex), ("motion", motion)):
        model = make_pipeline(StandardScaler(), RidgeClassifier(alpha=100.0))
        predicted = cross_val_predict(model, np.array(features), labels, groups=groups, cv=LeaveOneGroupOut())
        scores[name] = f1_score(labels, predicted, average="macro")
    assert scores["apex"] < 0.3 and scores["motion"] > scores["apex"] + 0.15, scores


def test_the_casme2_loader_reads_the_layout(dataset: Path) -> None:
    from mer.model.data import load_annotations

    table = load_annotations("synthetic", dataset)
    assert len(table) == 9
    assert set(table["dataset"]) == {"synthetic"}
    assert sorted(table["subject"].unique()) == ["synthetic/sub01", "synthetic/sub02", "synthetic/sub03"]
    assert (table["n_frames"] == table["offset"] - table["onset"] + 1).all()
    assert all(Path(p).is_file() for p in table["landmarks_path"])


@pytest.fixture(scope="module")
def dlib_models():
    dlib = pytest.importorskip("dlib")
    models = pytest.importorskip("face_recognition_models")
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(models.pose_predictor_model_location())


def _detect(models, image: np.ndarray) -> np.ndarray | None:
    detector, predictor = models
    faces = sorted(detector(image, 1), key=lambda r: -r.area())
    if not faces:
        return None
    return np.array([(p.x, p.y) for p in predictor(image, faces[0]).parts()], np.float32)


def test_astronaut_landmarks_constant_matches_dlib(dlib_models) -> None:
    from skimage.data import astronaut

    detected = _detect(dlib_models, astronaut())
    assert detected is not None
    np.testing.assert_allclose(detected, synth.ASTRONAUT_LANDMARKS, atol=1.0)


def test_dlib_finds_generated_faces_where_the_ground_truth_says(dlib_models) -> None:
    cfg = SynthConfig(subjects=4, clips_per_subject=1, image_size=256, min_frames=10, max_frames=10)
    for clip in synth.iter_clips(cfg):
        for k in (0, clip.apex - clip.onset):
            found = _detect(dlib_models, np.ascontiguousarray(clip.frames[k]))
            assert found is not None, (clip.subject, k)
            assert np.abs(found - clip.landmarks[k]).mean() < 2.5, (clip.subject, k)
