"""The Kubeflow pipeline: the checked-in compiled YAML is current and a valid PipelineSpec, and the pipeline runs
end to end with KFP's local runner (each step a subprocess running the real component) on a tiny synthetic set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import THREE_BY_TWO, tiny_params
from tests.servers import NO_TELEMETRY

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "infra" / "kubeflow" / "mer_pipeline.yaml"
STEPS = ["ingest", "preprocess", "tune", "evaluate", "register"]


def test_compiled_pipeline_is_current(tmp_path: Path) -> None:
    """`make pipeline-yaml` was run after the last change to the pipeline (or to kfp)."""
    fresh = tmp_path / "mer_pipeline.yaml"
    env = {k: v for k, v in os.environ.items() if k != "MER_IMAGE"}
    subprocess.run([sys.executable, "-m", "pipelines.kfp_pipeline", "--output", str(fresh)], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=120)
    assert fresh.read_text() == COMPILED.read_text(), "infra/kubeflow/mer_pipeline.yaml is stale: make pipeline-yaml"


def test_compiled_pipeline_is_a_valid_pipeline_spec() -> None:
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines.kfp_pipeline import DEFAULT_IMAGE

    (doc,) = list(yaml.safe_load_all(COMPILED.read_text()))
    spec = json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())  # unknown fields raise
    tasks = spec.root.dag.tasks
    assert sorted(tasks) == sorted(STEPS)
    for before, after in zip(STEPS, STEPS[1:]):
        assert before in tasks[after].dependent_tasks
    executors = doc["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {DEFAULT_IMAGE}
    assert set(spec.root.input_definitions.parameters) == {"params_file", "overrides", "tracking_uri", "ray_address"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_runs_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp import local
    from mlflow.tracking import MlflowClient

    from pipelines.kfp_pipeline import mer_pipeline

    for key, value in {"OMP_NUM_THREADS": "1", **NO_TELEMETRY}.items():
        monkeypatch.setenv(key, value)
    params = tiny_params(tmp_path, **{**THREE_BY_TWO, "tracking.experiment": "mer-kfp-test"})
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               workspace_root=str(tmp_path / "workspace"))
    mer_pipeline(params_file=str(params), overrides={"tune.final_model": True}, tracking_uri=tracking_uri,
                 ray_address="")

    (metrics_file,) = root.rglob("evaluation/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert 0.0 <= metrics["uf1"] <= 1.0 and metrics["n"] == 6  # TINY: 3 subjects x 2 clips, all tested once
    (registered_file,) = root.rglob("registered/runs/registered.json")
    registered = json.loads(registered_file.read_text())
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)  # not a registry another test pinned
    versions = client.search_model_versions("name='mer-model'")
    assert [str(v.version) for v in versions] == [str(registered["version"])]
