"""The stage graph, declared once: every `mer` command is a `StageEntry` on the `STAGES` registry
(mer.model.registry), in the order the pipeline runs them -- its function, the params.yaml settings that determine
its outputs, the paths it reads and writes (params keys), its CLI options, and how Kubeflow runs it.

Derived from the entries: the `mer` subcommands (pipelines/cli.py, one generic runner: mer.components.common.run_command),
the Kubeflow components, their wiring, caching and resources (pipelines/kfp_pipeline.py) and what each step does in
its pod and carries on (pipelines/kfp_steps.py). dvc.yaml, which DVC reads itself, is checked against the entries
(tests/test_dvc_params.py: each DVC stage's cmd, params, data deps, outputs and code).

Adding a stage: its function (`Params -> anything`) in its module, its entry here, and its stage in dvc.yaml if DVC
runs it.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mer.components import evaluate, ingest, predict, preprocess, register, report, synth
from mer.components.settings import Params
from mer.model.registry import Registry
from mer.pipelines import benchmark, loso


@dataclass(frozen=True)
class PathKey:
    """A params key holding a path; `folder`: the folder holding it (a stage writing files beside it, e.g. ingest's
    exclusions and summary beside `data.ingested`)."""

    key: str
    folder: bool = False

    def resolve(self, params: Params) -> str:
        value = str(functools.reduce(getattr, self.key.split("."), params))
        return str(Path(value).parent) if self.folder else value

    def __str__(self) -> str:
        return f"folder of {self.key}" if self.folder else self.key


@dataclass(frozen=True)
class KubeflowStep:
    """How the Kubeflow pipeline runs a stage (pipelines/kfp_pipeline.py): one component per step, each step given
    every earlier step's output artifact."""

    artifact: str  # name of its output artifact: its outputs under their params-relative paths + paths.json
    cpu: str  # CPU and memory requests of its pod (the work of a Ray-job step runs on the Ray cluster)
    memory: str
    kind: Literal["Dataset", "Model", "Artifact"] = "Dataset"  # KFP artifact type of the output
    cached: bool = False  # deterministic in (data_version, parameters): KFP caches it; else keyed by the run
    ray_job: str | None = None  # given a Ray job server: the command run as a Ray job (with --params params.yaml)
    metrics: str | None = None  # params key of a metrics.json among its outputs, copied to a KFP Metrics artifact


@dataclass(frozen=True)
class StageEntry:
    """One stage / `mer` command.

    `function(params)` does the work (`function(params, args) -> exit code` when the command has options of its own:
    `arguments` adds them to its parser). `params`: the params.yaml sections/keys that determine its outputs (its
    DVC params). `inputs` / `outputs`: params keys of the paths it reads / writes (its DVC data deps / outs; a Kubeflow
    step's artifact carries its outputs); `state`: paths of working state kept between runs (Tune's storage), carried
    on by a Kubeflow step when local but not a DVC output. `dvc`: its stage name in dvc.yaml (None: DVC does not run
    it); `kubeflow`: how the Kubeflow pipeline runs it (None: not a pipeline step)."""

    name: str  # `mer NAME`; the Kubeflow task's name
    function: Callable[..., Any]
    help: str  # one line in `mer --help`
    params: tuple[str, ...] = ()
    inputs: tuple[PathKey, ...] = ()
    outputs: tuple[PathKey, ...] = ()
    state: tuple[PathKey, ...] = ()
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None  # `mer NAME --help`; default: `help` + its module docstring's first paragraph
    dvc: str | None = None
    kubeflow: KubeflowStep | None = None

    def output_paths(self, params: Params) -> list[str]:
        return [path.resolve(params) for path in self.outputs]

    def input_paths(self, params: Params) -> list[str]:
        return [path.resolve(params) for path in self.inputs]


STAGES: Registry[StageEntry] = Registry("stage", "stage", "pipelines/stages.py")


def _paths(*keys: str | PathKey) -> tuple[PathKey, ...]:
    return tuple(key if isinstance(key, PathKey) else PathKey(key) for key in keys)


