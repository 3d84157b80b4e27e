"""Every Kubernetes manifest in infra/ parses and validates against its API schema, and the manifests agree with
each other (Secrets, ConfigMaps, claims, selectors, image, Ray version) — the mistakes `kubectl apply` would only
show on a live cluster.

Core kinds: kubernetes-validate's bundled schemas, strict (unknown fields are errors, like the API server's strict
field validation). KubeRay kinds: infra/schemas/ray.io_v1.json with jsonschema; the pod templates embedded in them
go through the core schema of PodTemplateSpec.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAY_SCHEMA = INFRA / "schemas" / "ray.io_v1.json"
KUBERAY_KINDS = {"RayCluster", "RayJob"}
NOT_MANIFESTS = {INFRA / "kubeflow" / "mer_pipeline.yaml"}  # a KFP pipeline spec: tests/test_kfp_pipeline.py
PROJECT_IMAGE = "mer-platform:0.1.0"
K8S_VERSION = "1.30.0"  # validate against a Kubernetes release the manifests target


def manifest_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*.yaml") if p not in NOT_MANIFESTS)


@cache
def documents() -> list[tuple[str, dict[str, Any]]]:
    """(\"file#index\", document) for every non-empty YAML document of every manifest."""
    out = []
    for path in manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.relative_to(REPO)}#{i}", doc))
    return out


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The PodTemplateSpecs of a workload or KubeRay resource."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]
    if doc["kind"] == "RayJob":
        found = [spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else []
        if "rayClusterSpec" in spec:
            found += pod_templates({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
        return found
    if doc["kind"] in {"Deployment", "StatefulSet", "Job", "DaemonSet"}:
        return [spec["template"]]
    return []


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for t in pod_templates(doc)
            for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", [])]


def validate_core(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_kuberay(doc: dict[str, Any]) -> None:
    schema_file = json.loads(RAY_SCHEMA.read_text())
    schema = {"$defs": schema_file["$defs"], **schema_file["kinds"][doc["kind"]]}
    jsonschema.Draft202012Validator(schema).validate(doc)
    for i, template in enumerate(pod_templates(doc)):
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"template-{i}"},
                   "template": template}
        validate_core(wrapper)


def validate(doc: dict[str, Any]) -> None:
    if doc["kind"] in KUBERAY_KINDS:
        validate_kuberay(doc)
    else:
        validate_core(doc)


@pytest.mark.parametrize("name", [name for name, _ in documents()])
def test_manifest_validates(name: str) -> None:
    doc = dict(documents())[name]
    validate(doc)


def test_expected_resources_present() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in documents()}
    for expected in [("RayCluster", "mer-raycluster"), ("RayJob", "mer-loso"), ("StatefulSet", "mer-postgres"),
                     ("Deployment", "mer-mlflow"), ("Service", "mer-mlflow"), ("Deployment", "mer-minio"),
                     ("Job", "mer-minio-buckets"), ("PersistentVolumeClaim", "mer-data")]:
        assert expected in kinds


def _raycluster() -> dict[str, Any]:
    return copy.deepcopy(by_kind("RayCluster")[0])


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=3), "maxReplica"),  # typo
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="4"), "'4'"),  # wrong type
    (lambda d: d["spec"]["headGroupSpec"].pop("template"), "template"),
    (lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), "Fast"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imag="x"), "imag"),
])
def test_kuberay_validation_rejects_broken_manifests(mutate, fragment: str) -> None:
    doc = _raycluster()
    mutate(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)) as err:
        validate_kuberay(doc)
    assert fragment in str(err.value)


