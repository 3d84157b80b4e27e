"""One hyperparameter trial = one configuration over its folds, as a Ray Tune function trainable.

A trial requests a placement group of one empty head bundle (the trainable only waits) plus one bundle per fold it
runs at once; its fold tasks are scheduled INSIDE that group, so Tune's accounting of trials matches what the folds
really use, and trials and folds run concurrently up to the cluster's size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray import tune
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mer_model.config import Params, SearchParam, with_overrides
from mer_model.errors import ConfigError
from mer_model.training.folds import Fold, fold_fingerprint
from mer_model.training.protocols import is_leaky
from mer_model.training.results import FoldSummary
from pipelines.engine.tasks import FoldJob, fold_task

OBJECTIVE = "objective"  # the key a search trial reports: mean inner-validation score over its folds


@dataclass
class TrialContext:
    """What every trial of one phase shares (passed once through the object store with tune.with_parameters)."""

    phase: str  # "search" (objective = mean inner validation score) or "evaluate" (all folds, pooled test metrics)
    params: dict[str, Any]  # params.yaml as a mapping; a trial applies its sampled values on top
    protocol: str
    folds: list[Fold]
    cache_dir: str
    storage: str
    data_version: str
    fold_cpus: float
    fold_gpus: float
    max_retries: int
    metric: str = "uf1"
    fold_group_size: int = 1  # folds per Ray task (tune.fold_group_size)
    search_keys: list[str] = field(default_factory=list)

    def resolved(self, config: Mapping[str, Any]) -> tuple[Params, dict[str, Any]]:
        """(the trial's Params, its sampled overrides) for a Tune trial config."""
        overrides = {k: config[k] for k in self.search_keys if k in config}
        return trial_params(self.params, overrides, self.protocol), overrides


def trial_params(base: Mapping[str, Any], overrides: Mapping[str, Any], protocol: str) -> Params:
    """The resolved Params of a trial: `base` + sampled `overrides` (dotted keys), with train.protocol set."""
    return with_overrides(base, {**overrides, "train.protocol": protocol}, "trial config")


def fold_jobs(ctx: TrialContext, params: Params) -> list[FoldJob]:
    leaky = is_leaky(params.train.protocol, params.model)
    return [
        FoldJob(key=fold_fingerprint(params.model, params.train, fold, ctx.data_version), fold=fold,
                model=params.model.model_dump(mode="json"), train=params.train.model_dump(mode="json"), leaky=leaky,
                cache_dir=ctx.cache_dir, storage=ctx.storage, torch_threads=max(1, int(ctx.fold_cpus)))
        for fold in ctx.folds
    ]


def trial_trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: launch every fold of this configuration, report each as it finishes.

    Search phase: the reported `objective` is the mean INNER validation score (`val_<tune.metric>` at the selected
    epoch) of the folds finished so far -- never a test-fold number. Evaluate phase: the fold only; pooled test
    metrics are computed once, when the phase's folds are all done (TrackingCallback.on_trial_complete and the
    driver), not over all folds again after every fold.
    """
    params, _ = ctx.resolved(config)
    jobs = fold_jobs(ctx, params)
    group = get_current_placement_group()
    strategy: Any = (PlacementGroupSchedulingStrategy(placement_group=group, placement_group_capture_child_tasks=True)
                     if group is not None else "DEFAULT")
    task = fold_task(ctx.fold_cpus, ctx.fold_gpus, ctx.max_retries, strategy)
    size = ctx.fold_group_size
    pending = {task.remote(group): group for group in (jobs[i:i + size] for i in range(0, len(jobs), size))}
    scores: list[float] = []
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        group = pending.pop(ready[0])
        for job, summary in zip(group, ray.get(ready[0]), strict=True):
            done += 1
            report: dict[str, Any] = {"fold": job.fold.name, "fold_key": job.key, "folds_done": done,
                                      "folds_total": len(jobs)}
            if ctx.phase == "search":
                scores.append(inner_score(summary, ctx.metric))
                report[OBJECTIVE] = float(np.mean(scores))
            tune.report(report)


def inner_score(summary: FoldSummary, metric: str) -> float:
    """The fold's validation `metric` at its selected epoch (protocols that watch validation subjects)."""
    entry = summary.history[summary.selected_epoch - 1]
    key = f"val_{metric}"
    if summary.val_score is None or key not in entry:
        raise ConfigError(f"tune.metric: {metric!r} is not a validation metric of fold {summary.fold} "
                          f"(protocol {summary.protocol}); choose uf1, uar or accuracy")
    return float(entry[key])


def fold_resources(fold_cpus: float, fold_gpus: float, bundles: int) -> Any:
    """Tune resources of a trial: an empty head bundle for the waiting trainable, one bundle per concurrent fold."""
    fold = {"CPU": fold_cpus, **({"GPU": fold_gpus} if fold_gpus else {})}
    return tune.PlacementGroupFactory([{}] + [dict(fold) for _ in range(max(1, bundles))])


def fold_slots(cluster: Mapping[str, float], fold_cpus: float, fold_gpus: float) -> int:
    """How many folds the cluster can run at once."""
    slots = math.floor(cluster.get("CPU", 1) / fold_cpus + 1e-9)
    if fold_gpus:
        slots = min(slots, math.floor(cluster.get("GPU", 0) / fold_gpus + 1e-9))
    if slots < 1:
        raise ConfigError(f"tune.fold_cpus/fold_gpus: one fold needs {fold_cpus} CPU / {fold_gpus} GPU; the Ray "
                          f"cluster has {cluster.get('CPU', 0)} CPU / {cluster.get('GPU', 0)} GPU")
    return slots


def search_folds(folds: list[Fold], count: int) -> list[Fold]:
    """`count` folds spread evenly over the fold order (deterministic)."""
    count = min(count, len(folds))
    return [folds[(i * len(folds)) // count] for i in range(count)]


def tune_domain(name: str, spec: SearchParam) -> Any:
    """A Tune search domain for one `tune.search_space` entry (validated at load: mer_model.config.SearchParam)."""
    if spec.type == "choice":
        return tune.choice(spec.values)
    assert spec.low is not None and spec.high is not None, f"tune.search_space.{name} was not validated"
    if spec.type == "loguniform":
        return tune.loguniform(spec.low, spec.high)
    if spec.type == "int":
        return tune.randint(int(spec.low), int(spec.high) + 1)
    return tune.uniform(spec.low, spec.high)