def _declare(name: str, function: Callable[..., Any], help: str, *, inputs: tuple[str | PathKey, ...] = (),
             outputs: tuple[str | PathKey, ...] = (), state: tuple[str, ...] = (), **fields: Any) -> None:
    STAGES.add(name, StageEntry(name, function, help, inputs=_paths(*inputs), outputs=_paths(*outputs),
                                state=_paths(*state), **fields), stacklevel=2)


_declare("synth", synth.write_synthetic, "write the synthetic micro-expression dataset (CASME II layout)",
         description="Write the synthetic dataset to synth.out: frames, CASME2-coding-synthetic.xlsx and ground-truth "
                     "landmarks/flow. Skips the work when synth.out already holds the same configuration.",
         params=("synth",), outputs=("synth.out",), dvc="synthesize")
_declare("ingest", ingest.ingest, "read a dataset's native layout into the unified annotation table",
         params=("data",), inputs=("data.root",), outputs=(PathKey("data.ingested", folder=True),), dvc="ingest",
         kubeflow=KubeflowStep("ingested", "1", "2G", cached=True))
# data.root and data.ingested are params, not deps: the frames are ingest's dep, the table is the folder ingest writes.
_declare("preprocess", preprocess.preprocess, "align faces, TV-L1 flow, strain, landmarks -> per-modality cache",
         params=("preprocess", "data.source", "data.strict", "data.root", "data.ingested", "model"),
         inputs=(PathKey("data.ingested", folder=True),), outputs=("preprocess.out",), dvc="preprocess",
         kubeflow=KubeflowStep("preprocessed", "2", "4G", cached=True, ray_job="python -m mer.pipelines.cli preprocess"))
_declare("tune", loso.tune, "training + Optuna search on Ray Tune (loso | subject_5fold | lodo folds), tracked",
         params=("seed", "model", "train", "tune", "data", "tracking", "evaluate.intervals"),
         inputs=("preprocess.out",), outputs=("tune.results",), state=("tune.storage_path",), dvc="tune",
         kubeflow=KubeflowStep("tuned", "1", "4G", kind="Model", ray_job="python -m mer.pipelines.loso"))
_declare("evaluate", evaluate.write_metrics_and_report,
         "pooled metrics -> metrics.json, plots/ (dvc) and the HTML report",
         params=("evaluate", "tracking"), inputs=("tune.results",),
         outputs=("evaluate.metrics", "evaluate.plots", "evaluate.report"), dvc="evaluate",
         kubeflow=KubeflowStep("evaluation", "1", "2G", metrics="evaluate.metrics"))
_declare("register", register.register_final_model, "register the final model of `mer tune` in the model registry",
         params=("tracking", "data.source"), inputs=("tune.results",), outputs=("tracking.registered_info",),
         dvc="register", kubeflow=KubeflowStep("registered", "1", "4G", kind="Artifact"))
_declare("report", report.report_command, "HTML report of the last experiment, or --compare across runs",
         arguments=report.add_arguments)
_declare("predict", predict.predict_command, "class probabilities for new clips (frame folders or videos)",
         arguments=predict.add_arguments,
         description="Run the training preprocessing on each clip and print the model's class probabilities. "
                     "Default key frames: onset = first frame, offset = last frame, apex = the frame with the "
                     "largest TV-L1 flow magnitude from the onset.")
_declare("benchmark", benchmark.benchmark_command,
         "LOSO of several models x protocols on a real collection -> results table + chart",
         arguments=benchmark.add_arguments)


def kubeflow_steps() -> list[StageEntry]:
    """The Kubeflow pipeline's steps, in order."""
    return [entry for entry in STAGES.entries() if entry.kubeflow is not None]


def upstream(name: str) -> list[StageEntry]:
    """The Kubeflow steps before `name`, whose artifacts it is given."""
    steps = [entry.name for entry in kubeflow_steps()]
    return kubeflow_steps()[: steps.index(name)]


def companions(name: str, params: Params) -> list[StageEntry]:
    """Stages that are no Kubeflow step but write a path Kubeflow step `name` reads (the synthetic set that ingest
    reads when `data.root` is `synth.out`): run first in that step's pod, their outputs carried in its artifact."""
    reads = set(STAGES[name].input_paths(params))
    return [entry for entry in STAGES.entries()
            if entry.kubeflow is None and reads & set(entry.output_paths(params))]
