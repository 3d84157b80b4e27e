"""Seed repeats: the same experiment run N times with different seeds, and the spread of its pooled metrics.

A single LOSO run of a small MER model moves by several hundredths of UF1 with its seed alone (initialisation,
shuffling, augmentation and, under `inner`, the validation subjects). Running the evaluation `tune.repeats` times makes
that spread a measured figure instead of prose. Repeat 0 keeps `train.seed`, so it IS the single run (its folds are
shared with a run without repeats); repeat r > 0 uses a seed derived from (train.seed, r) in a stream of its own, so
a repeat's seed never equals one of a seed ensemble's members (`trainer.member_seed`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPREAD_METRICS = ("uf1", "uar", "accuracy")  # what the mean and sd over repeats are reported for


def repeat_seed(seed: int, repeat: int) -> int:
    """`train.seed` of repeat `repeat` of a run with `train.seed` = `seed` (repeat 0 keeps `seed`)."""
    if repeat == 0:
        return seed
    return int(np.random.SeedSequence([seed, repeat, 4]).generate_state(1)[0])


def repeat_spread(per_repeat: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Mean and sample sd (ddof 1) over repeats of each of SPREAD_METRICS, from each repeat's pooled metrics
    (metrics.flat_metrics): `{"n", "seeds", "per_repeat": [{uf1, uar, accuracy}], "uf1_mean", "uf1_sd", ...}`. A metric
    a repeat lacks is left out of that metric's figures; with fewer than two values its sd is None."""
    out: dict[str, Any] = {"n": len(per_repeat), "seeds": [int(s) for s in seeds],
                           "per_repeat": [{k: m.get(k) for k in SPREAD_METRICS} for m in per_repeat]}
    for name in SPREAD_METRICS:
        values = np.array([float(m[name]) for m in per_repeat if m.get(name) is not None])
        out[f"{name}_mean"] = float(values.mean()) if len(values) else None
        out[f"{name}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else None
    return out


def spread_columns(spread: Mapping[str, Any]) -> dict[str, Any]:
    """A `repeat_spread` under the names every output gives it (metrics.json, results.csv, the MLflow parent run, the
    HTML report): `repeats` and `<metric>_repeat_mean` / `<metric>_repeat_sd`; {} for a single run."""
    if int(spread.get("n", 1)) < 2:
        return {}
    return {"repeats": int(spread["n"]), **{f"{k}_repeat_{stat}": spread.get(f"{k}_{stat}") for k in SPREAD_METRICS
                                            for stat in ("mean", "sd")}}
