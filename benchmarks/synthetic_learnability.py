"""Synthetic dataset figures: generation time and size, dlib detection rate, and how learnable the task is.

    python benchmarks/synthetic_learnability.py [--subjects 8] [--clips 10] [--size 256] [--seed 0]

Generates the dataset once (in a temporary directory, one process), then prints
* wall and CPU seconds of `write_dataset` and the bytes written;
* dlib's detection rate on the onset, apex and offset frames as written (JPEG) and the mean distance of dlib's 68
  landmarks to the ground truth;
* subject-wise (leave-one-subject-out) macro F1 of a ridge classifier on 32x32 grey apex pixels versus apex-minus-
  onset pixels, and on ground-truth landmarks (apex positions versus apex-minus-onset displacements): the apex alone
  should be near chance (0.2) and the motion clearly above.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd


def _loso_f1(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import f1_score
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeClassifier(alpha=100.0))
    predicted = cross_val_predict(model, features, labels, groups=groups, cv=LeaveOneGroupOut())
    return float(f1_score(labels, predicted, average="macro"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--clips", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import dlib
    import face_recognition_models

    from mer.model.config import SynthConfig
    from mer.model.data import synthetic as synth

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(out=tmp, subjects=args.subjects, clips_per_subject=args.clips, image_size=args.size,
                          seed=args.seed)
        wall, cpu = time.perf_counter(), time.process_time()
        root = synth.write_dataset(cfg)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        size = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
        truth_size = sum(p.stat().st_size for p in (Path(root) / synth.GROUNDTRUTH_DIR).rglob("*.npz"))
        sheet = pd.read_excel(Path(root) / synth.SHEET_NAME, dtype=object)
        n_frames = int((sheet["OffsetFrame"] - sheet["OnsetFrame"] + 1).sum())
        print(f"generation: {len(sheet)} clips, {n_frames} frames of {args.size} px in {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU of this process ({1000 * cpu / n_frames:.1f} ms/frame); "
              f"{size / 1e6:.1f} MB on disk, of which ground truth {truth_size / 1e6:.1f} MB")

        detector = dlib.get_frontal_face_detector()
        predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
        found, errors = {0: 0, 1: 0}, []
        features: dict[str, list[np.ndarray]] = {"apex pixels": [], "apex-onset pixels": [],
                                                 "apex landmarks": [], "apex-onset landmarks": []}
        for row in sheet.itertuples(index=False):
            subject, clip, onset, apex, offset = row[:5]
            truth = np.load(Path(root) / synth.GROUNDTRUTH_DIR / f"sub{subject}" / f"{clip}.npz")["landmarks"]
            grey = {}
            for number in (onset, apex, offset):
                path = Path(root) / f"sub{subject}" / clip / synth.FRAME_TEMPLATE.format(number)
                image = cv2.imread(str(path))[..., ::-1].copy()
                grey[number] = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (32, 32),
                                          interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
                faces = detector(image, 0) or detector(image, 1)
                found[bool(faces)] += 1
                if faces:
                    face = max(faces, key=lambda r: r.area())
                    points = np.array([(p.x, p.y) for p in predictor(image, face).parts()], np.float32)
                    errors.append(float(np.linalg.norm(points - truth[number - onset], axis=1).mean()))
            features["apex pixels"].append(grey[apex])
            features["apex-onset pixels"].append(grey[apex] - grey[onset])
            features["apex landmarks"].append((truth[apex - onset] - truth[apex - onset].mean(0)).ravel())
            features["apex-onset landmarks"].append((truth[apex - onset] - truth[0]).ravel())
        total = found[0] + found[1]
        print(f"dlib frontal detector: face found in {found[1]}/{total} frames ({100 * found[1] / total:.1f} %); "
              f"mean landmark distance to ground truth {np.mean(errors):.2f} px")

        labels = np.array([synth.EMOTIONS.index(e) for e in sheet["Estimated Emotion"]])
        groups = sheet["Subject"].to_numpy()
        print("leave-one-subject-out macro F1, ridge classifier (chance 0.20):")
        for name, rows in features.items():
            print(f"  {name:22s} {_loso_f1(np.array(rows), labels, groups):.3f}")


if __name__ == "__main__":
    main()
