"""The Kubeflow pipeline (kfp v2): ingest -> preprocess -> tune -> evaluate -> register, one step per component.

Every step runs the project's own `mer <component>` in the project image, so a pipeline run does exactly what
`dvc repro` does locally. Steps live in separate pods; what one step produces reaches the next as a KFP artifact:
a directory holding the step's outputs under their params.yaml-relative paths (e.g. `data/preprocessed/...`) plus
`paths.json` listing them. A step links its inputs' paths into a fresh working directory, runs the component there
and moves its own outputs into its output artifact (pipelines/kfp_steps.py) — the components stay unaware of Kubeflow.

Pipeline parameters mirror params.yaml: `params_file` (in the image; relative paths are relative to the project
root) and `overrides`, dotted keys exactly like `mer ... -S key=value` (validated, a typo names the key). The
cluster settings sit beside them: `tracking_uri` (sets MLFLOW_TRACKING_URI), `ray_address` (the RayCluster the
preprocess step's tasks run on, e.g. `ray://mer-raycluster-head-svc.mer.svc.cluster.local:10001`), `ray_dashboard`
(the cluster's job server, e.g. `http://mer-raycluster-head-svc.mer.svc.cluster.local:8265`: the tune step submits
the LOSO driver there as a Ray job, as Ray advises for Ray Tune, instead of driving Tune through Ray Client) and
`ray_job_timeout_s` (how long the tune step waits for that job). Without `ray_dashboard` the tune step runs the
driver in its own pod, joining `ray_address` if given, local Ray otherwise.

    python -m pipelines.kfp_pipeline --output infra/kubeflow/mer_pipeline.yaml     # `make pipeline-yaml`
"""

# No `from __future__ import annotations`: kfp reads the component signatures' annotations as real types.
import argparse
import logging
import os
from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from pipelines.ray_jobs import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "mer-platform:0.1.0"
IMAGE = os.environ.get("MER_IMAGE", DEFAULT_IMAGE)


# Lightweight components: the image already holds kfp and the project, so KFP installs nothing at run time.
_component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@_component
def ingest(run_id: str, params_file: str, overrides: dict, tracking_uri: str, ray_address: str,
           ingested: Output[Dataset]):
    from pipelines.kfp_steps import run_step

    run_step("ingest", run_id, params_file, overrides, tracking_uri, ray_address, [], ingested.path)


@_component
def preprocess(run_id: str, params_file: str, overrides: dict, tracking_uri: str, ray_address: str,
               ingested: Input[Dataset],
               preprocessed: Output[Dataset]):
    from pipelines.kfp_steps import run_step

    run_step("preprocess", run_id, params_file, overrides, tracking_uri, ray_address, [ingested.path],
             preprocessed.path)


@_component
def tune(run_id: str, params_file: str, overrides: dict, tracking_uri: str, ray_address: str, ray_dashboard: str,
         ray_job_timeout_s: int, ingested: Input[Dataset], preprocessed: Input[Dataset], tuned: Output[Model]):
    from pipelines.kfp_steps import run_step

    run_step("tune", run_id, params_file, overrides, tracking_uri, ray_address,
             [ingested.path, preprocessed.path], tuned.path, ray_dashboard=ray_dashboard,
             ray_job_timeout_s=ray_job_timeout_s)


@_component
def evaluate(run_id: str, params_file: str, overrides: dict, tracking_uri: str, ray_address: str,
             ingested: Input[Dataset],
             preprocessed: Input[Dataset], tuned: Input[Model], evaluation: Output[Dataset],
             metrics: Output[Metrics]):
    from pipelines.kfp_steps import log_metrics, resolve_params, run_step

    run_step("evaluate", run_id, params_file, overrides, tracking_uri, ray_address,
             [ingested.path, preprocessed.path, tuned.path], evaluation.path)
    _, params = resolve_params(params_file, overrides, ray_address)
    log_metrics(evaluation.path, params.evaluate.metrics, metrics)


@_component
def register(run_id: str, params_file: str, overrides: dict, tracking_uri: str, ray_address: str,
             ingested: Input[Dataset],
             preprocessed: Input[Dataset], tuned: Input[Model], evaluation: Input[Dataset],
             registered: Output[Artifact]):
    from pipelines.kfp_steps import run_step

    run_step("register", run_id, params_file, overrides, tracking_uri, ray_address,
             [ingested.path, preprocessed.path, tuned.path, evaluation.path], registered.path)


@dsl.pipeline(name="mer-loso", description="Micro-expression recognition: LOSO experiment and model registration")
def mer_pipeline(params_file: str = "params.yaml", overrides: dict = {}, tracking_uri: str = "",  # noqa: B006
                 ray_address: str = "", ray_dashboard: str = "", ray_job_timeout_s: int = DEFAULT_TIMEOUT_S):
    common = dict(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, params_file=params_file, overrides=overrides,
                  tracking_uri=tracking_uri, ray_address=ray_address)
    ingest_task = ingest(**common)
    preprocess_task = preprocess(**common, ingested=ingest_task.outputs["ingested"])
    tune_task = tune(**common, ray_dashboard=ray_dashboard, ray_job_timeout_s=ray_job_timeout_s,
                     ingested=ingest_task.outputs["ingested"],
                     preprocessed=preprocess_task.outputs["preprocessed"])
    evaluate_task = evaluate(**common, ingested=ingest_task.outputs["ingested"],
                             preprocessed=preprocess_task.outputs["preprocessed"], tuned=tune_task.outputs["tuned"])
    register(**common, ingested=ingest_task.outputs["ingested"], preprocessed=preprocess_task.outputs["preprocessed"],
             tuned=tune_task.outputs["tuned"], evaluation=evaluate_task.outputs["evaluation"])


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
