"""The Kubeflow pipeline: the checked-in compiled YAML is current and a valid PipelineSpec, and the pipeline runs
end to end with KFP's local runner (each step a subprocess running the real component) on a tiny synthetic set,
against the deployment's tracking stack (`mlflow server` + PostgreSQL + S3, real local processes). The tune step's
cluster path (the driver as a Ray job on the session's Ray head, through its job server) is run on its own."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import THREE_BY_TWO, TrackingStack, tiny_data, tiny_params
from tests.servers import NO_TELEMETRY, S3_KEY_ID, S3_SECRET, LocalRay

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "infra" / "kubeflow" / "mer_pipeline.yaml"
STEPS = ["ingest", "preprocess", "tune", "evaluate", "register"]
EXPERIMENT = "mer-kfp-test"


def test_compiled_pipeline_is_current(tmp_path: Path) -> None:
    """`make pipeline-yaml` was run after the last change to the pipeline (or to kfp)."""
    fresh = tmp_path / "mer_pipeline.yaml"
    env = {k: v for k, v in os.environ.items() if k != "MER_IMAGE"}
    subprocess.run([sys.executable, "-m", "mer.pipelines.kfp_pipeline", "--output", str(fresh)], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=120)
    assert fresh.read_text() == COMPILED.read_text(), "infra/kubeflow/mer_pipeline.yaml is stale: make pipeline-yaml"


def test_compiled_pipeline_is_a_valid_pipeline_spec() -> None:
    """The spec as Kubeflow runs it: the five steps in order; only the deterministic steps cached, keyed by data
    version and parameters (no per-run input); every step with CPU and memory requests and the shared volume the Ray
    pods also mount (infra/kuberay/raycluster.yaml); preprocess and tune able to submit Ray jobs."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from mer.pipelines.kfp_pipeline import DEFAULT_IMAGE, SHARED_MOUNT, SHARED_SUBPATH, SHARED_VOLUME

    doc, platform = list(yaml.safe_load_all(COMPILED.read_text()))
    spec = json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())  # unknown fields raise
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    tasks = spec.root.dag.tasks
    assert sorted(tasks) == sorted(STEPS)
    for before, after in zip(STEPS, STEPS[1:]):
        assert before in tasks[after].dependent_tasks
    executors = doc["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {DEFAULT_IMAGE}
    assert set(spec.root.input_definitions.parameters) == {
        "params_file", "overrides", "data_version", "tracking_uri", "ray_address", "ray_dashboard",
        "ray_job_timeout_s", "shared_volume", "shared_dir"}
    cached = {name for name, task in tasks.items() if task.caching_options.enable_cache}
    assert cached == {"ingest", "preprocess"}
    for name in cached:  # a per-run input would make every run a cache miss
        assert "run_id" not in tasks[name].inputs.parameters and "data_version" in tasks[name].inputs.parameters
    for name in ("tune", "evaluate", "register"):
        run_id = tasks[name].inputs.parameters["run_id"].runtime_value.constant.string_value
        assert run_id == "{{$.pipeline_job_uuid}}"
    for name in ("preprocess", "tune"):
        assert set(tasks[name].inputs.parameters) >= {"ray_dashboard", "ray_job_timeout_s"}
    for name, task in tasks.items():
        resources = executors[task.component_ref.name.replace("comp-", "exec-")]["container"]["resources"]
        assert resources["cpuRequest"] > 0 and resources["memoryRequest"] > 0, name
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(kubernetes) == len(STEPS)
    for executor in kubernetes.values():
        (mount,) = executor["pvcMount"]
        assert (mount["mountPath"], mount["subPath"]) == (SHARED_MOUNT, SHARED_SUBPATH)
        assert mount["pvcNameParameter"]["componentInputParameter"] == "shared_volume"
    assert doc["root"]["inputDefinitions"]["parameters"]["shared_volume"]["defaultValue"] == SHARED_VOLUME
    assert doc["root"]["inputDefinitions"]["parameters"]["shared_dir"]["defaultValue"] == SHARED_MOUNT
    # The RayCluster's pods mount the same claim and subPath at the same path, so a Ray job sees the step's files.
    cluster = yaml.safe_load((REPO / "infra" / "kuberay" / "raycluster.yaml").read_text())
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in head["volumes"]
              if "persistentVolumeClaim" in v}
    mounts = {(claims.get(m["name"]), m["mountPath"], m.get("subPath")) for m in head["containers"][0]["volumeMounts"]}
    assert (SHARED_VOLUME, SHARED_MOUNT, SHARED_SUBPATH) in mounts


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_runs_locally_against_the_tracking_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          session_ray: LocalRay, tracking_stack: TrackingStack) -> None:
    """The whole chain (synth + ingest, preprocess, tune, evaluate, register) as KFP's local runner runs it, with
    preprocess and tune submitted as Ray jobs to the session's Ray head (the steps' `ray_dashboard`), logging to `mlflow server` with PostgreSQL and S3 with NO S3
    credentials on the client side (the server proxies artifacts, as in infra/k8s/mlflow.yaml). Then the runs are
    read from PostgreSQL and the final model from the bucket, and run as `mlflow models serve` would run it."""
    import boto3
    import mlflow.pyfunc
    import psycopg2
    import torch
    from kfp import local
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from mer.model.inference import example_arrays
    from mer.pipelines.kfp_pipeline import mer_pipeline

    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_S3"))] + ["MLFLOW_TRACKING_URI"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"OMP_NUM_THREADS": "1", **NO_TELEMETRY}.items():
        monkeypatch.setenv(key, value)
    params = tiny_params(tmp_path, **{**THREE_BY_TWO, "tracking.experiment": EXPERIMENT})
    root = tmp_path / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               workspace_root=str(tmp_path / "workspace"))
    shared = tmp_path / "shared"  # the shared volume of a cluster: here this machine's disk, seen by the Ray head
    shared.mkdir()
    mer_pipeline(params_file=str(params), overrides={"tune.final_model": True}, tracking_uri=tracking_stack.uri,
                 ray_dashboard=session_ray.dashboard, ray_job_timeout_s=600, shared_dir=str(shared))
    # preprocess and tune ran as Ray jobs on the session's head (Jobs SDK, not Ray Client), each once.
    jobs = JobSubmissionClient(session_ray.dashboard).list_jobs()
    for step in ("preprocess", "tune"):
        (job,) = [j for j in jobs if (j.submission_id or "").startswith(f"mer-{step}-")
                  and f"{shared}" in (j.entrypoint or "")]
        assert job.status.value == "SUCCEEDED", (step, job.message)

    (metrics_file,) = root.rglob("evaluation/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert 0.0 <= metrics["uf1"] <= 1.0 and metrics["n"] == 6  # TINY: 3 subjects x 2 clips, all tested once
    (registered_file,) = root.rglob("registered/runs/registered.json")
    registered = json.loads(registered_file.read_text())
    client = MlflowClient(tracking_uri=tracking_stack.uri, registry_uri=tracking_stack.uri)
    versions = client.search_model_versions(f"name='{registered['name']}'")
    assert [str(v.version) for v in versions] == [str(registered["version"])]

    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    kinds = {run.data.tags.get("mer.kind") for run in runs}
    assert {"parent", "trial", "fold"} <= kinds, kinds
    (parent,) = [run for run in runs if run.data.tags.get("mer.kind") == "parent"]
    assert "uf1" in parent.data.metrics and registered["run_id"] == parent.info.run_id
    model_uri = parent.data.tags["mer.final_model_uri"]

    # The stores themselves: the runs are rows in PostgreSQL, the final model is in the bucket.
    pg = tracking_stack.postgres
    with psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password,
                          dbname="mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(experiment.experiment_id),))
        assert cur.fetchone()[0] == len(runs)
    s3 = boto3.client("s3", endpoint_url=tracking_stack.s3_endpoint, aws_access_key_id=S3_KEY_ID,
                      aws_secret_access_key=S3_SECRET, region_name="us-east-1")
    prefix = f"artifacts/{experiment.experiment_id}/"
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=tracking_stack.bucket,
                                                                              Prefix=prefix)
            for o in page.get("Contents", [])]
    mlmodels = [k for k in keys if k.endswith("/MLmodel")]
    assert len(mlmodels) == 1, (model_uri, mlmodels)
    model_prefix = mlmodels[0].rsplit("/", 1)[0]
    downloaded = tmp_path / "final_model"
    for key in (k for k in keys if k.startswith(model_prefix + "/")):
        target = downloaded / key[len(model_prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(tracking_stack.bucket, key, str(target))
    flavors = yaml.safe_load((downloaded / "MLmodel").read_text())["flavors"]
    assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "pytorch" not in flavors

    served = mlflow.pyfunc.load_model(str(downloaded))
    model = served.unwrap_python_model().model
    assert isinstance(model, torch.nn.Module) and sum(p.numel() for p in model.parameters()) > 0
    names = served.metadata.get_input_schema().input_names()
    assert sorted(names) == sorted(model.inputs)
    batch = {k: v[None].astype(np.float32)
             for k, v in example_arrays(names, served.unwrap_python_model().preprocess).items()}
    probabilities = served.predict(batch)
    assert list(probabilities.columns) == served.unwrap_python_model().class_names
    np.testing.assert_allclose(probabilities.to_numpy().sum(axis=1), 1.0, atol=1e-5)


def _artifact(root: Path, rel: str, source: Path) -> str:
    """An upstream step's output artifact as the pipeline hands it on: `rel` (linked to `source`) + paths.json."""
    from mer.pipelines.kfp_steps import PATHS_FILE

    (root / rel).parent.mkdir(parents=True)
    (root / rel).symlink_to(source)
    (root / PATHS_FILE).write_text(json.dumps([rel]))
    return str(root)


def test_step_outputs_come_from_the_stage_declarations() -> None:
    """What a step's artifact carries: its entry's outputs, a local working state, and the outputs of a stage that
    is no step but writes what the step reads (the synthetic set, when ingest reads it)."""
    from mer.components.settings import load_params, with_overrides
    from mer.pipelines.kfp_steps import step_outputs
    from mer.pipelines.stages import STAGES

    params = load_params(REPO / "params.yaml")
    assert params.data.root == params.synth.out
    assert step_outputs("ingest", params) == [params.synth.out, str(Path(params.data.ingested).parent)]
    real = with_overrides(params, {"data.source": "casme2", "data.root": "../shared/data/casme2"}, "test")
    assert step_outputs("ingest", real) == [str(Path(params.data.ingested).parent)]
    assert step_outputs("tune", params) == [params.tune.results, params.tune.storage_path]
    remote = with_overrides(params, {"tune.storage_path": "s3://bucket/tune"}, "test")
    assert step_outputs("tune", remote) == [params.tune.results]
    assert step_outputs("evaluate", params) == [params.evaluate.metrics, params.evaluate.plots, params.evaluate.report]
    assert [e.name for e in STAGES.entries() if e.kubeflow] == STEPS


def test_tune_step_names_an_unreachable_job_server(tmp_path: Path) -> None:
    """`ray_dashboard` is checked first, within seconds, and the one line names the pipeline parameter."""
    from mer.model.errors import ServiceError
    from mer.pipelines.kfp_steps import run_step

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for address, fragment in [(f"http://127.0.0.1:{port}", "no Ray cluster reachable"),
                              (f"127.0.0.1:{port}", "expected the Ray job server's URL")]:
        with pytest.raises(ServiceError) as err:
            run_step("tune", "unreachable", "params.yaml", {}, "", "", [], str(tmp_path / "out"),
                     ray_dashboard=address)
        message = str(err.value)
        assert message.startswith("ray_dashboard: ") and fragment in message and "\n" not in message


def test_ray_job_submission_id_is_per_run_and_experiment() -> None:
    from mer.pipelines.ray_jobs import submission_id

    experiment = {"model": {"name": "ststnet"}, "train": {"epochs": 2}}
    assert submission_id("run-1", experiment) == submission_id("run-1", json.loads(json.dumps(experiment)))
    assert submission_id("run-1", experiment) != submission_id("run-2", experiment)
    assert submission_id("run-1", experiment) != submission_id("run-1", {**experiment, "train": {"epochs": 3}})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_step_runs_the_driver_as_a_ray_job(tiny_root: Path, session_ray: LocalRay,
                                                tracking_stack: TrackingStack, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The tune step given `ray_dashboard` submits `python -m mer.pipelines.loso` to the session's job server, copies
    the job's log into its own, and takes the results into its output artifact; the same step again (a KFP retry:
    same run id) submits no second job and hands on the same results; a job that fails is one line naming it.

    The suite's one LOSO run as a Ray job (tests/test_ray_job.py submits the README's `ray job submit` command with
    a bad input only): it runs the `oracle` protocol in fold groups of two, so it also shows what a leaky experiment
    looks like (every run tagged and named leaky, no final model) and that fold-batched tasks still store, report
    and track each fold on its own."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from mer.model.errors import ServiceError
    from mer.pipelines.kfp_steps import run_step

    # The step's temp dir is where the job works: on a cluster a volume the head shares, here this machine's disk.
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    data = tiny_data(tiny_root)
    ingested = _artifact(tmp_path / "ingested", "data/ingested", data / "ingested")
    preprocessed = _artifact(tmp_path / "preprocessed", "data/preprocessed", data / "preprocessed")
    experiment = "mer-kfp-job-test"
    params = tiny_params(tmp_path, data, **{
        "data.ingested": "data/ingested/annotations.csv", "preprocess.out": "data/preprocessed",
        "tune.storage_path": "runs/tune", "tune.results": "runs/results", "tune.final_model": False,
        "tracking.experiment": experiment, "train.protocol": "oracle", "tune.fold_group_size": 2})
    jobs = JobSubmissionClient(session_ray.dashboard)

    def submitted(run_id: str) -> list:
        return [j for j in jobs.list_jobs() if (j.submission_id or "").startswith(f"mer-tune-{run_id}-")]

    step = dict(params_file=str(params), overrides={}, tracking_uri=tracking_stack.uri, ray_address="",
                inputs=[ingested, preprocessed], ray_dashboard=session_ray.dashboard, ray_job_timeout_s=400)
    with caplog.at_level(logging.INFO, logger="mer.pipelines.ray_jobs"):
        run_step("tune", "job-test", output=str(tmp_path / "tuned"), **step)
    (job,) = submitted("job-test")
    assert job.status.value == "SUCCEEDED" and job.entrypoint.endswith("python -m mer.pipelines.loso --params params.yaml")
    copied_log = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"[{job.submission_id}]")]
    # Progress without a terminal (the job's log): 0/N when the phase starts, then one line per finished fold,
    # done/total with an ETA.
    progress = [line for line in copied_log if "folds done" in line]
    assert len(progress) == 5 and "evaluate: 0/4 folds done" in progress[0], copied_log[-20:]
    assert "evaluate: 4/4 folds done" in progress[-1] and "ETA 00:00" in progress[-1], copied_log[-20:]
    tuned = tmp_path / "tuned"
    assert json.loads((tuned / "paths.json").read_text()) == ["runs/results", "runs/tune"]
    summary = json.loads((tuned / "runs" / "results" / "summary.json").read_text())
    assert summary["folds"] == 4 and summary["metrics"]["n"] == 12
    assert summary["protocol"] == "oracle" and summary["leaky"] is True and summary["model_uri"] is None
    # The copied inputs are gone from the shared directory; the outputs stay there for a retry.
    workdir = shared / "mer-kfp-job-test"
    assert not (workdir / "data" / "preprocessed").exists() and (workdir / "runs" / "results").is_dir()
    assert len(list((workdir / "runs" / "tune").glob("*/folds/*/result.json"))) == 4  # one per fold, groups of two
    # The trial reported each fold as it finished, without pooling all finished folds again each time (quadratic in
    # folds): pooled metrics are computed once, when the phase ends (Tune's own result.json of the trial).
    (reported,) = (workdir / "runs" / "tune").glob("*/*/evaluate/*/result.json")
    results = [json.loads(line) for line in reported.read_text().splitlines()]
    assert [r["folds_done"] for r in results] == [1, 2, 3, 4] and not any("uf1" in r for r in results)
    # The job logged to the tracking server it was given (the head's own environment has no MLFLOW_TRACKING_URI):
    # one parent, one trial, one run per fold, all finished and all tagged and named leaky.
    client = MlflowClient(tracking_uri=tracking_stack.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    kinds = [r.data.tags.get("mer.kind") for r in runs]
    assert sorted(kinds) == ["fold"] * 4 + ["parent", "trial"], kinds
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["leaky"] == "true" and r.data.tags["protocol"] == "oracle" for r in runs)
    assert all("oracle (leaky)" in r.info.run_name for r in runs)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mer.pipelines.kfp_steps"):
        run_step("tune", "job-test", output=str(tmp_path / "tuned-again"), **step)
    (again,) = submitted("job-test")
    assert (again.submission_id, again.start_time) == (job.submission_id, job.start_time)
    assert any("not submitted again" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "tuned-again" / "runs" / "results" / "summary.json").read_text()) == summary

    # No preprocessed input: the driver exits 2 on the cluster, and the step says so in one line naming the job.
    with pytest.raises(ServiceError) as err:
        run_step("tune", "job-fail", output=str(tmp_path / "failed"), **{**step, "inputs": [ingested]})
    (failed,) = submitted("job-fail")
    message = str(err.value)
    assert failed.status.value == "FAILED" and "\n" not in message
    assert message.startswith(f"Ray job {failed.submission_id} FAILED") and "exit code 2" in message
    assert "last log line: mer.pipelines.loso: error: " in message and "no index.csv" in message
    # Retried after the failure: the same job id submitted again (the failed record replaced), still one job.
    with pytest.raises(ServiceError, match="FAILED"):
        run_step("tune", "job-fail", output=str(tmp_path / "failed-again"), **{**step, "inputs": [ingested]})
    (resubmitted,) = submitted("job-fail")
    assert resubmitted.submission_id == failed.submission_id and resubmitted.start_time > failed.start_time

    # Still running when the step's time is up: stopped, and the one line names the parameter and the job.
    with pytest.raises(ServiceError) as err:
        run_step("tune", "job-late", output=str(tmp_path / "late"), **{**step, "ray_job_timeout_s": 1})
    (late,) = submitted("job-late")
    assert late.status.value == "STOPPED"
    assert str(err.value).startswith(f"ray_job_timeout_s: Ray job {late.submission_id} still ")
