"""The LOSO experiment driver on Ray Tune: search -> honest evaluation -> final model, tracked in MLflow.

    python -m pipelines.loso --params params.yaml [-S key=value ...]             # laptop: local Ray
    ray job submit --working-dir . -- python -m pipelines.loso --params params.yaml  # cluster: the job's Ray
    mer tune                                                                     # the DVC stage

1. Search (`tune.num_samples` > 0): Optuna through Ray Tune's OptunaSearch over `tune.search_space`. A trial is one
   configuration trained on `tune.search_folds` LOSO folds under the `inner` protocol; its objective is the mean INNER
   validation score (validation subjects drawn from each fold's training subjects). No test fold is ever looked at.
2. Evaluation: the chosen configuration (or params.yaml's, without a search) on every LOSO fold under
   `train.protocol` (fixed | inner | oracle, the last tagged leaky); pooled test predictions -> `tune.results`.
3. Final model (`tune.final_model`): trained on all subjects, logged as this platform's MLflow pyfunc
   (`components.pyfunc.log_pyfunc_model`: servable with `mlflow models serve`); `mer register` puts it in the model
   registry.

Everything a restart needs lives under `tune.storage_path` (Tune's experiment state, fold results, the final model),
so killing the driver and starting it again continues: Tune restores its trials, finished folds are read back, and
MLflow runs are found by their `mer.key` tag instead of created twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from components import tracking
from components.common import add_params_arguments, check_output_dir, params_from_args
from components.pyfunc import log_pyfunc_model
from components.report import reads_annotated_aus
from components.tune import (
    OBJECTIVE,
    FoldProgress,
    FoldStorage,
    MlflowCallback,
    RunInfo,
    TrialContext,
    fold_jobs,
    fold_resources,
    fold_slots,
    is_leaky,
    leaky_tags,
    log_pooled,
    pooled_predictions,
    run_final,
    run_label,
    trial_params,
    trial_trainable,
)
from mer_model.config import Params, PreprocessConfig, SearchParam
from mer_model.errors import ConfigError, MerError
from mer_model.logging_utils import setup_logging
from mer_model.training.folds import Fold, loso_folds
from components.ray_session import connect_ray

log = logging.getLogger("pipelines.loso")


def experiment_name(params: Params) -> str:
    """dataset x model x protocol, unless tune.experiment names it."""
    return params.tune.experiment or f"{params.data.source}-{params.model.name}-{params.train.protocol}"


def storage_root(params: Params) -> str:
    """`tune.storage_path/<experiment>` as an absolute local path or a URI (s3://...)."""
    path = params.tune.storage_path
    root = path if "://" in path else str(Path(path).resolve())
    return f"{root.rstrip('/')}/{experiment_name(params)}"


def search_folds(folds: list[Fold], count: int) -> list[Fold]:
    """`count` LOSO folds spread evenly over the subject order (deterministic)."""
    count = min(count, len(folds))
    return [folds[(i * len(folds)) // count] for i in range(count)]


def tune_domain(name: str, spec: SearchParam) -> Any:
    from ray import tune

    if spec.type == "choice":
        if not spec.values:
            raise ConfigError(f"tune.search_space.{name}: a choice needs values")
        return tune.choice(spec.values)
    if spec.low is None or spec.high is None or spec.low >= spec.high:
        raise ConfigError(f"tune.search_space.{name}: needs low < high")
    if spec.type == "loguniform":
        return tune.loguniform(spec.low, spec.high)
    if spec.type == "int":
        return tune.randint(int(spec.low), int(spec.high) + 1)
    return tune.uniform(spec.low, spec.high)


def _run_phase(phase: str, ctx: TrialContext, space: dict[str, Any], num_samples: int, concurrent: int,
               bundles: int, tune_root: str, callback: Any, seed: int) -> Any:
    """One Tuner (restored from `tune_root/phase` when a previous driver left it unfinished); returns its ResultGrid."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_resources(tune.with_parameters(trial_trainable, ctx=ctx),
                                    fold_resources(ctx.fold_cpus, ctx.fold_gpus, bundles))
    path = f"{tune_root}/{phase}"
    if tune.Tuner.can_restore(path):
        log.info("%s: restoring the Tune experiment at %s", phase, path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        searcher = OptunaSearch(metric=OBJECTIVE, mode="max", seed=seed) if phase == "search" else None
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=num_samples,
                                      max_concurrent_trials=concurrent,
                                      metric=OBJECTIVE if phase == "search" else None,
                                      mode="max" if phase == "search" else None)
        run_config = tune.RunConfig(name=phase, storage_path=tune_root, verbose=0,
                                    failure_config=tune.FailureConfig(max_failures=1))
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    # The MLflow callback holds live clients and cannot be pickled into tuner.pkl (written when the Tuner is built
    # and read by Tuner.restore), so it is attached after construction, on a fresh and on a restored Tuner alike.
    tuner._local_tuner.get_run_config().callbacks = [callback, FoldProgress(phase, num_samples * len(ctx.folds))]
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{phase}: {len(errors)} trial(s) failed; first: {errors[0]}")
    return grid


def run_experiment(params: Params) -> dict[str, Any]:
    """Search, evaluate and train the final model; writes `tune.results` and returns its summary."""
    import ray

    from mer_model.training.data import SampleStore

    cfg = params.tune
    # Also validates model.name/config/kwargs: an unknown model fails here, before the cache, Ray or MLflow.
    leaks = reads_annotated_aus(params.model)  # annotated AUs as input: leaky like the oracle protocol
    check_output_dir(cfg.results, "tune.results")  # fail now, not after the whole LOSO run
    if "://" not in cfg.storage_path:
        check_output_dir(cfg.storage_path, "tune.storage_path")
    cache_dir = str(Path(params.preprocess.out).resolve())
    store = SampleStore.open(cache_dir)
    folds = loso_folds(store.index)
    version = tracking.data_version(cache_dir)
    name = experiment_name(params)
    protocol = params.train.protocol
    keyed = params.model_dump(mode="json", include={"seed", "model", "train", "tune", "data"})
    keyed["tune"] = {k: keyed["tune"][k] for k in ("num_samples", "search_space", "search_folds", "metric")}
    experiment_key = f"{name}-{tracking.config_hash([keyed, version])}"
    root = storage_root(params)
    tune_root = f"{root}/{experiment_key}"
    fold_store = f"{root}/folds"

    connect_ray(cfg.ray_address)
    slots = fold_slots(ray.cluster_resources(), cfg.fold_cpus, cfg.fold_gpus)

    client, experiment_id = tracking.connect(params.tracking)
    tracking.fail_stale_runs(client, experiment_id, experiment_key)
    runs = tracking.OpenRuns(client)
    runs.install_sigterm_handler()
    artifacts_dir = Path(tempfile.mkdtemp(prefix="mer-mlflow-"))  # staging only: MLflow copies artifacts away
    try:
        base = {"data_version": version, "git_commit": tracking.git_commit(Path(__file__).resolve().parents[1]),
                "experiment": name}
        parent_id, created = tracking.get_or_create_run(
            client, experiment_id, experiment_key, f"{name} {run_label(protocol, leaks)}",
            {tracking.KIND_TAG: "parent", tracking.EXPERIMENT_KEY_TAG: experiment_key, "dataset": params.data.source,
             "model": params.model.name, "data_version": version, **leaky_tags(protocol, leaks)})
        runs.add(parent_id)
        if created:
            tracking.log_params(client, parent_id, tracking.run_params(params, base))
            tracking.log_config_artifact(client, parent_id, params, artifacts_dir / parent_id)
        info = RunInfo(experiment_key=experiment_key, parent_id=parent_id, protocol=protocol,
                       base_params=base, artifacts_dir=artifacts_dir)
        common = dict(params=params.model_dump(mode="json", by_alias=True), cache_dir=cache_dir, storage=fold_store,
                      data_version=version, fold_cpus=cfg.fold_cpus, fold_gpus=cfg.fold_gpus,
                      max_retries=cfg.max_retries, metric=cfg.metric, search_keys=sorted(cfg.search_space))
        log.info("%s: %d subjects, protocol %s, data %s, MLflow parent run %s", name, len(folds), protocol, version,
                 parent_id)

        chosen: dict[str, Any] = {}
        if cfg.num_samples > 0:
            if not cfg.search_space:
                raise ConfigError("tune.search_space: empty, but tune.num_samples > 0")
            ctx = TrialContext(phase="search", protocol="inner", folds=search_folds(folds, cfg.search_folds), **common)
            space = {k: tune_domain(k, v) for k, v in cfg.search_space.items()}
            concurrent = min(cfg.max_concurrent_trials, cfg.num_samples)
            bundles = cfg.folds_per_trial or max(1, min(len(ctx.folds), slots // concurrent))
            grid = _run_phase("search", ctx, space, cfg.num_samples, concurrent, bundles, tune_root,
                              MlflowCallback(client, experiment_id, runs, info, ctx, params), params.seed)
            best = grid.get_best_result(metric=OBJECTIVE, mode="max")
            chosen = {k: best.config[k] for k in sorted(cfg.search_space)}
            tracking.log_params(client, parent_id, {f"chosen.{k}": json.dumps(v) for k, v in chosen.items()})
            tracking.log_metrics(client, parent_id, {f"search_{OBJECTIVE}": best.metrics[OBJECTIVE]})
            log.info("search: best inner %s %.4f with %s", cfg.metric, best.metrics[OBJECTIVE], chosen)

        ctx = TrialContext(phase="evaluate", protocol=protocol, folds=folds, **common)
        bundles = cfg.folds_per_trial or max(1, min(len(folds), slots))
        _run_phase("evaluate", ctx, dict(chosen), 1, 1, bundles, tune_root,
                   MlflowCallback(client, experiment_id, runs, info, ctx, params), params.seed)
        resolved = trial_params(ctx.params, chosen, protocol)
        jobs = fold_jobs(ctx, resolved)
        storage = FoldStorage(fold_store)
        predictions, class_names = pooled_predictions(storage, jobs)
        metrics = log_pooled(client, parent_id, (predictions, class_names), artifacts_dir / parent_id,
                             f"{name} ({run_label(protocol, leaks)})")

        model_uri = None
        if cfg.final_model:
            epochs = [storage.load(j.key)["selected_epoch"] for j in jobs]  # type: ignore[index]
            model_uri = final_model(params, resolved, store, int(statistics.median(epochs)), client, parent_id,
                                    leaky=is_leaky(protocol, resolved.model))

        summary = {
            "experiment": name, "experiment_key": experiment_key, "protocol": protocol,
            "leaky": is_leaky(protocol, resolved.model),
            "class_names": class_names, "chosen": chosen, "metrics": metrics, "data_version": version,
            "mlflow_experiment": params.tracking.experiment, "parent_run_id": parent_id, "model_uri": model_uri,
            "folds": len(jobs),
        }
        out = Path(cfg.results)
        out.mkdir(parents=True, exist_ok=True)
        predictions.to_csv(out / "predictions.csv", index=False)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        runs.end(parent_id, "FINISHED")
        log.info("%s: UF1 %.4f UAR %.4f accuracy %.4f (%s) -> %s", name, metrics["uf1"], metrics["uar"],
                 metrics["accuracy"], run_label(protocol, leaks), out)
    except BaseException as err:
        # A SIGTERM has already ended the runs as KILLED; anything else (a failed trial, Ctrl-C) ends them here.
        runs.end_all("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        shutil.rmtree(artifacts_dir, ignore_errors=True)
    return summary


def final_model(params: Params, resolved: Params, store: Any, epochs: int, client: Any, parent_id: str,
                leaky: bool) -> str:
    """Train on all subjects (a Ray task with a fold's resources), log it to the parent run as the servable pyfunc
    (flagged `leaky` when its evaluation was); returns its model URI. A model already logged by an earlier driver for
    this experiment key is reused."""
    import mlflow
    import ray

    tag = "mer.final_model_uri"
    existing = client.get_run(parent_id).data.tags.get(tag)
    if existing:
        return existing
    log.info("final model: training %d epochs on all %d subjects", epochs, len(store.subjects()))
    task = ray.remote(run_final).options(num_cpus=params.tune.fold_cpus, num_gpus=params.tune.fold_gpus,
                                          max_retries=params.tune.max_retries)
    model, history = ray.get(task.remote(resolved.model.model_dump(mode="json"),
                                         resolved.train.model_dump(mode="json"), store.root.as_posix(), epochs,
                                         max(1, int(params.tune.fold_cpus))))
    for entry in history:
        tracking.log_metrics(client, parent_id, {f"final_{k}": v for k, v in entry.items()
                                                 if k != "epoch" and isinstance(v, (int, float))},
                             step=int(entry["epoch"]))

    with mlflow.start_run(run_id=parent_id):
        # The pyfunc carries the class names, the training preprocessing and the leaky flag with the checkpoint, so
        # `mlflow models serve` and `mer predict` need nothing else from this run.
        info = log_pyfunc_model(model, store.class_names, PreprocessConfig.model_validate(store.manifest["preprocess"]),
                                name="final_model", leaky=leaky)
    client.set_tag(parent_id, tag, info.model_uri)
    log.info("final model (%d epochs on %d subjects) logged as %s", epochs, len(store.subjects()), info.model_uri)
    return info.model_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.loso", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        run_experiment(params_from_args(args))
    except MerError as err:
        print(f"pipelines.loso: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
