"""The Kubeflow pipeline (kfp v2): ingest -> preprocess -> tune -> evaluate -> register, one step per component.

Every step runs the project's own `mer <component>` in the project image, so a pipeline run does exactly what
`dvc repro` does locally. Steps live in separate pods; what one step produces reaches the next as a KFP artifact (in
KFP's object store, the pipeline root): a directory holding the step's outputs under their params.yaml-relative paths
(e.g. `data/preprocessed/...`) plus `paths.json` listing them. A step links its inputs' paths into a fresh working
directory, runs the component there and moves its own outputs into its output artifact (pipelines/kfp_steps.py) —
the components stay unaware of Kubeflow.

Where the work runs on the Ray cluster (a Ray job, not the step's pod), the working directory must be one the Ray
pods see at the same path: every step mounts the shared volume `shared_volume` (a ReadWriteMany PVC; subPath
`kfp`, infra/k8s/data.yaml) at SHARED_MOUNT, as the RayCluster's pods do (infra/kuberay/raycluster.yaml), and
works in `shared_dir` (SHARED_MOUNT; empty = the pod's temp dir, e.g. KFP's local runner).

Pipeline parameters mirror params.yaml: `params_file` (in the image; relative paths are relative to the project
root) and `overrides`, dotted keys exactly like `mer ... -S key=value` (validated, a typo names the key);
`data_version` names the data (e.g. the DVC hash of the dataset, `dvc data status` / the .dvc file's md5): ingest
and preprocess are deterministic functions of it and of the parameters, so KFP caches them by it (a run with the
same data version and parameters reuses their outputs); tune, evaluate and register are never cached (they train,
track and register, keyed by the run). The cluster settings sit beside them: `tracking_uri` (sets
MLFLOW_TRACKING_URI), `ray_dashboard` (the cluster's job server, e.g.
`http://mer-raycluster-head-svc.mer.svc.cluster.local:8265`: preprocess and tune are submitted there as Ray jobs,
as Ray advises, pipelines/ray_jobs.py), `ray_job_timeout_s` (how long a step waits for its job) and `ray_address`
(without `ray_dashboard` only: the Ray cluster that the step's own process joins; none = local Ray in the pod).
Each step declares its CPU and memory requests (STEP_RESOURCES): the pods only drive or submit; the folds and the
per-clip work run on the Ray cluster.

    python -m pipelines.kfp_pipeline --output infra/kubeflow/mer_pipeline.yaml     # `make pipeline-yaml`
"""

# No `from __future__ import annotations`: kfp reads the component signatures' annotations as real types.
import argparse
import logging
import os
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from pipelines.ray_jobs import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "mer-platform:0.1.0"
IMAGE = os.environ.get("MER_IMAGE", DEFAULT_IMAGE)
SHARED_VOLUME = "mer-data"  # the PVC of infra/k8s/data.yaml, also mounted by the RayCluster's pods
SHARED_SUBPATH = "kfp"
SHARED_MOUNT = "/mnt/mer-shared"
# (CPU, memory) requests per step. Without a Ray job server, preprocess and tune run their work in the pod (local Ray)
# and want more: give them a `ray_dashboard` on a cluster.
STEP_RESOURCES = {"ingest": ("1", "2G"), "preprocess": ("2", "4G"), "tune": ("1", "4G"), "evaluate": ("1", "2G"),
                  "register": ("1", "4G")}
CACHED_STEPS = ("ingest", "preprocess")  # deterministic in (data_version, parameters)


# Lightweight components: the image already holds kfp and the project, so KFP installs nothing at run time.
_component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@_component
def ingest(params_file: str, overrides: dict, data_version: str, shared_dir: str, ingested: Output[Dataset]):
    from pipelines.kfp_steps import data_key, run_step

    run_step("ingest", data_key(params_file, overrides, data_version), params_file, overrides, "", "", [],
             ingested.path, shared_dir=shared_dir)


@_component
def preprocess(params_file: str, overrides: dict, data_version: str, shared_dir: str, ray_address: str,
               ray_dashboard: str, ray_job_timeout_s: int, ingested: Input[Dataset], preprocessed: Output[Dataset]):
    from pipelines.kfp_steps import data_key, run_step

    run_step("preprocess", data_key(params_file, overrides, data_version), params_file, overrides, "", ray_address,
             [ingested.path], preprocessed.path, ray_dashboard=ray_dashboard, ray_job_timeout_s=ray_job_timeout_s,
             shared_dir=shared_dir)


