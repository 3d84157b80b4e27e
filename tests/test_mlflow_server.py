"""The project's training run against the deployment's tracking stack, with real processes on 127.0.0.1:
`mlflow server` with a PostgreSQL backend store and an S3 artifact store (moto's server standing in for MinIO).

The run is the project's own chain (`mer synth`, `ingest`, `preprocess`, `tune` on a tiny synthetic set) with only
MLFLOW_TRACKING_URI pointing at the server and NO S3 credentials: as in infra/k8s/mlflow.yaml, the server proxies
artifact uploads, so only it needs the bucket. The test then checks the runs landed in PostgreSQL and reads the
final model back from the bucket with boto3 and runs it as the pyfunc `mlflow models serve` would serve.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import psycopg2
import pytest
import yaml

from tests.servers import (
    NO_TELEMETRY,
    S3_KEY_ID,
    S3_SECRET,
    log_tail,
    mlflow_server,
    postgres_server,
    s3_env,
    s3_server,
)

from conftest import THREE_BY_TWO, tiny_params

pytestmark = pytest.mark.slow
BUCKET = "mer-mlflow"
EXPERIMENT = "mer-server-test"
# One interpreter and one local Ray for the whole chain (the components reuse an initialised Ray): the heavy imports
# and the Ray start are paid once.
CHAIN = """
import sys
from pipelines.cli import main
from components.ray_session import connect_ray
connect_ray(num_cpus=2)
for step in sys.argv[1:]:
    code = main([step, "--params", "params.yaml"])
    if code:
        sys.exit(f"mer {step} exited with {code}")
"""


def test_project_run_logs_to_mlflow_server_with_postgres_and_s3(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for key, value in NO_TELEMETRY.items():
        monkeypatch.setenv(key, value)

    with postgres_server() as pg, s3_server(buckets=(BUCKET,)) as endpoint:
        with mlflow_server(pg.uri("mlflow"), f"s3://{BUCKET}/artifacts", s3_env(endpoint)) as uri:
            tiny_params(tmp_path, **{**THREE_BY_TWO, "tracking.experiment": EXPERIMENT})
            client_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
            client_env |= {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
            log = tmp_path / "chain.log"
            with log.open("wb") as out:
                result = subprocess.run([sys.executable, "-c", CHAIN, "synth", "ingest", "preprocess", "tune"],
                                        cwd=tmp_path, env=client_env, stdout=out, stderr=subprocess.STDOUT,
                                        timeout=420)
            assert result.returncode == 0, log_tail(log, 6000)

            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(EXPERIMENT)
            assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
            runs = client.search_runs([experiment.experiment_id])
            kinds = {run.data.tags.get("mer.kind") for run in runs}
            assert {"parent", "fold"} <= kinds, kinds
            (parent,) = [run for run in runs if run.data.tags.get("mer.kind") == "parent"]
            assert "uf1" in parent.data.metrics
            model_uri = parent.data.tags["mer.final_model_uri"]

        # The server is gone: what follows reads the stores themselves.
        with psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password,
                              dbname="mlflow") as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(experiment.experiment_id),))
            assert cur.fetchone()[0] == len(runs)

        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY_ID,
                          aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="artifacts/")
                for o in page.get("Contents", [])]
        mlmodels = [k for k in keys if k.endswith("/MLmodel")]
        assert len(mlmodels) == 1, (model_uri, mlmodels)
        prefix = mlmodels[0].rsplit("/", 1)[0]
        local = tmp_path / "final_model"
        for key in (k for k in keys if k.startswith(prefix + "/")):
            target = local / key[len(prefix) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(BUCKET, key, str(target))
        flavors = yaml.safe_load((local / "MLmodel").read_text())["flavors"]
        assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.model" and "pytorch" not in flavors

        import mlflow.pyfunc

        from mer_model.inference import example_arrays

        served = mlflow.pyfunc.load_model(str(local))
        model = served.unwrap_python_model().model
        assert isinstance(model, torch.nn.Module)
        assert sum(p.numel() for p in model.parameters()) > 0
        names = served.metadata.get_input_schema().input_names()
        assert sorted(names) == sorted(model.inputs)
        preprocess = served.unwrap_python_model().preprocess
        batch = {k: v[None].astype(np.float32) for k, v in example_arrays(names, preprocess).items()}
        probabilities = served.predict(batch)
        assert list(probabilities.columns) == served.unwrap_python_model().class_names
        np.testing.assert_allclose(probabilities.to_numpy().sum(axis=1), 1.0, atol=1e-5)
