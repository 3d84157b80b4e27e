"""Split schemes behind one registry: how the samples of a cache become evaluation folds (`train.split`).

A split maps the sample index (one row per sample, with `subject` and `dataset` columns) to a list of `Fold`s. Every
scheme splits by SUBJECT, so no person is ever on both sides of a fold; the `inner` protocol then draws its
validation subjects from each fold's training subjects only. A new scheme is one function here with
`@register_split`.

Registered:
* `loso` - leave one subject out: one fold per subject (the field's standard for CASME II, SAMM, SMIC, MEGC2019);
* `lodo` - leave one dataset out: one fold per source dataset of a composite, trained on the others and tested on
  the held-out one (the cross-dataset protocol of MEB and of the MEGC cross-database challenges). Honest by
  construction: no subject of the held-out dataset is in training or validation, and results are pooled per
  held-out dataset (the `per_dataset` part of `pooled_metrics`);
* `subject_5fold` - five subject-grouped folds, for comparisons re-run often (an ablation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mer.model.errors import ConfigError
from mer.model.registry import Registry
from mer.model.training.folds import Fold, loso_folds

Split = Callable[[pd.DataFrame], list[Fold]]


@dataclass(frozen=True)
class SplitScheme:
    """One registered split: `folds(index) -> [Fold]` (ConfigError naming `train.split` when it cannot apply) and
    its one-line description (the function's docstring), shown where the schemes are listed."""

    name: str
    folds: Callable[[pd.DataFrame], list[Fold]]
    description: str


SPLITS: Registry[SplitScheme] = Registry("split", "train.split", "mer_model/training/splits.py")


def register_split(name: str) -> Callable[[Split], Split]:
    """Decorator: register a split scheme `index -> folds` under `name`."""
    return SPLITS.decorator(name, lambda fn: SplitScheme(name, fn, (fn.__doc__ or "").strip().split("\n")[0]))


def make_folds(name: str, index: pd.DataFrame) -> list[Fold]:
    """The folds of split scheme `name` over `index`; ConfigError naming `train.split` when it cannot apply."""
    return SPLITS.get(name).folds(index)


register_split("loso")(loso_folds)


@register_split("lodo")
def lodo_folds(index: pd.DataFrame) -> list[Fold]:
    """One fold per dataset (sorted; fold name = dataset): test = all its subjects, train = every other subject."""
    for column in ("subject", "dataset"):
        if column not in index.columns:
            raise ConfigError(f"train.split: lodo needs a '{column}' column in the sample index")
    datasets = sorted(str(d) for d in index["dataset"].unique())
    if len(datasets) < 2:
        raise ConfigError(f"train.split: lodo needs at least 2 datasets; the data has {datasets} "
                          "(use a composite, e.g. data.source=megc2019, or synth.datasets: 2)")
    owners = index.groupby("subject")["dataset"].nunique()
    shared = owners[owners > 1]
    if not shared.empty:
        raise ConfigError(f"train.split: subject {shared.index[0]} appears in several datasets; lodo needs each "
                          "subject in one dataset")
    subjects = {d: sorted(str(s) for s in index.loc[index["dataset"] == d, "subject"].unique()) for d in datasets}
    return [Fold(name=d, train_subjects=tuple(s for o in datasets if o != d for s in subjects[o]),
                 test_subjects=tuple(subjects[d])) for d in datasets]


@register_split("subject_5fold")
def subject_5fold(index: pd.DataFrame) -> list[Fold]:
    """Five subject-grouped folds (subjects shuffled with a fixed seed, dealt round-robin; fold names `k1`..`k5`).

    Eight times cheaper than LOSO on a 40-subject composite, for comparisons that are re-run often (an ablation, a
    design check); the pooled result is not comparable with published LOSO numbers, which is why it is not the
    default. Needs at least 5 subjects.
    """
    subjects = sorted(str(s) for s in index["subject"].unique())
    if len(subjects) < 5:
        raise ConfigError(f"train.split: subject_5fold needs at least 5 subjects; the data has {len(subjects)}")
    order = [subjects[i] for i in np.random.default_rng(0).permutation(len(subjects))]
    groups = [sorted(order[k::5]) for k in range(5)]
    return [Fold(name=f"k{k + 1}", train_subjects=tuple(s for j, g in enumerate(groups) if j != k for s in g),
                 test_subjects=tuple(groups[k])) for k in range(5)]


def inner_folds(name: str, index: pd.DataFrame, outer: Fold) -> list[Fold]:
    """Split scheme `name` applied to the TRAINING subjects of `outer` only (a nested search's folds): the samples of
    `outer`'s test and validation subjects are not in the index it splits. Fold names are `<outer>|<inner>`. A
    ConfigError names `train.split`, the outer fold and why when the scheme cannot split what is left."""
    inner = index[index["subject"].astype(str).isin(set(outer.train_subjects))]
    try:
        folds = make_folds(name, inner)
    except ConfigError as err:
        raise ConfigError(f"tune.nested: the training subjects of fold {outer.name} cannot be split: {err}") from None
    return [Fold(name=f"{outer.name}|{f.name}", train_subjects=f.train_subjects, test_subjects=f.test_subjects,
                 val_subjects=f.val_subjects) for f in folds]
