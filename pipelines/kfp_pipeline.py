"""The Kubeflow pipeline (kfp v2): ingest -> preprocess -> tune -> evaluate -> register, one step per component.

Every step runs the project's own `mer <component>` in the project image, so a pipeline run does exactly what
`dvc repro` does locally. Steps live in separate pods; what one step produces reaches the next as a KFP artifact:
a directory holding the step's outputs under their params.yaml-relative paths (e.g. `data/preprocessed/...`) plus
`paths.json` listing them. A step links its inputs' paths into a fresh working directory, runs the component there
and moves its own outputs into its output artifact — the components stay unaware of Kubeflow.

Pipeline parameters mirror params.yaml: `params_file` (in the image; relative paths are relative to the project
root) and `overrides`, dotted keys exactly like `mer ... -S key=value` (validated, a typo names the key). Two
cluster settings sit beside them: `tracking_uri` (sets MLFLOW_TRACKING_URI) and `ray_address` (the RayCluster the
preprocess and tune steps connect to, e.g. `ray://mer-raycluster-head-svc.mer.svc.cluster.local:10001`).

    python -m pipelines.kfp_pipeline --output infra/kubeflow/mer_pipeline.yaml     # `make pipeline-yaml`
"""

# No `from __future__ import annotations`: kfp reads the component signatures' annotations as real types.
import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from mer_model.config import Params, parse_params, set_dotted
from mer_model.errors import ConfigError, MerError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = "mer-platform:0.1.0"
IMAGE = os.environ.get("MER_IMAGE", DEFAULT_IMAGE)
PATHS_FILE = "paths.json"


def resolve_params(params_file: str, overrides: dict[str, Any], ray_address: str) -> tuple[dict[str, Any], Params]:
    """params.yaml with the run's overrides applied and validated; `ray_address` goes to every Ray-using section."""
    path = Path(params_file)
    path = path if path.is_absolute() else PROJECT_ROOT / path
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    if ray_address:
        set_dotted(raw, "preprocess.ray_address", ray_address)
        set_dotted(raw, "tune.ray_address", ray_address)
    return raw, parse_params(raw, f"{path} + overrides")


def step_outputs(step: str, params: Params) -> list[str]:
    """The params-relative paths a step produces (what its output artifact carries)."""
    if step == "ingest":
        produced = [str(Path(params.data.ingested).parent)]
        if params.data.source == "synthetic":
            produced.insert(0, params.synth.out)
        return produced
    if step == "preprocess":
        return [params.preprocess.out]
    if step == "tune":
        local_state = [] if "://" in params.tune.storage_path else [params.tune.storage_path]
        return [params.tune.results, *local_state]
    if step == "evaluate":
        return [params.evaluate.metrics, params.evaluate.plots]
    if step == "register":
        return [params.tracking.registered_info]
    raise ValueError(f"unknown pipeline step {step!r}")


def _link_inputs(inputs: list[str], workdir: Path) -> None:
    for artifact in map(Path, inputs):
        for rel in json.loads((artifact / PATHS_FILE).read_text()):
            target = workdir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(artifact / rel)


def _collect_outputs(paths: list[str], workdir: Path, output: str) -> None:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    present = [rel for rel in paths if (workdir / rel).exists()]
    missing = sorted(set(paths) - set(present))
    if missing:
        log.warning("step produced no %s", ", ".join(missing))
    for rel in present:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(workdir / rel), str(out / rel))
    (out / PATHS_FILE).write_text(json.dumps(present))


def run_step(step: str, params_file: str, overrides: dict[str, Any], tracking_uri: str, ray_address: str,
             inputs: list[str], output: str) -> None:
    """Run `mer <step>` (and `mer synth` before a synthetic ingest) in a fresh working directory."""
    from components.cli import main as mer

    raw, params = resolve_params(params_file, overrides, ray_address)
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    workdir = Path(tempfile.mkdtemp(prefix=f"mer-{step}-"))
    cwd = Path.cwd()
    try:
        (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        _link_inputs(inputs, workdir)
        os.chdir(workdir)
        commands = (["synth"] if step == "ingest" and params.data.source == "synthetic" else []) + [step]
        for command in commands:
            log.info("kfp step %s: mer %s", step, command)
            code = mer([command, "--params", "params.yaml"])
            if code:
                raise MerError(f"mer {command} exited with {code}")
        _collect_outputs(step_outputs(step, params), workdir, output)
    finally:
        os.chdir(cwd)
        shutil.rmtree(workdir, ignore_errors=True)


def log_metrics(metrics_dir: str, metrics_file: str, sink: Any) -> None:
    """Copy the scalar numbers of metrics.json (one level of nesting flattened) to a KFP Metrics artifact."""
    data = json.loads((Path(metrics_dir) / metrics_file).read_text())
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, number in items:
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                sink.log_metric(f"{key}.{sub}" if sub else key, float(number))


# Lightweight components: the image already holds kfp and the project, so KFP installs nothing at run time.
_component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@_component
def ingest(params_file: str, overrides: dict, tracking_uri: str, ray_address: str, ingested: Output[Dataset]):
    from pipelines.kfp_pipeline import run_step

    run_step("ingest", params_file, overrides, tracking_uri, ray_address, [], ingested.path)


@_component
def preprocess(params_file: str, overrides: dict, tracking_uri: str, ray_address: str, ingested: Input[Dataset],
               preprocessed: Output[Dataset]):
    from pipelines.kfp_pipeline import run_step

    run_step("preprocess", params_file, overrides, tracking_uri, ray_address, [ingested.path], preprocessed.path)


@_component
def tune(params_file: str, overrides: dict, tracking_uri: str, ray_address: str, ingested: Input[Dataset],
         preprocessed: Input[Dataset], tuned: Output[Model]):
    from pipelines.kfp_pipeline import run_step

    run_step("tune", params_file, overrides, tracking_uri, ray_address, [ingested.path, preprocessed.path],
             tuned.path)


@_component
def evaluate(params_file: str, overrides: dict, tracking_uri: str, ray_address: str, ingested: Input[Dataset],
             preprocessed: Input[Dataset], tuned: Input[Model], evaluation: Output[Dataset],
             metrics: Output[Metrics]):
    from pipelines.kfp_pipeline import log_metrics, resolve_params, run_step

    run_step("evaluate", params_file, overrides, tracking_uri, ray_address,
             [ingested.path, preprocessed.path, tuned.path], evaluation.path)
    _, params = resolve_params(params_file, overrides, ray_address)
    log_metrics(evaluation.path, params.evaluate.metrics, metrics)


@_component
def register(params_file: str, overrides: dict, tracking_uri: str, ray_address: str, ingested: Input[Dataset],
             preprocessed: Input[Dataset], tuned: Input[Model], evaluation: Input[Dataset],
             registered: Output[Artifact]):
    from pipelines.kfp_pipeline import run_step

    run_step("register", params_file, overrides, tracking_uri, ray_address,
             [ingested.path, preprocessed.path, tuned.path, evaluation.path], registered.path)


@dsl.pipeline(name="mer-loso", description="Micro-expression recognition: LOSO experiment and model registration")
def mer_pipeline(params_file: str = "params.yaml", overrides: dict = {}, tracking_uri: str = "",  # noqa: B006
                 ray_address: str = ""):
    common = dict(params_file=params_file, overrides=overrides, tracking_uri=tracking_uri, ray_address=ray_address)
    ingest_task = ingest(**common)
    preprocess_task = preprocess(**common, ingested=ingest_task.outputs["ingested"])
    tune_task = tune(**common, ingested=ingest_task.outputs["ingested"],
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
