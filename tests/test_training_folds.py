"""LOSO folds and the inner split never leak a test subject."""

from __future__ import annotations

import pandas as pd
import pytest

from mer.model.errors import ConfigError
from mer.model.training.folds import Fold, inner_split, loso_folds


def _index() -> pd.DataFrame:
    subjects = ["casme2/sub02", "smic/s1", "casme2/sub01", "samm/006", "casme2/sub10"]
    return pd.DataFrame({"subject": [s for s in subjects for _ in range(3)], "label": [0, 1, 2] * len(subjects)})


def test_loso_covers_each_subject_once_without_leaks() -> None:
    index = _index()
    folds = loso_folds(index)
    subjects = sorted(index["subject"].unique())
    assert [f.test_subjects for f in folds] == [(s,) for s in subjects]
    for fold in folds:
        assert set(fold.train_subjects) == set(subjects) - set(fold.test_subjects)
        assert fold.val_subjects == ()
    assert loso_folds(index.sample(frac=1, random_state=1)) == folds  # row order does not matter
    assert folds[0].slug == "casme2__sub01"


def test_fold_rejects_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        Fold("x", train_subjects=("a", "b"), test_subjects=("b",))


def test_inner_split_is_subject_wise_deterministic_and_stratified() -> None:
    train = [f"d/s{i}" for i in range(10)]
    # Class 2 occurs only in s8 and s9: a good validation set should contain one of them.
    labels = {s: [0, 1] for s in train[:8]} | {"d/s8": [2, 2], "d/s9": [2, 0]}
    tr, val = inner_split(train, 0.2, seed=3, subject_labels=labels)
    assert len(val) == 2 and set(tr) | set(val) == set(train) and not set(tr) & set(val)
    assert {"d/s8", "d/s9"} & set(val) and {"d/s8", "d/s9"} & set(tr)
    assert inner_split(train, 0.2, seed=3, subject_labels=labels) == (tr, val)
    splits = {inner_split(train, 0.2, seed=s)[1] for s in range(10)}
    assert len(splits) > 1  # the seed matters


def test_inner_split_needs_two_subjects() -> None:
    assert inner_split(["a", "b"], 0.9, seed=0)[0] in (("a",), ("b",))
    with pytest.raises(ConfigError):
        inner_split(["a"], 0.2, seed=0)
