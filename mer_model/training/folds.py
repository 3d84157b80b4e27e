"""Leave-one-subject-out folds and the subject-wise inner validation split.

Every split is by SUBJECT: clips of one person are strongly correlated, so a sample-wise split would leak identity.
The inner split only ever sees the training subjects of a fold, which is what makes `inner` model selection honest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mer.model.errors import ConfigError

# Candidate validation sets drawn by `inner_split`; the best-stratified one is kept.
_SPLIT_CANDIDATES = 64
# Train settings that change where or how fast a fold runs, never its numbers. `amp` is NOT among them: mixed
# precision changes the arithmetic on CUDA.
SPEED_ONLY = frozenset({"checkpoint_every", "num_workers", "device", "device_data_mb"})


@dataclass(frozen=True)
class Fold:
    """One evaluation fold. `val_subjects` is empty unless the split was fixed in advance (the `inner` protocol
    derives it from `train_subjects` otherwise)."""

    name: str
    train_subjects: tuple[str, ...]
    test_subjects: tuple[str, ...]
    val_subjects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in ("train_subjects", "test_subjects", "val_subjects"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        train, test, val = set(self.train_subjects), set(self.test_subjects), set(self.val_subjects)
        if train & test or val & test or train & val:
            raise ValueError(f"fold {self.name}: train, validation and test subjects overlap")
        if not test:
            raise ValueError(f"fold {self.name}: no test subject")

    @property
    def slug(self) -> str:
        """The name as a file-system-safe token (subjects look like `casme2/sub01`)."""
        return self.name.replace("/", "__")


def fold_fingerprint(model: Any, train: Any, fold: Fold, *context: Any, length: int = 16) -> str:
    """Hash of everything that determines a fold's numbers: the model and train configurations (pydantic models;
    SPEED_ONLY settings left out), the fold's subjects and any `context` (class names, data version). The trainer's
    checkpoint and the engine's stored result are keyed by this one function, so they agree on what matters."""
    payload = {
        "model": model.model_dump(mode="json"),
        "train": train.model_dump(mode="json", exclude=set(SPEED_ONLY)),
        "fold": [fold.name, list(fold.train_subjects), list(fold.test_subjects), list(fold.val_subjects)],
        "context": list(context),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


def loso_folds(index: pd.DataFrame) -> list[Fold]:
    """One fold per subject of `index` (a frame with a `subject` column), sorted by subject name."""
    if "subject" not in index.columns:
        raise ConfigError("sample index has no 'subject' column")
    subjects = sorted(str(s) for s in index["subject"].unique())
    if len(subjects) < 2:
        raise ConfigError(f"LOSO needs at least 2 subjects; the index has {len(subjects)}")
    return [
        Fold(name=s, train_subjects=tuple(t for t in subjects if t != s), test_subjects=(s,))
        for s in subjects
    ]


def inner_split(
    train_subjects: Sequence[str],
    val_fraction: float,
    seed: int,
    subject_labels: Mapping[str, Sequence[int]] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split training subjects into (train, validation), subject-wise and deterministic in `seed`.

    At least one subject goes to each side. With `subject_labels` (subject -> its samples' labels) several random
    subject sets are drawn and the one whose class distribution is closest to the whole training set is kept, so the
    validation UF1 is not computed on a set that lacks a class by bad luck.
    """
    subjects = sorted(set(train_subjects))
    if len(subjects) < 2:
        raise ConfigError(f"train.val_fraction: an inner split needs at least 2 training subjects, got {len(subjects)}")
    n_val = min(len(subjects) - 1, max(1, round(val_fraction * len(subjects))))
    rng = np.random.default_rng(seed)
    candidates = [tuple(sorted(rng.choice(subjects, size=n_val, replace=False).tolist()))
                  for _ in range(_SPLIT_CANDIDATES if subject_labels else 1)]
    if subject_labels:
        num_classes = 1 + max((max(v) for v in subject_labels.values() if len(v)), default=0)

        def dist(group: Sequence[str]) -> np.ndarray:
            labels = np.concatenate([np.asarray(subject_labels.get(s, ()), dtype=int) for s in group])
            counts = np.bincount(labels, minlength=num_classes).astype(float)
            return counts / max(counts.sum(), 1.0)

        whole = dist(subjects)
        # Missing classes dominate the cost; among full-coverage sets the closest distribution wins; first wins ties.
        candidates.sort(key=lambda c: (int(((dist(c) == 0) & (whole > 0)).sum()), float(np.abs(dist(c) - whole).sum())))
    val = candidates[0]
    return tuple(s for s in subjects if s not in val), val