@_component
def tune(run_id: str, params_file: str, overrides: dict, tracking_uri: str, ray_address: str, ray_dashboard: str,
         ray_job_timeout_s: int, shared_dir: str, ingested: Input[Dataset], preprocessed: Input[Dataset],
         tuned: Output[Model]):
    from pipelines.kfp_steps import run_step

    run_step("tune", run_id, params_file, overrides, tracking_uri, ray_address,
             [ingested.path, preprocessed.path], tuned.path, ray_dashboard=ray_dashboard,
             ray_job_timeout_s=ray_job_timeout_s, shared_dir=shared_dir)


@_component
def evaluate(run_id: str, params_file: str, overrides: dict, tracking_uri: str, shared_dir: str,
             ingested: Input[Dataset], preprocessed: Input[Dataset], tuned: Input[Model], evaluation: Output[Dataset],
             metrics: Output[Metrics]):
    from pipelines.kfp_steps import log_metrics, resolve_params, run_step

    run_step("evaluate", run_id, params_file, overrides, tracking_uri, "",
             [ingested.path, preprocessed.path, tuned.path], evaluation.path, shared_dir=shared_dir)
    _, params = resolve_params(params_file, overrides, "")
    log_metrics(evaluation.path, params.evaluate.metrics, metrics)


@_component
def register(run_id: str, params_file: str, overrides: dict, tracking_uri: str, shared_dir: str,
             ingested: Input[Dataset], preprocessed: Input[Dataset], tuned: Input[Model], evaluation: Input[Dataset],
             registered: Output[Artifact]):
    from pipelines.kfp_steps import run_step

    run_step("register", run_id, params_file, overrides, tracking_uri, "",
             [ingested.path, preprocessed.path, tuned.path, evaluation.path], registered.path, shared_dir=shared_dir)


def _configure(task: dsl.PipelineTask, step: str, shared_volume: str) -> dsl.PipelineTask:
    """Resources, caching and the shared volume of one step's task."""
    cpu, memory = STEP_RESOURCES[step]
    task.set_cpu_request(cpu).set_memory_request(memory).set_caching_options(step in CACHED_STEPS)
    kubernetes.mount_pvc(task, pvc_name=shared_volume, mount_path=SHARED_MOUNT, sub_path=SHARED_SUBPATH)
    return task


@dsl.pipeline(name="mer-loso", description="Micro-expression recognition: LOSO experiment and model registration")
def mer_pipeline(params_file: str = "params.yaml", overrides: dict = {}, data_version: str = "",  # noqa: B006
                 tracking_uri: str = "", ray_address: str = "", ray_dashboard: str = "",
                 ray_job_timeout_s: int = DEFAULT_TIMEOUT_S, shared_volume: str = SHARED_VOLUME,
                 shared_dir: str = SHARED_MOUNT):
    data = dict(params_file=params_file, overrides=overrides, shared_dir=shared_dir)
    run = dict(data, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, tracking_uri=tracking_uri)
    jobs = dict(ray_address=ray_address, ray_dashboard=ray_dashboard, ray_job_timeout_s=ray_job_timeout_s)
    ingest_task = _configure(ingest(**data, data_version=data_version), "ingest", shared_volume)
    ingested = ingest_task.outputs["ingested"]
    preprocess_task = _configure(preprocess(**data, **jobs, data_version=data_version, ingested=ingested),
                                 "preprocess", shared_volume)
    preprocessed = preprocess_task.outputs["preprocessed"]
    tune_task = _configure(tune(**run, **jobs, ingested=ingested, preprocessed=preprocessed), "tune", shared_volume)
    evaluate_task = _configure(evaluate(**run, ingested=ingested, preprocessed=preprocessed,
                                        tuned=tune_task.outputs["tuned"]), "evaluate", shared_volume)
    _configure(register(**run, ingested=ingested, preprocessed=preprocessed, tuned=tune_task.outputs["tuned"],
                        evaluation=evaluate_task.outputs["evaluation"]), "register", shared_volume)


def compile_pipeline(output: str | Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(mer_pipeline, str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="infra/kubeflow/mer_pipeline.yaml", help="compiled pipeline YAML")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.info("compiled %s (image %s)", compile_pipeline(args.output), IMAGE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
