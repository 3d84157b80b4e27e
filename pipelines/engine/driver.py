"""The experiment driver: search -> honest evaluation -> final model, on Ray Tune, mirrored into the tracker.

1. Search (`tune.num_samples` > 0): Optuna through Ray Tune's OptunaSearch over `tune.search_space`. A trial is one
   configuration trained on `tune.search_folds` folds under the `inner` protocol; its objective is the mean INNER
   validation score (validation subjects drawn from each fold's training subjects). No test fold is ever looked at.
   With `tune.nested` the search runs once per evaluation fold on its training subjects only (engine/nested.py).
2. Evaluation: the chosen configuration (or params.yaml's, without a search; per fold, after a nested search) on every
   fold of `train.split` under `train.protocol` (fixed | inner | oracle; leaky ones tagged), `tune.repeats` times
   with derived seeds, all repeats in flight together; -> `tune.results` (summary.json, predictions.csv, folds.json:
   mer.model.training.results). A fold that failed (its numbers became NaN/inf) is named, counted in summary.json's
   `failed_folds` and never pooled; the other folds complete.
3. Final model (`tune.final_model`, with a tracker that stores models): trained on all subjects for the epoch count
   the evaluation supports (`retrain_epochs`: the best epoch of the fold-averaged validation UF1 under `inner`),
   logged as this platform's pyfunc (servable with `mlflow models serve`); `mer register` puts it in the model
   registry.

Everything a restart needs lives under `tune.storage_path` (Tune's experiment state, fold results) and in the tracker
(runs found by key), so killing the driver and starting it again continues: Tune restores its trials with their
callbacks, finished folds are read back, and runs are re-opened instead of created twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from mer.components.ray_session import connect_ray
from mer.components.settings import Params
from mer.components.tracking import (
    EXPERIMENT_KEY_TAG,
    FINAL_MODEL_TAG,
    KIND_TAG,
    TRACKERS,
    DatasetInfo,
    Terminated,
    Tracker,
    config_hash,
    data_version,
    git_commit,
    make_tracker,
)
from mer.model.config import ModelConfig, PreprocessConfig
from mer.model.errors import NonFiniteError, ServiceError, StorageError
from mer.model.io import write_json
from mer.model.logging_utils import one_line_user_errors
from mer.model.training.data import SampleStore
from mer.model.training.folds import Fold
from mer.model.training.metrics import flat_metrics
from mer.model.training.protocols import leak_reasons, result_verdict, retrain_epochs, run_label
from mer.model.training.repeats import repeat_spread, spread_columns
from mer.model.training.results import ExperimentSummary, FoldSummary, Results, write_results
from mer.model.training.splits import inner_folds, make_folds
from mer.pipelines.engine.callbacks import (
    FoldProgress,
    RunInfo,
    TrackingCallback,
    failed_folds,
    leak_tags,
    log_pooled,
    stored_folds,
)
from mer.pipelines.engine.nested import NestedSearch, best_per_fold
from mer.pipelines.engine.preflight import check_experiment, setting_warnings
from mer.pipelines.engine.storage import FoldStorage, experiment_lock
from mer.pipelines.engine.tasks import run_final
from mer.pipelines.engine.trial import (
    OBJECTIVE,
    REPEAT_KEY,
    TrialContext,
    best_trial,
    search_folds,
    trial_params,
    trial_resources,
    trial_trainable,
    tune_domain,
    wait_for_fold_node,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def experiment_name(params: Params) -> str:
    """dataset x model x protocol (x split, when not loso), unless tune.experiment names it."""
    split = "" if params.train.split == "loso" else f"-{params.train.split}"
    return params.tune.experiment or f"{params.data.source}-{params.model.name}-{params.train.protocol}{split}"


def parent_run_name(name: str, protocol: str, leaky: bool, settings: str, ensemble: int = 1, repeats: int = 1,
                    nested: bool = False) -> str:
    """`<experiment> <protocol> [<K>-seed ensemble] [<N> repeats] [nested search] [<settings hash>]`, the protocol
    left out where the experiment's name already has it as a dash-separated part (the default names and `mer
    benchmark`'s do) -- only its leak marker stays."""
    label = ("(leaky)" if leaky else "") if protocol in name.split("-") else run_label(protocol, leaky)
    members = f"{ensemble}-seed ensemble" if ensemble > 1 else ""
    runs = f"{repeats} repeats" if repeats > 1 else ""
    return " ".join(part for part in (name, label, members, runs, "nested search" if nested else "",
                                      f"[{settings[:8]}]") if part)


def mark_verdict(tracker: Tracker, parent: str, name: str, protocol: str, leaky: bool, settings: str,
                 ensemble: int, repeats: int = 1, nested: bool = False) -> None:
    """The leak verdict of the configuration that trains the result, on the parent run: `protocol`/`leaky` tags and
    the run name's marker (the run is opened before a search that may change the verdict)."""
    for tag, value in leak_tags(protocol, leaky).items():
        tracker.set_tag(parent, tag, value)
    tracker.rename_run(parent, parent_run_name(name, protocol, leaky, settings, ensemble, repeats, nested))


def storage_root(params: Params) -> str:
    """`tune.storage_path/<experiment>` as an absolute local path or a URI (s3://...)."""
    path = params.tune.storage_path
    root = path if "://" in path else str(Path(path).resolve())
    return f"{root.rstrip('/')}/{experiment_name(params)}"


def _run_phase(phase: str, ctx: TrialContext, space: dict[str, Any], num_samples: int, concurrent: int,
               tune_root: str, callbacks: list[Any], searcher: Any = None) -> Any:
    """One Tuner (with `searcher`, a search maximising OBJECTIVE), restored from `tune_root/phase` when a previous
    driver left it unfinished (its callbacks and searcher come back with it from the experiment state); returns its
    ResultGrid."""
    trainable = tune.with_resources(tune.with_parameters(trial_trainable, ctx=ctx), trial_resources())
    path = f"{tune_root}/{phase}"
    if tune.Tuner.can_restore(path):
        log.info("%s: restoring the Tune experiment at %s", phase, path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=num_samples,
                                      max_concurrent_trials=concurrent,
                                      metric=OBJECTIVE if searcher is not None else None,
                                      mode="max" if searcher is not None else None)
        run_config = tune.RunConfig(name=phase, storage_path=tune_root, verbose=0, callbacks=callbacks,
                                    failure_config=tune.FailureConfig(max_failures=1))
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    # Tune's legacy output engine prints nothing at verbose=0; the new one still prints a banner and a TensorBoard
    # hint pointing into a temporary directory gone after the run. FoldProgress says what the user needs.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        grid = tuner.fit()
    except Exception as err:
        _raise_if_full(tune_root, err)
        raise
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        _raise_if_full(tune_root, errors[0])
        raise RuntimeError(f"{phase}: {len(errors)} trial(s) failed; first: {errors[0]}") from errors[0]
    if grid.num_terminated < num_samples:  # Tune stopped early (a stop signal): never reported as complete
        raise ServiceError(f"tune: the {phase} stopped after {grid.num_terminated} of {num_samples} trial(s); "
                           "run again to resume it")
    return grid


def _raise_if_full(tune_root: str, err: BaseException) -> None:
    """Tune writes its state, and trial errors, under tune.storage_path: when that disk is full it fails in its own
    ways (a 0-byte pickled error read back as EOFError), so the full disk is said instead."""
    if "://" not in tune_root and Path(tune_root).exists() and shutil.disk_usage(tune_root).free < FULL_BELOW:
        raise StorageError(f"tune.storage_path: {tune_root}: no space left on device; free space and run again (the "
                           "finished folds are kept)") from err


FULL_BELOW = 1 << 20  # bytes free under which a disk counts as full


# Ray Tune logs a failed trial and a failed state sync with a traceback: one line where it is a user error.
TUNE_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state")


def run_tune(params: Params, source: str = "mer tune") -> ExperimentSummary:
    """One tune run: search, score the chosen settings on the test folds and train the final model; writes
    `tune.results` and returns its summary. `source` names the command in the tracker."""
    cfg = params.tune
    check_experiment(params)  # outputs, cache entries, model: fail now, not after the whole run
    for warning in setting_warnings(params):
        log.warning("%s", warning)
    cache_dir = str(Path(params.preprocess.out).resolve())
    store = SampleStore.open(cache_dir)  # its entries were checked by check_experiment, before Ray starts
    folds = make_folds(params.train.split, store.index)
    version = data_version(cache_dir)
    name = experiment_name(params)
    protocol = params.train.protocol
    keyed = params.model_dump(mode="json", include={"seed", "model", "train", "tune", "data"})
    keyed["tune"] = {k: keyed["tune"][k] for k in ("num_samples", "search_space", "search_folds", "metric")}
    # Repeats and the nested search change what the experiment reports (their own parent run and Tune state); keyed
    # only when set, so experiments without them keep their keys. Stored folds are shared by fingerprint anyway.
    keyed["tune"] |= {k: v for k, v in (("repeats", cfg.repeats), ("nested", cfg.nested)) if v not in (1, False)}
    settings = config_hash([keyed, version])
    experiment_key = f"{name}-{settings}"
    tune_root = f"{storage_root(params)}/{experiment_key}"
    fold_store = f"{storage_root(params)}/folds"

    with experiment_lock(storage_root(params), experiment_key):  # one driver per experiment, else one line
        tracker = make_tracker(params.tracking, source)
        tracker.check()  # a tracking server that is down is one line now, before Ray starts
        private = connect_ray(cfg.ray_address)
        # Else folds would wait forever; a private local Ray never grows, so there it is said at once.
        wait_for_fold_node(cfg.fold_cpus, cfg.fold_gpus, 0 if private else cfg.fold_node_wait_s)
        tracker.fail_stale_runs(experiment_key)
        # One Ctrl-C is a SIGTERM: Ray Tune's own SIGINT handler would stop the search gracefully and let the
        # driver go on (final model, results, exit 0) with a truncated search.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        one_line_user_errors(*TUNE_LOGGERS)
        tracker.install_interrupt_handlers()
        try:
            base = {"data_version": version, "git_commit": git_commit(REPO), "experiment": name}
            # The settings hash in the name: two runs that differ in one setting are told apart in the MLflow UI's
            # run list, and a resumed run keeps its name. The leak verdict (tags, name) is set once the configuration
            # that trains the result is known, after the search (mark_verdict).
            parent, created = tracker.open_run(
                experiment_key, parent_run_name(name, protocol, False, settings, params.train.ensemble, cfg.repeats,
                                                cfg.nested),
                {KIND_TAG: "parent", EXPERIMENT_KEY_TAG: experiment_key, "dataset": params.data.source,
                 "model": params.model.name, "split": params.train.split, "data_version": version})
            if created:
                tracker.log_params_of(parent, params, base)
                with tempfile.TemporaryDirectory(prefix="mer-config-") as tmp:
                    tracker.log_config(parent, params, Path(tmp))
                tracker.log_dataset(parent, DatasetInfo(params.data.source, version, params.preprocess.out,
                                                        len(store.index), len(store.subjects())))
            info = RunInfo(experiment_key=experiment_key, parent_id=parent, base_params=base)
            common = dict(params=params.model_dump(mode="json", by_alias=True), cache_dir=cache_dir, storage=fold_store,
                          data_version=version, fold_cpus=cfg.fold_cpus, fold_gpus=cfg.fold_gpus,
                          max_retries=cfg.max_retries, metric=cfg.metric, search_keys=sorted(cfg.search_space),
                          fold_group_size=cfg.fold_group_size, folds_per_trial=cfg.folds_per_trial)
            log.info("%s: %d folds (%s), protocol %s, data %s, parent run %s", name, len(folds), params.train.split,
                     protocol, version, parent)

            chosen: dict[str, Any] = {}
            per_fold: dict[str, dict[str, Any]] = {}  # nested: outer fold -> {"chosen", "inner_score"}
            best_inner: float | None = None
            trials = 0
            space = {k: tune_domain(k, v) for k, v in cfg.search_space.items()}
            if cfg.num_samples > 0 and cfg.nested:
                per_fold = nested_search(params, folds, store, common, space, tune_root, tracker, info)
                best_inner = float(np.mean([f["inner_score"] for f in per_fold.values()]))
            elif cfg.num_samples > 0:
                ctx = TrialContext(phase="search", protocol="inner", folds=search_folds(folds, cfg.search_folds),
                                   **common)
                concurrent = min(cfg.max_concurrent_trials, cfg.num_samples)
                grid = _run_phase("search", ctx, space, cfg.num_samples, concurrent, tune_root,
                                  [TrackingCallback(tracker, info, ctx),
                                   FoldProgress("search", cfg.num_samples * len(ctx.folds))],
                                  OptunaSearch(metric=OBJECTIVE, mode="max", seed=params.seed))
                best = best_trial(grid)  # ties (tiny data: two trials at the same UF1) to the earliest trial
                if best is None:
                    raise NonFiniteError(f"search: none of the {cfg.num_samples} trials has an objective: every "
                                         "configuration had a fold that failed (see the log)")
                trials = grid.num_terminated  # what ran, not what was asked (_run_phase refuses fewer)
                chosen = {k: best.config[k] for k in sorted(cfg.search_space)}
                tracker.log_params(parent, {f"chosen.{k}": json.dumps(v) for k, v in chosen.items()})
                best_inner = float(best.metrics[OBJECTIVE])
                log.info("search: best inner %s %.4f with %s", cfg.metric, best_inner, chosen)
            if best_inner is not None:
                tracker.log_metrics(parent, [(f"search_{OBJECTIVE}", best_inner, 0)])

            # Every repeat's folds are trials of one phase, all in flight together (tune.repeats); repeat 0 is the
            # single run. A nested evaluation trains each fold with its own search's choice.
            ctx = TrialContext(phase="evaluate", protocol=protocol, folds=folds,
                               per_fold={k: v["chosen"] for k, v in per_fold.items()}, **common)
            resolved = trial_params(ctx.params, chosen, protocol)
            repeats = [{**chosen, **({REPEAT_KEY: r} if cfg.repeats > 1 else {})} for r in range(cfg.repeats)]
            jobs = [ctx.jobs(config) for config in repeats]
            # The verdict of the configurations the evaluation folds train with (what each fold job stores; a nested
            # fold's own choice included).
            leaky = any(job.leaky for js in jobs for job in js)
            mark_verdict(tracker, parent, name, protocol, leaky, settings, params.train.ensemble, cfg.repeats,
                         cfg.nested)
            keys = [[j.key for j in js] for js in jobs]
            reused = sum(FoldStorage(fold_store).summary(k) is not None for ks in keys for k in ks)
            if reused:  # said, not left to be inferred from the speed
                log.info("evaluate: %d of %d folds found stored (same settings and data version): read back, "
                         "not retrained", reused, sum(map(len, keys)))
            space = dict(chosen) | ({REPEAT_KEY: tune.grid_search(list(range(cfg.repeats)))} if cfg.repeats > 1
                                    else {})
            _run_phase("evaluate", ctx, space, 1, cfg.repeats, tune_root,
                       [TrackingCallback(tracker, info, ctx),
                        FoldProgress("evaluate", len(folds) * cfg.repeats)])
            runs = [stored_folds(fold_store, ks) for ks in keys]
            summaries, predictions = runs[0]
            failed = [{**f, **({"repeat": r} if cfg.repeats > 1 else {})}
                      for r, ks in enumerate(keys) for f in failed_folds(fold_store, ks)]
            if failed:  # reported and counted, never pooled
                log.warning("evaluate: %d of %d folds failed and are not pooled: %s", len(failed),
                            sum(map(len, keys)), "; ".join(f["error"] for f in failed))
                tracker.log_metrics(parent, [("failed_folds", len(failed), 0)])
            if not summaries:
                raise NonFiniteError(f"evaluate: every one of the {len(keys[0])} folds failed, nothing to pool "
                                     f"(first: {failed[0]['error'] if failed else 'no fold stored'})")
            class_names = summaries[0].class_names
            stored = result_verdict([s for run_summaries, _ in runs for s in run_summaries])  # every output reads it
            if stored != leaky:
                leaky = stored
                mark_verdict(tracker, parent, name, protocol, leaky, settings, params.train.ensemble, cfg.repeats,
                             cfg.nested)
            metrics = log_pooled(tracker, parent, predictions, class_names, f"{name} ({run_label(protocol, leaky)})",
                                 leaky, params.evaluate.intervals)
            spread = repeat_metrics(tracker, parent, runs, [ctx.resolved(c)[0].train.seed for c in repeats])
            if per_fold:
                for fold in summaries:
                    per_fold[fold.fold]["leaky"] = fold.leaky
                log_nested(tracker, parent, per_fold)

            # Why it is leaky, from the configurations that trained it (a nested search's folds may differ).
            reasons = list(dict.fromkeys(reason for js in jobs for job in js if job.leaky
                                         for reason in leak_reasons(protocol, ModelConfig(**job.model))))
            model_uri = None
            if cfg.final_model and cfg.nested:
                log.warning("tune.nested: no final model (each fold chose its own configuration; a nested run "
                            "estimates the search, the run without tune.nested trains the model)")
            elif cfg.final_model and tracker.stores_models:
                epochs = retrain_epochs(summaries)
                model_uri = final_model(params, resolved, store, epochs, tracker, parent, leaky)
            elif cfg.final_model:
                log.warning("tune.final_model: tracking.backend %s stores no model; no final model trained",
                            params.tracking.backend)

            keeps_runs = TRACKERS[params.tracking.backend].keeps_runs
            summary = ExperimentSummary(
                experiment=name, experiment_key=experiment_key, protocol=protocol, split=params.train.split,
                leaky=leaky, leak_reasons=reasons if leaky else [],
                class_names=list(class_names), chosen=chosen, metrics=metrics, data_version=version,
                folds=len(summaries), failed_folds=failed, model=resolved.model.model_dump(mode="json"),
                train=resolved.train.model_dump(mode="json"),
                search={"num_samples": cfg.num_samples, "search_folds": cfg.search_folds, "metric": cfg.metric,
                        "search_space": {k: v.model_dump(mode="json", exclude_none=True)
                                         for k, v in cfg.search_space.items()},
                        "best_inner_score": best_inner, "trials": trials, "nested": cfg.nested}
                if cfg.num_samples > 0 else {},
                chosen_per_fold=per_fold, repeats=spread,
                tracking_experiment=params.tracking.experiment if keeps_runs else None,
                parent_run_id=parent if keeps_runs else None, model_uri=model_uri)
            out = write_results(cfg.results, Results(summary, predictions, summaries))
            tracker.end_run(parent, "FINISHED")
            log.info("%s: UF1 %.4f UAR %.4f accuracy %.4f (%s) -> %s", name, metrics["uf1"], metrics["uar"],
                     metrics["accuracy"], run_label(protocol, leaky), out)
        except BaseException as err:
            # SIGTERM or SIGINT (Terminated): KILLED; anything else (a failed trial): FAILED.
            killed = isinstance(err, (KeyboardInterrupt, Terminated)) or tracker.terminated
            tracker.end_all("KILLED" if killed else "FAILED")
            if tracker.terminated and not isinstance(err, Terminated):
                # Ray turns the exception raised inside ray.get into its own SystemExit(1): exit as the signal says.
                raise Terminated(tracker.terminated_by) from err
            raise
    return summary


def nested_search(params: Params, folds: list[Fold], store: SampleStore, common: dict[str, Any],
                  space: dict[str, Any], tune_root: str, tracker: Tracker, info: RunInfo) -> dict[str, dict[str, Any]]:
    """tune.nested: for every evaluation fold, `tune.num_samples` Optuna trials on `tune.search_folds` folds drawn
    (by train.split) from that fold's training subjects only, scored like the plain search (mean inner validation
    score). All outer folds' trials are one Tune experiment (NestedSearch), so outer folds x trials x inner folds are
    fold tasks in flight together. Returns, per outer fold, its best trial's `chosen` values and `inner_score`."""
    cfg = params.tune
    inner = {f.name: search_folds(inner_folds(params.train.split, store.index, f), cfg.search_folds) for f in folds}
    ctx = TrialContext(phase="search", protocol="inner", folds=folds, inner=inner, **common)
    total = cfg.num_samples * len(folds)
    log.info("nested search: %d trials for each of %d folds on %d of its training subjects' folds (%d fold "
             "trainings)", cfg.num_samples, len(folds), cfg.search_folds,
             cfg.num_samples * sum(map(len, inner.values())))
    grid = _run_phase("search", ctx, space, total, min(cfg.max_concurrent_trials, total), tune_root,
                      [TrackingCallback(tracker, info, ctx),
                       FoldProgress("search", cfg.num_samples * sum(map(len, inner.values())))],
                      NestedSearch([f.name for f in folds], cfg.num_samples, params.seed))
    per_fold = best_per_fold(grid, list(cfg.search_space))
    for fold, best in per_fold.items():
        log.info("nested search: fold %s: best inner %s %.4f with %s", fold, cfg.metric, best["inner_score"],
                 best["chosen"])
    return per_fold


def log_nested(tracker: Tracker, parent: str, per_fold: dict[str, dict[str, Any]]) -> None:
    """The nested search's choice per outer fold (chosen values, inner score, the fold's stored leak verdict) as the
    parent run's `nested_search.json`; each fold run has its own as `chosen.*` params and a `nested.chosen` tag."""
    with tempfile.TemporaryDirectory(prefix="mer-nested-") as tmp:
        path = Path(tmp) / "nested_search.json"
        write_json(path, per_fold)
        tracker.log_files(parent, [path])


def repeat_metrics(tracker: Tracker, parent: str, runs: list[tuple[list[FoldSummary], pd.DataFrame]],
                   seeds: list[int]) -> dict[str, Any]:
    """tune.repeats > 1: each repeat's pooled metrics, their mean and sd (logged on the parent run as
    `<metric>_repeat_mean` / `<metric>_repeat_sd`, and `repeats`); a repeat whose folds all failed is left out
    (its failures are counted with the others); {} for a single run."""
    finished = [(run, seed) for run, seed in zip(runs, seeds, strict=True) if run[0]]  # not every fold failed
    if len(runs) < 2 or len(finished) < 2:
        return {}
    spread = repeat_spread([flat_metrics(p, s[0].class_names)[0] for (s, p), _ in finished],
                           [seed for _, seed in finished])
    tracker.log_metrics(parent, [(k, v, 0) for k, v in spread_columns(spread).items() if v is not None])
    log.info("repeats: UF1 %.4f +- %.4f, UAR %.4f +- %.4f over %d seeds %s", spread["uf1_mean"], spread["uf1_sd"],
             spread["uar_mean"], spread["uar_sd"], spread["n"], spread["seeds"])
    return spread


def final_model(params: Params, resolved: Params, store: SampleStore, epochs: int, tracker: Tracker, parent: str,
                leaky: bool) -> str | None:
    """Train on all subjects (a Ray task with a fold's resources) and log it to the parent run as the servable
    model (flagged `leaky` when its evaluation was); returns its URI. A model already logged by an earlier driver
    for this experiment key is reused."""
    existing = tracker.get_tag(parent, FINAL_MODEL_TAG)
    if existing:
        return existing
    log.info("final model: training %d epochs on all %d subjects", epochs, len(store.subjects()))
    task = ray.remote(run_final).options(num_cpus=params.tune.fold_cpus, num_gpus=params.tune.fold_gpus,
                                          max_retries=params.tune.max_retries)
    # A NonFiniteError of the task reaches the user as its one line through mer.model.errors.user_error, which
    # looks behind Ray's wrapper like for every other task error.
    model, history = ray.get(task.remote(resolved.model.model_dump(mode="json"),
                                         resolved.train.model_dump(mode="json"), store.root.as_posix(), epochs,
                                         max(1, int(params.tune.fold_cpus))))
    tracker.log_metrics(parent, [(f"final_{k}", v, int(entry["epoch"])) for entry in history
                                 for k, v in entry.items() if k != "epoch" and isinstance(v, (int, float))])
    # The model carries the class names, the training preprocessing and the leaky flag with the checkpoint, so
    # `mlflow models serve` and `mer predict` need nothing else from this run.
    uri = tracker.log_model(parent, model, store.class_names,
                            PreprocessConfig.model_validate(store.manifest["preprocess"]), leaky)
    if uri:
        tracker.set_tag(parent, FINAL_MODEL_TAG, uri)
        log.info("final model (%d epochs on %d subjects) logged as %s", epochs, len(store.subjects()), uri)
    return uri
