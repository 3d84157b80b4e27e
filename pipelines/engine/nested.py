"""Nested search (tune.nested): one Optuna search per evaluation ("outer") fold, all in ONE Tune experiment.

Why one experiment: the outer folds' searches are independent, so their trials -- and each trial's fold tasks on
its outer fold's training subjects -- can all be in flight at once; a Python loop over outer folds (one Tuner each)
would leave a GPU cluster waiting on the slowest trial of every search. `NestedSearch` is a Tune Searcher that holds
one `OptunaSearch` per outer fold (seeded from `seed` and the fold's position) and hands out trials round robin over
the outer folds that still need some, each config tagged with its outer fold (trial.OUTER_KEY); results go back to
that fold's study only. Tune pickles it with the experiment state (`save` / `restore`), so a killed driver resumes
every search where it stopped.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from mer.model.errors import NonFiniteError
from mer.pipelines.engine.trial import OBJECTIVE, OUTER_KEY, best_trial


class NestedSearch(Searcher):
    """`num_samples` Optuna trials for each of `outer` (fold names), objective OBJECTIVE maximised."""

    def __init__(self, outer: Sequence[str], num_samples: int, seed: int) -> None:
        super().__init__(metric=OBJECTIVE, mode="max")
        self.searchers = {name: OptunaSearch(metric=OBJECTIVE, mode="max", seed=seed + i)
                          for i, name in enumerate(outer)}
        self.num_samples = num_samples
        self.owner: dict[str, str] = {}  # trial id -> outer fold

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return all(s.set_search_properties(metric, mode, config, **spec) for s in self.searchers.values())

    def suggest(self, trial_id: str) -> dict | str | None:
        counts = {name: 0 for name in self.searchers}
        for name in self.owner.values():
            counts[name] += 1
        open_folds = [name for name, n in counts.items() if n < self.num_samples]
        if not open_folds:
            return Searcher.FINISHED
        outer = min(open_folds, key=lambda name: counts[name])  # round robin, in fold order
        config = self.searchers[outer].suggest(trial_id)
        if config is None:
            return None
        self.owner[trial_id] = outer
        return {**config, OUTER_KEY: outer}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.__dict__, out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as src:
            self.__dict__.update(pickle.load(src))


def best_per_fold(grid: Any, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per outer fold of a nested search's ResultGrid: `{"chosen": {key: value}, "inner_score": objective}` of its
    best trial (highest mean inner validation score; the earliest trial id on ties; NaN objectives -- a failed fold -- never
    chosen). NonFiniteError naming an outer fold none of whose trials has an objective."""
    by_outer: dict[str, list[Any]] = {}
    for result in grid:
        by_outer.setdefault(result.config[OUTER_KEY], []).append(result)
    best = {outer: best_trial(results) for outer, results in by_outer.items()}
    missing = sorted(outer for outer, result in best.items() if result is None)
    if missing:
        raise NonFiniteError(f"nested search: no trial for fold {missing[0]} has an objective: every configuration "
                             "had a search fold that failed (see the log)")
    return {outer: {"chosen": {k: result.config[k] for k in sorted(keys)},
                     "inner_score": float(result.metrics[OBJECTIVE])} for outer, result in sorted(best.items())}