def test_core_validation_rejects_unknown_field() -> None:
    doc = copy.deepcopy(next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "mer-mlflow"))
    doc["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["nmae"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError, match="nmae"):
        validate_core(doc)


def test_everything_in_namespace_mer() -> None:
    for name, doc in documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "mer", name


def test_project_containers_use_the_project_image() -> None:
    """One image for all project pods: the docs' `sed` rewrites exactly this string."""
    images = {c["image"] for _, doc in documents() for c in containers(doc)}
    ours = {i for i in images if "mer-platform" in i}
    assert ours == {PROJECT_IMAGE}
    assert images - ours <= {"postgres:15", "quay.io/minio/minio:latest", "quay.io/minio/mc:latest"}
    kfp_pipeline = importlib.import_module("mer.pipelines.kfp_pipeline")
    assert kfp_pipeline.DEFAULT_IMAGE == PROJECT_IMAGE


def _created_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic` commands of docs/deployment.md (cluster guide)."""
    text = (REPO / "docs" / "deployment.md").read_text().replace("\\\n", " ")
    found: dict[str, set[str]] = {}
    for match in re.finditer(r"create secret generic (\S+)([^\n]*)", text):
        found[match.group(1)] = set(re.findall(r"--from-literal=(\w+)=", match.group(2)))
    return found


def test_references_resolve() -> None:
    """Secrets (created by the documented commands), ConfigMaps, claims and Service selectors all exist."""
    secrets = _created_secrets()
    configmaps = {d["metadata"]["name"]: set(d["data"]) for d in by_kind("ConfigMap")}
    claims = {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}
    for name, doc in documents():
        for template in pod_templates(doc):
            spec = template["spec"]
            claim_templates = {t["metadata"]["name"] for t in doc.get("spec", {}).get("volumeClaimTemplates", [])}
            volumes = {v["name"] for v in spec.get("volumes", [])} | claim_templates
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, name
            for container in spec["containers"]:
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, (name, mount)
                for source in container.get("envFrom", []):
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in secrets, name
                    if "configMapRef" in source:
                        assert source["configMapRef"]["name"] in configmaps, name
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets.get(ref["name"], set()), (name, ref)
    for service in by_kind("Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= t["metadata"]["labels"].items() for _, d in documents() for t in pod_templates(d)), \
            service["metadata"]["name"]


def test_raycluster_shape() -> None:
    cluster = by_kind("RayCluster")[0]["spec"]
    ray = pytest.importorskip("ray")
    assert cluster["rayVersion"] == ray.__version__, "rayVersion must match the Ray in the image"
    assert cluster["enableInTreeAutoscaling"] is True
    assert 0 < cluster["autoscalerOptions"]["idleTimeoutSeconds"] <= 600  # idle GPU workers do go away
    # The head runs the GCS, the job server and the drivers, no task: every fold waits for a worker.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head_limits = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():  # both scale from zero pods: an idle cluster is one head
        assert group["minReplicas"] == group["replicas"] == 0 < group["maxReplicas"]
        assert "num-gpus" not in group["rayStartParams"]  # KubeRay takes it from the nvidia.com/gpu limit
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for template in pod_templates({"kind": "RayCluster", "spec": cluster}):
        sources = template["spec"]["containers"][0]["envFrom"]
        assert {"configMapRef": {"name": "mer-env"}} in sources and {"secretRef": {"name": "mer-s3"}} in sources
    env_keys = by_kind("ConfigMap")[0]["data"]
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"} <= set(env_keys)


def test_rayjob_runs_the_loso_driver_on_the_cluster() -> None:
    job = by_kind("RayJob")[0]["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": by_kind("RayCluster")[0]["metadata"]["name"]}
    command = job["entrypoint"].split()
    assert command[:5] == ["python", "-m", "mer.pipelines.loso", "--params", "params.yaml"]
    assert job["shutdownAfterJobFinishes"] is False  # the selected cluster is shared, not owned by the job
    assert importlib.util.find_spec("mer.pipelines.loso") is not None, "the RayJob entrypoint module is missing"
    # The folds ask for GPUs (a fraction: several small folds share one), the driver for nothing (it stays on the
    # head, whose num-cpus is 0).
    overrides = dict(arg.split("=", 1) for flag, arg in zip(command[5::2], command[6::2]) if flag == "-S")
    assert 0 < float(overrides["tune.fold_gpus"]) <= 1
    assert job.get("entrypointNumCpus", 0) == 0 and job.get("entrypointNumGpus", 0) == 0
    assert "entrypointResources" not in job
    from mer.components.settings import load_params

    params = load_params(REPO / "params.yaml", overrides)  # the overrides are valid keys and values
    assert params.tune.fold_gpus == float(overrides["tune.fold_gpus"])


def test_mlflow_server_stores() -> None:
    (server,) = [c for c in containers(next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "mer-mlflow"))]
    args = dict(a.lstrip("-").split("=", 1) for a in server["args"])
    backend = "postgresql+psycopg2://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@mer-postgres:"
    assert args["backend-store-uri"].startswith(backend)
    assert args["artifacts-destination"].startswith("s3://mer-mlflow/")
    # Kubernetes expands $(VAR) in args only for variables the container defines; undefined ones stay literal.
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD"} <= {e["name"] for e in server["env"]}
    buckets_job = next(d for d in by_kind("Job") if d["metadata"]["name"] == "mer-minio-buckets")
    script = containers(buckets_job)[0]["args"][0]
    assert "mer-mlflow" in script and "mer-dvc" in script


def test_dockerfile_installs_the_lock_file_and_the_project() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "pip install -r requirements.lock" in dockerfile
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
        for item in source.split():
            assert item == "requirements.lock" or (REPO / item).exists(), item
    ignore = (INFRA / "Dockerfile.dockerignore").read_text()
    assert "!requirements.lock" in ignore and "!mer_model/" in ignore
