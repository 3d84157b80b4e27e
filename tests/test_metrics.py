"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from mer.model.training.metrics import au_f1, classification_metrics, flow_epe, landmark_nme, pooled_metrics

NAMES = ["neg", "pos", "sur"]


def test_hand_computed_with_class_never_predicted() -> None:
    # true: 0 0 0 1 1 2 ; pred: 0 0 1 1 0 0  -> class 2 never predicted.
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 0, 0]
    m = classification_metrics(y_true, y_pred, 3, NAMES)
    # class 0: TP 2, FP 2, FN 1 -> F1 4/7; class 1: TP 1, FP 1, FN 1 -> 1/2; class 2: TP 0 -> 0.
    assert m["uf1"] == pytest.approx((4 / 7 + 1 / 2 + 0) / 3)
    assert m["uar"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["weighted_f1"] == pytest.approx((3 * 4 / 7 + 2 * 1 / 2 + 0) / 6)
    assert m["per_class_recall"] == {"neg": pytest.approx(2 / 3), "pos": pytest.approx(0.5), "sur": 0.0}
    assert m["confusion"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert m["n"] == 6


def test_uf1_equals_sklearn_macro_over_all_classes_when_all_present() -> None:
    rng = np.random.default_rng(0)
    y_true = np.concatenate([np.arange(5), rng.integers(0, 5, 200)])
    y_pred = np.where(rng.random(205) < 0.6, y_true, rng.integers(0, 5, 205))
    y_pred[y_pred == 4] = 3  # class 4 never predicted
    m = classification_metrics(y_true, y_pred, 5, list("abcde"))
    assert m["uf1"] == pytest.approx(f1_score(y_true, y_pred, labels=range(5), average="macro", zero_division=0))
    assert m["per_class_recall"]["e"] == 0.0


def test_class_absent_from_truth_and_prediction_is_undefined_not_zero() -> None:
    # A subject with only classes 0 and 1: class 2 has no F1 and no recall; it must not drag UF1 down.
    m = classification_metrics([0, 1, 1], [0, 1, 1], 3, NAMES)
    assert m["uf1"] == pytest.approx(1.0)
    assert m["uar"] == pytest.approx(1.0)
    assert m["per_class_recall"]["sur"] is None
    # ...but a class predicted and never true is a false positive and counts (F1 0).
    m = classification_metrics([0, 1, 1], [0, 1, 2], 3, NAMES)
    assert m["uf1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_pooled_metrics_per_dataset_and_subject() -> None:
    frame = pd.DataFrame({
        "sample_id": list("abcdef"), "dataset": ["smic"] * 3 + ["casme2"] * 3,
        "subject": ["smic/s1", "smic/s1", "smic/s2", "casme2/a", "casme2/a", "casme2/b"],
        "label": [0, 1, 2, 0, 1, 2], "pred": [0, 1, 2, 0, 0, 0],
    })
    m = pooled_metrics(frame, NAMES)
    assert m["overall"]["accuracy"] == pytest.approx(4 / 6)
    assert m["per_dataset"]["smic"]["uf1"] == pytest.approx(1.0)
    assert m["per_dataset"]["casme2"]["accuracy"] == pytest.approx(1 / 3)
    assert m["per_subject"]["casme2/b"]["accuracy"] == 0.0
    assert set(m["per_subject"]) == {"smic/s1", "smic/s2", "casme2/a", "casme2/b"}


def test_au_f1_ignores_aus_nobody_shows() -> None:
    true = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]])
    pred = np.array([[1, 0, 1], [0, 1, 0], [0, 1, 0]])
    m = au_f1(true, pred, ["AU1", "AU2", "AU4"])
    # AU1: TP1 FN1 -> 2/3; AU2: TP2 -> 1; AU4 never true -> excluded.
    assert m["au_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert set(m["per_au_f1"]) == {"AU1", "AU2"}


def test_flow_epe_and_landmark_nme() -> None:
    target = np.zeros((2, 2, 4, 4))
    pred = target.copy()
    pred[:, 0] += 3.0
    pred[:, 1] += 4.0
    assert flow_epe(pred, target) == pytest.approx(5.0)

    truth = np.zeros((68, 2))
    truth[36:42] = [10.0, 20.0]  # one eye centre
    truth[42:48] = [30.0, 20.0]  # the other: inter-ocular distance 20
    moved = truth + np.array([0.0, 2.0])  # every point 2 px off
    assert landmark_nme(moved, truth) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        landmark_nme(moved[:67], truth[:67])
