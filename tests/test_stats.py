"""Subject-bootstrap intervals and paired comparisons (mer.model.training.stats): agreement with the pooled metrics,
determinism, refusal of unlike runs, and that a real difference is found while no difference is not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mer.model.config import IntervalConfig
from mer.model.errors import DataError, MerError
from mer.model.training.metrics import classification_metrics, flat_metrics
from mer.model.training.stats import (
    NOT_DISTINGUISHABLE,
    confusion_scores,
    format_difference,
    metric_intervals,
    paired_difference,
    subject_confusions,
    verdict,
)

CLASSES = ["a", "b", "c", "d"]
CFG = IntervalConfig(resamples=500, seed=0)


def predictions(seed: int = 0, subjects: int = 12, samples: int = 90, accuracy: float = 0.6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    subject = np.concatenate([np.arange(subjects), rng.integers(0, subjects, samples - subjects)])
    label = rng.choice(3, samples, p=[0.6, 0.3, 0.1])  # class "d" never true
    pred = np.where(rng.random(samples) < accuracy, label, rng.integers(0, 4, samples))
    dataset = np.where(subject % 2 == 0, "casme2", "samm")
    return pd.DataFrame({"sample_id": [f"x{i}" for i in range(samples)],
                         "subject": [f"{d}/s{s}" for d, s in zip(dataset, subject, strict=True)],
                         "dataset": dataset, "label": label, "pred": pred})


def test_vectorised_scores_equal_the_pooled_metrics() -> None:
    for seed in range(5):
        frame = predictions(seed)
        frame.loc[frame["pred"] == 3, "pred"] = 0 if seed % 2 else 3  # with and without a never-seen class
        _, confusions = subject_confusions(frame, len(CLASSES))
        scores = confusion_scores(confusions.sum(axis=0))
        reference = classification_metrics(frame["label"], frame["pred"], len(CLASSES), CLASSES)
        assert scores == pytest.approx([reference["uf1"], reference["uar"], reference["accuracy"]], abs=1e-12)


def test_intervals_bracket_the_estimate_per_dataset_and_repeat() -> None:
    frame = predictions()
    flat, _ = flat_metrics(frame, CLASSES, CFG)
    for prefix in ("", "casme2/", "samm/"):
        for metric in ("uf1", "uar", "accuracy"):
            low, high = flat[f"{prefix}{metric}_ci_low"], flat[f"{prefix}{metric}_ci_high"]
            assert low < flat[f"{prefix}{metric}"] < high, (prefix, metric)
            assert high - low < 0.6
    assert metric_intervals(frame, CLASSES, CFG) == metric_intervals(frame, CLASSES, CFG)  # fixed seed
    other = metric_intervals(frame, CLASSES, IntervalConfig(resamples=500, seed=1))
    assert other != metric_intervals(frame, CLASSES, CFG)
    assert other["uf1_ci_low"] == pytest.approx(flat["uf1_ci_low"], abs=0.03)  # a seed moves a bound a little


def test_more_subjects_narrow_the_interval_and_one_subject_has_none() -> None:
    small = metric_intervals(predictions(subjects=6, samples=60), CLASSES, CFG)
    large = metric_intervals(predictions(subjects=60, samples=600), CLASSES, CFG)
    assert large["uf1_ci_high"] - large["uf1_ci_low"] < small["uf1_ci_high"] - small["uf1_ci_low"]
    one = predictions().assign(subject="casme2/s0", dataset="casme2")
    assert metric_intervals(one, CLASSES, CFG) == {}


def test_paired_difference_finds_a_real_difference_and_not_a_null_one() -> None:
    a = predictions(subjects=30, samples=240)
    rng = np.random.default_rng(5)
    better = a.assign(pred=np.where(rng.random(len(a)) < 0.7, a["label"], a["pred"]))
    result = paired_difference(better, a, CLASSES, CFG)
    assert result["uf1"]["diff"] > 0 and result["uf1"]["ci_low"] > 0 and result["uf1"]["p"] < 0.01
    assert verdict(result["uf1"]["ci_low"], result["uf1"]["ci_high"]) == "better"
    same = paired_difference(a, a.sample(frac=1.0, random_state=0), CLASSES, CFG)  # row order does not matter
    assert same["uf1"] == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0}
    # another run of the same quality: new errors, same error rate
    noisy = a.assign(pred=np.where(rng.random(len(a)) < 0.6, a["label"], rng.integers(0, 4, len(a))))
    close = paired_difference(noisy, a, CLASSES, CFG)
    assert close["uf1"]["ci_low"] < 0 < close["uf1"]["ci_high"] and close["uf1"]["p"] > 0.05
    text = format_difference(*(close["uf1"][k] for k in ("diff", "ci_low", "ci_high", "p")))
    assert text.endswith(NOT_DISTINGUISHABLE) and "[" in text


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.iloc[1:], r"different samples \(1 only in A, e.g. \['x0'\]"),
    (lambda b: b.assign(label=(b["label"] + 1) % 3), "have another label"),
    (lambda b: b.assign(subject=b["subject"] + "x"), "have another subject"),
])
def test_runs_over_different_samples_are_refused(edit, message) -> None:
    a = predictions()
    with pytest.raises(DataError, match=message) as caught:
        paired_difference(a, edit(a.copy()), CLASSES, CFG, names=("A", "B"))
    assert isinstance(caught.value, MerError) and "\n" not in str(caught.value)


def test_the_nested_vs_plain_report_pairs_the_two_estimates() -> None:
    """benchmarks/nested.py's table: both searches' estimates with intervals, the paired difference nested - plain
    with its verdict, and each outer fold's choice (from the two runs' stored results)."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location(
        "benchmark_nested", Path(__file__).resolve().parents[1] / "benchmarks" / "nested.py")
    nested_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nested_script)

    def results(frame: pd.DataFrame, **summary: object) -> SimpleNamespace:
        return SimpleNamespace(predictions=frame, summary=SimpleNamespace(**{
            "class_names": CLASSES, "model": {"name": "ststnet", "config": "paper"}, "split": "subject_5fold",
            "search": {"num_samples": 20, "search_folds": 3}, "chosen": {}, "chosen_per_fold": {}, **summary}))

    plain = predictions(0, accuracy=0.9)
    worse = plain.assign(pred=np.where(np.arange(len(plain)) % 2 == 0, (plain["label"] + 1) % 3, plain["pred"]))
    result = nested_script.report(
        "benchmarks/recipes/ststnet-cpu.yaml", results(plain, chosen={"train.lr": 1e-3}),
        results(worse, chosen_per_fold={"k1": {"chosen": {"train.lr": 2e-3}, "inner_score": 0.7}}), CFG,
        {"plain": 1.0, "nested": 5.0})
    assert result["plain"]["uf1"]["value"] > result["nested"]["uf1"]["value"]
    difference = result["nested_minus_plain"]["uf1"]
    assert difference["ci_high"] < 0 and difference["p"] < 0.05
    text = nested_script.markdown(result, "python benchmarks/nested.py")
    assert "nested worse" in text and '| k1 | `{"train.lr": 0.002}` | 0.7000 |' in text
    assert "40 subjects" not in text and f"{result['subjects']} subjects" in text
