"""The Kubeflow pipeline (kfp v2): ingest -> preprocess -> tune -> evaluate -> register, one component per step,
generated from the stage declarations (pipelines/stages.py: the entries with `kubeflow`, in their order; their
artifacts, caching, Ray-job ability and resources).

Every step runs the project's own stage function (the one `mer <stage>` runs) in the project image, so a pipeline
run does exactly what `dvc repro` does locally. Steps live in separate pods; what one step produces reaches the next
as a KFP artifact (in KFP's object store, the pipeline root): a directory holding the step's outputs under their
params.yaml-relative paths (e.g. `data/preprocessed/...`) plus `paths.json` listing them. A step links its inputs'
paths into a fresh working directory, runs the stage there and moves its own outputs into its output artifact
(pipelines/kfp_steps.py) — the components stay unaware of Kubeflow.

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
Each step declares its CPU and memory requests (its KubeflowStep): the pods only drive or submit; the folds and the
per-clip work run on the Ray cluster.

    python -m mer.pipelines.kfp_pipeline --output infra/kubeflow/mer_pipeline.yaml     # `make pipeline-yaml`
"""

# No `from __future__ import annotations`: kfp reads the component signatures' annotations as real types.
import argparse
import linecache
import logging
import os
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from mer.pipelines.ray_jobs import DEFAULT_TIMEOUT_S
from mer.pipelines.stages import StageEntry, kubeflow_steps, upstream

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "mer-platform:0.1.0"
IMAGE = os.environ.get("MER_IMAGE", DEFAULT_IMAGE)
SHARED_VOLUME = "mer-data"  # the PVC of infra/k8s/data.yaml, also mounted by the RayCluster's pods
SHARED_SUBPATH = "kfp"
SHARED_MOUNT = "/mnt/mer-shared"

# A component's source, as KFP embeds it in the spec (a lightweight component: the image already holds kfp and the
# project, so KFP installs nothing at run time). Every step's body is the same: mer.pipelines.kfp_steps.run_component.
_SOURCE = """def {name}({signature}):
    values = dict(locals())
    from mer.pipelines.kfp_steps import run_component

    run_component({name!r}, values)
"""


def _inputs(entry: StageEntry) -> dict[str, str]:
    """The component's inputs and outputs by name -> annotation: the pipeline parameters it reads (a cached step
    nothing that changes per run: its key is the data version and the parameters), every earlier step's artifact,
    its own output artifact (and Metrics)."""
    step = entry.kubeflow
    names = {"params_file": "str", "overrides": "dict", "shared_dir": "str"}
    names |= {"data_version": "str"} if step.cached else {"run_id": "str", "tracking_uri": "str"}
    if step.ray_job:
        names |= {"ray_address": "str", "ray_dashboard": "str", "ray_job_timeout_s": "int"}
    names |= {up.kubeflow.artifact: f"Input[{up.kubeflow.kind}]" for up in upstream(entry.name)}
    names[step.artifact] = f"Output[{step.kind}]"
    if step.metrics:
        names["metrics"] = "Output[Metrics]"
    return names


def _component(entry: StageEntry) -> dsl.component:
    """The KFP component of a stage: its function's source generated (KFP reads the source of a lightweight
    component, so it is registered with linecache under a name of its own) and compiled."""
    signature = ", ".join(f"{name}: {annotation}" for name, annotation in _inputs(entry).items())
    source = _SOURCE.format(name=entry.name, signature=signature)
    filename = f"<kubeflow component {entry.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace = {"__name__": __name__, "Input": Input, "Output": Output, "Artifact": Artifact, "Dataset": Dataset,
                 "Model": Model, "Metrics": Metrics}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own template, names from STAGES
    return dsl.component(base_image=IMAGE, install_kfp_package=False)(namespace[entry.name])


COMPONENTS = {entry.name: _component(entry) for entry in kubeflow_steps()}


def _configure(task: dsl.PipelineTask, entry: StageEntry, shared_volume: str) -> dsl.PipelineTask:
    """Resources, caching and the shared volume of one step's task."""
    step = entry.kubeflow
    task.set_cpu_request(step.cpu).set_memory_request(step.memory).set_caching_options(step.cached)
    kubernetes.mount_pvc(task, pvc_name=shared_volume, mount_path=SHARED_MOUNT, sub_path=SHARED_SUBPATH)
    return task


@dsl.pipeline(name="mer-loso", description="Micro-expression recognition: LOSO experiment and model registration")
def mer_pipeline(params_file: str = "params.yaml", overrides: dict = {}, data_version: str = "",  # noqa: B006
                 tracking_uri: str = "", ray_address: str = "", ray_dashboard: str = "",
                 ray_job_timeout_s: int = DEFAULT_TIMEOUT_S, shared_volume: str = SHARED_VOLUME,
                 shared_dir: str = SHARED_MOUNT):
    values = dict(params_file=params_file, overrides=overrides, shared_dir=shared_dir, data_version=data_version,
                  run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, tracking_uri=tracking_uri, ray_address=ray_address,
                  ray_dashboard=ray_dashboard, ray_job_timeout_s=ray_job_timeout_s)
    for entry in kubeflow_steps():
        wanted = _inputs(entry)
        task = COMPONENTS[entry.name](**{name: value for name, value in values.items() if name in wanted})
        _configure(task, entry, shared_volume)
        values[entry.kubeflow.artifact] = task.outputs[entry.kubeflow.artifact]


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
