"""One hyperparameter trial = one configuration over its folds, as a Ray Tune function trainable.

A trial reserves only what its waiting trainable needs (TRIAL_RESOURCES). Its fold tasks are plain Ray tasks outside
Tune's placement group, each declaring one fold's resources (`tune.fold_cpus`, `tune.fold_gpus`): pending tasks are
resource demand that Ray's autoscaler sees, and Ray runs as many as the cluster holds at each moment, so fold
concurrency follows a cluster that grows (GPU workers starting at zero) instead of being sized when the driver starts.
`tune.folds_per_trial` caps the fold tasks one trial has in flight.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray import tune
from ray.autoscaler.sdk import request_resources

from mer.components.settings import Params, SearchParam, with_overrides
from mer.model.errors import ConfigError
from mer.model.training.folds import Fold, fold_fingerprint
from mer.model.training.protocols import is_leaky
from mer.model.training.repeats import repeat_seed
from mer.model.training.results import FoldSummary
from mer.pipelines.engine.storage import FoldStorage
from mer.pipelines.engine.tasks import FoldFailure, FoldJob, fail_fold, fold_task

log = logging.getLogger(__name__)

OBJECTIVE = "objective"  # the key a search trial reports: mean inner-validation score over its folds
# Keys of a trial's config that are not sampled hyperparameters: the seed repeat an evaluation trial runs
# (tune.repeats) and the outer fold a nested search trial searches for (tune.nested).
REPEAT_KEY = "repeat"
OUTER_KEY = "outer_fold"


def best_trial(results: Iterable[Any]) -> Any | None:
    """The search's choice among ray.tune Results: the highest finite OBJECTIVE (NaN: a trial with a failed fold,
    never chosen), ties to the earliest trial id -- not to the grid's order, which a restored experiment changes, so a
    resumed driver chooses what the killed one chose. None when no trial has an objective."""
    scored = [r for r in sorted(results, key=lambda r: str(r.metrics.get("trial_id")))
              if isinstance(r.metrics.get(OBJECTIVE), (int, float)) and math.isfinite(r.metrics[OBJECTIVE])]
    return max(scored, key=lambda r: r.metrics[OBJECTIVE]) if scored else None


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
    folds_per_trial: int = 0  # fold tasks in flight per trial (tune.folds_per_trial); 0 = no cap
    search_keys: list[str] = field(default_factory=list)
    # Nested search (tune.nested): outer fold name -> the folds its search trains on (drawn from its training
    # subjects); and in the evaluation, outer fold name -> the search values chosen for it.
    inner: dict[str, list[Fold]] = field(default_factory=dict)
    per_fold: dict[str, dict[str, Any]] = field(default_factory=dict)

    def resolved(self, config: Mapping[str, Any]) -> tuple[Params, dict[str, Any]]:
        """(the trial's Params, its sampled overrides) for a Tune trial config: the sampled values, and the seed of
        its repeat (tune.repeats) applied; a nested evaluation's folds add their own choices (`fold_params`)."""
        overrides = {k: config[k] for k in self.search_keys if k in config}
        repeat = int(config.get(REPEAT_KEY, 0))
        seeded = {"train.seed": repeat_seed(int(self.params["train"]["seed"]), repeat)} if repeat else {}
        return trial_params(self.params, {**overrides, **seeded}, self.protocol), overrides

    def trial_folds(self, config: Mapping[str, Any]) -> list[Fold]:
        """The folds a trial trains: its outer fold's search folds in a nested search, else the phase's folds."""
        return self.inner[config[OUTER_KEY]] if OUTER_KEY in config else self.folds

    def fold_params(self, config: Mapping[str, Any], fold: str, trial: Params | None = None) -> Params:
        """The Params fold `fold` of a trial trains with: the trial's (`trial`, when already resolved), plus the
        fold's own choice in a nested evaluation."""
        params = trial or self.resolved(config)[0]
        own = self.per_fold.get(fold)
        return trial_params(params.model_dump(mode="json", by_alias=True), own, self.protocol) if own else params

    def jobs(self, config: Mapping[str, Any]) -> list[FoldJob]:
        """The fold jobs of a trial (one per fold of `trial_folds`, each with its own leak verdict)."""
        trial = self.resolved(config)[0]
        return [fold_job(self, self.fold_params(config, fold.name, trial), fold) for fold in self.trial_folds(config)]


def trial_params(base: Mapping[str, Any], overrides: Mapping[str, Any], protocol: str) -> Params:
    """The resolved Params of a trial: `base` + sampled `overrides` (dotted keys), with train.protocol set."""
    return with_overrides(base, {**overrides, "train.protocol": protocol}, "trial config")


def fold_job(ctx: TrialContext, params: Params, fold: Fold) -> FoldJob:
    """One fold of `params`: keyed by its fingerprint (the seed of a repeat and the choice of a nested search are in
    `params`, so repeats and outer folds never share a stored result, and a re-run finds each again), with the leak
    rule's verdict on the configuration that trains it."""
    return FoldJob(key=fold_fingerprint(params.model, params.train, fold, ctx.data_version), fold=fold,
                   model=params.model.model_dump(mode="json"), train=params.train.model_dump(mode="json"),
                   leaky=is_leaky(params.train.protocol, params.model), cache_dir=ctx.cache_dir, storage=ctx.storage,
                   torch_threads=max(1, int(ctx.fold_cpus)))


def trial_trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: launch the fold tasks of this configuration (at most `folds_per_trial` in flight
    when set, the next submitted as one finishes), report each fold as it finishes.

    Search phase: the reported `objective` is the mean INNER validation score (`val_<tune.metric>` at the selected
    epoch) of the folds finished so far -- never a test-fold number; NaN once a fold of the configuration failed
    (FoldFailure: it diverged), so the search never chooses it (Tune's best result skips NaN). Evaluate phase: the
    fold only (a failed one with `fold_failed` = its error); pooled test metrics are computed once, when the
    phase's folds are all done (TrackingCallback.on_trial_complete and the driver), not over all folds again after
    every fold.
    """
    jobs = ctx.jobs(config)
    size = ctx.fold_group_size
    queue = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    cap = ctx.folds_per_trial or len(queue)
    pending: dict[Any, list[FoldJob]] = {}
    scores: list[float] = []
    done = failed = 0
    # Task names say what a task trains in Ray's dashboard and task table: phase, folds, and the repeat or outer fold.
    tag = "".join(f" {k} {config[k]}" for k in (REPEAT_KEY, OUTER_KEY) if k in config)
    while queue or pending:
        while queue and len(pending) < cap:
            group = queue.pop(0)
            name = f"{ctx.phase}{tag}: fold {','.join(job.fold.name for job in group)}"
            # "DEFAULT": out of the trial's placement group (Tune makes its trainables capture child tasks), so each
            # fold task asks the whole cluster for its own resources.
            task = fold_task(ctx.fold_cpus, ctx.fold_gpus, ctx.max_retries, "DEFAULT", name)
            pending[task.remote(group)] = group
        ready, _ = ray.wait(list(pending), num_returns=1)
        group = pending.pop(ready[0])
        for job, outcome in zip(group, group_outcomes(group, ready[0]), strict=True):
            done += 1
            report: dict[str, Any] = {"fold": job.fold.name, "fold_key": job.key, "folds_done": done,
                                      "folds_total": len(jobs)}
            if isinstance(outcome, FoldFailure):
                failed += 1
                report["fold_failed"] = outcome.error
            elif ctx.phase == "search":
                scores.append(inner_score(outcome, ctx.metric))
            if ctx.phase == "search":
                report[OBJECTIVE] = float(np.mean(scores)) if scores and not failed else float("nan")
            tune.report(report)


def group_outcomes(group: list[FoldJob], ref: Any) -> list[FoldSummary | FoldFailure]:
    """The fold task's outcome per job. A task that itself failed (its worker died after `tune.max_retries`, an error
    outside a fold's own training) fails the folds of its group it had not stored, each in one line, instead of
    failing the trial and with it every other fold."""
    try:
        return list(ray.get(ref))
    except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as err:
        return [FoldStorage(job.storage).summary(job.key) or fail_fold(job, err) for job in group]


def inner_score(summary: FoldSummary, metric: str) -> float:
    """The fold's validation `metric` at its selected epoch (protocols that watch validation subjects); for UF1 the
    fold's `val_score`, which for a seed ensemble (train.ensemble) is the mean of its members' validation UF1s at
    their own kept epochs (the history holds the members' per-epoch mean)."""
    if metric == "uf1" and summary.val_score is not None:
        return float(summary.val_score)
    entry = summary.history[summary.selected_epoch - 1]
    key = f"val_{metric}"
    if summary.val_score is None or key not in entry:
        raise ConfigError(f"tune.metric: {metric!r} is not a validation metric of fold {summary.fold} "
                          f"(protocol {summary.protocol}); choose uf1, uar or accuracy")
    return float(entry[key])


# What a trial's trainable reserves: it only submits fold tasks and waits for them, so no CPU or GPU (a bundle may not
# be empty; a little memory, which every node has, including a KubeRay head started with num-cpus 0).
TRIAL_RESOURCES: dict[str, float] = {"memory": 64 * 2**20}


def trial_resources() -> Any:
    """Tune resources of a trial: one bundle for the waiting trainable, none for its folds (they ask Ray directly)."""
    return tune.PlacementGroupFactory([dict(TRIAL_RESOURCES)])


def _fits(resources: Mapping[str, float], fold_cpus: float, fold_gpus: float) -> bool:
    return (resources.get("CPU", 0) + 1e-9 >= fold_cpus) and (resources.get("GPU", 0) + 1e-9 >= fold_gpus)


def _no_fold_node(nodes: list[dict[str, Any]], fold_cpus: float, fold_gpus: float) -> str:
    """What is missing, said in one clause: the fold's needs and what the cluster has."""
    total = {k: sum(n["Resources"].get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    largest = max(nodes, key=lambda n: (n["Resources"].get("GPU", 0), n["Resources"].get("CPU", 0)),
                  default={"Resources": {}})["Resources"]
    return (f"one fold needs {fold_cpus:g} CPU / {fold_gpus:g} GPU on one node and no node of the Ray cluster has "
            f"that: {len(nodes)} node(s), {total['CPU']:g} CPU / {total['GPU']:g} GPU in all, the largest "
            f"{largest.get('CPU', 0):g} CPU / {largest.get('GPU', 0):g} GPU")


def wait_for_fold_node(fold_cpus: float, fold_gpus: float, timeout_s: float, poll_s: float = 1.0) -> None:
    """Return once some alive node of the Ray cluster can hold one fold (`fold_cpus` CPU and `fold_gpus` GPU on ONE
    node), asking the autoscaler for such a node meanwhile (`ray.autoscaler.sdk.request_resources`; a cluster without
    an autoscaler ignores the request). A node joining counts as progress and restarts the clock, so an autoscaling
    cluster may take as long as it needs to bring up workers; ConfigError (one line naming tune.fold_cpus/fold_gpus
    and what the cluster has) when `timeout_s` seconds pass without one, at once when `timeout_s` is 0 (a cluster
    that cannot grow, e.g. the command's private local Ray).
    """
    def alive() -> list[dict[str, Any]]:
        return [n for n in ray.nodes() if n.get("Alive")]

    current = alive()
    if any(_fits(n["Resources"], fold_cpus, fold_gpus) for n in current):
        return
    if timeout_s <= 0:
        raise ConfigError(f"tune.fold_cpus/tune.fold_gpus: {_no_fold_node(current, fold_cpus, fold_gpus)}; this "
                          "command's local Ray cannot grow (tune.ray_address joins a cluster)")
    fold = {"CPU": fold_cpus, **({"GPU": fold_gpus} if fold_gpus else {})}
    log.info("no node of the Ray cluster can hold one fold (%g CPU / %g GPU) yet; asking the autoscaler for one and "
             "waiting up to %.0f s (tune.fold_node_wait_s) after the last node that joined", fold_cpus, fold_gpus,
             timeout_s)
    request_resources(bundles=[fold])
    try:
        seen = {n["NodeID"] for n in current}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(poll_s)
            current = alive()
            if any(_fits(n["Resources"], fold_cpus, fold_gpus) for n in current):
                log.info("a node that holds one fold joined the Ray cluster")
                return
            joined = {n["NodeID"] for n in current} - seen
            if joined:
                seen |= joined
                deadline = time.monotonic() + timeout_s
        raise ConfigError(f"tune.fold_cpus/tune.fold_gpus: {_no_fold_node(current, fold_cpus, fold_gpus)}; none "
                          f"joined in {timeout_s:g} s (tune.fold_node_wait_s)")
    finally:
        request_resources(bundles=[])  # the folds' own tasks are the demand from here on


def search_folds(folds: list[Fold], count: int) -> list[Fold]:
    """`count` folds spread evenly over the fold order (deterministic)."""
    count = min(count, len(folds))
    return [folds[(i * len(folds)) // count] for i in range(count)]


def tune_domain(name: str, spec: SearchParam) -> Any:
    """A Tune search domain for one `tune.search_space` entry (validated at load: mer.components.settings.SearchParam)."""
    if spec.type == "choice":
        return tune.choice(spec.values)
    assert spec.low is not None and spec.high is not None, f"tune.search_space.{name} was not validated"
    if spec.type == "loguniform":
        return tune.loguniform(spec.low, spec.high)
    if spec.type == "int":
        return tune.randint(int(spec.low), int(spec.high) + 1)
    return tune.uniform(spec.low, spec.high)
