"""What a Kubeflow step does inside its pod, for every step alike (its StageEntry, pipelines/stages.py): run the
stage's function (the one `mer <stage>` runs) in a fresh working directory whose inputs are the upstream steps'
artifacts, then move the stage's outputs into its output artifact.

Given a Ray job server (`ray_dashboard`), a step whose entry names a `ray_job` command (preprocess, tune) instead
submits that command as a Ray job (pipelines/ray_jobs.py) that runs in the same working directory on the cluster's
head: the directory is then on the shared volume the pipeline mounts (`shared_dir`, which the Ray pods mount at the
same path), and the inputs are copied into it rather than linked to the pod's artifact paths.

The working directory is `<shared_dir>/mer-kfp-<key>`: for the cached steps (ingest, preprocess) the key is
`data_key`, a digest of the parameters and the data version, the same in both steps and in every run of the same
data, so absolute paths ingest records (frame folders) resolve in preprocess, a cached ingest's too; for the other
steps (tune, evaluate, register) it is the pipeline run's id.

Kept apart from pipelines/kfp_pipeline.py (the pipeline DEFINITION) because KFP's executor loads kfp in a runtime-only
mode in which the compiler cannot be imported; this module imports nothing from kfp.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mer.components.settings import Params, load_params
from mer.model.errors import ServiceError
from mer.model.io import atomic_write, write_json
from mer.pipelines.ray_jobs import DASHBOARD_KEY, DEFAULT_TIMEOUT_S, RayJobs, submission_id
from mer.pipelines.stages import STAGES, PathKey, companions, upstream

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PATHS_FILE = "paths.json"  # in every artifact: the params-relative paths it carries
COPIED_FILE = "copied-inputs.json"  # in a Ray job's working directory: the inputs copied there, removed at the end


def resolve_params(params_file: str, overrides: dict[str, Any], ray_address: str) -> tuple[dict[str, Any], Params]:
    """params.yaml with the run's overrides applied and validated; `ray_address` goes to every Ray-using section."""
    path = Path(params_file)
    path = path if path.is_absolute() else PROJECT_ROOT / path
    cluster = {"preprocess.ray_address": ray_address, "tune.ray_address": ray_address} if ray_address else {}
    params = load_params(path, {**overrides, **cluster})  # the one loader: an empty or broken file is one line
    return params.model_dump(mode="json", by_alias=True), params


def data_key(params_file: str, overrides: dict[str, Any], data_version: str) -> str:
    """The cached steps' key: the resolved parameters and the data version, digested (what makes their output)."""
    raw, _ = resolve_params(params_file, overrides, "")
    text = json.dumps({"params": raw, "data_version": data_version}, sort_keys=True, default=str)
    return "data-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def step_outputs(step: str, params: Params) -> list[str]:
    """The params-relative paths a step produces (what its output artifact carries): the outputs of the stages run
    first in its pod (stages.companions), its own outputs, and its working state where that is local."""
    entry = STAGES[step]
    local_state = [path for path in (key.resolve(params) for key in entry.state) if "://" not in path]
    return [path for companion in companions(step, params) for path in companion.output_paths(params)] + [
        *entry.output_paths(params), *local_state]


def _link_inputs(inputs: list[str], workdir: Path) -> None:
    for artifact in map(Path, inputs):
        for rel in json.loads((artifact / PATHS_FILE).read_text()):
            target = workdir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(artifact / rel)


def _copy_inputs(inputs: list[str], workdir: Path) -> list[str]:
    """Copy (links followed) what the input artifacts carry into `workdir`; returns the params-relative paths."""
    copied = []
    for artifact in map(Path, inputs):
        for rel in json.loads((artifact / PATHS_FILE).read_text()):
            source, target = artifact / rel, workdir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target)
            copied.append(rel)
    return copied


def _collect_outputs(paths: list[str], workdir: Path, output: str, keep: bool = False) -> None:
    """Move (`keep`: copy) the outputs present into the output artifact and list them in its paths.json."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    present = [rel for rel in paths if (workdir / rel).exists()]
    missing = sorted(set(paths) - set(present))
    if missing:
        log.warning("step produced no %s", ", ".join(missing))
    for rel in present:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if not keep:
            shutil.move(str(workdir / rel), str(out / rel))
        elif (workdir / rel).is_dir():
            shutil.copytree(workdir / rel, out / rel, dirs_exist_ok=True)
        else:
            shutil.copy2(workdir / rel, out / rel)
    write_json(out / PATHS_FILE, present)


def run_step(step: str, key: str, params_file: str, overrides: dict[str, Any], tracking_uri: str,
             ray_address: str, inputs: list[str], output: str, ray_dashboard: str = "",
             ray_job_timeout_s: float = DEFAULT_TIMEOUT_S, shared_dir: str = "") -> None:
    """Run the step's stage function (after its companions: the synthetic set before a synthetic ingest) in a fresh
    working directory `<shared_dir>/mer-kfp-<key>` (`key`: the run id, or `data_key` for the cached steps;
    `shared_dir` empty: the temp dir); a step with a `ray_job` command given `ray_dashboard` runs that command as a
    Ray job there (`_job_step`)."""
    entry = STAGES[step]
    base = Path(shared_dir) if shared_dir else Path(tempfile.gettempdir())
    if shared_dir and not base.is_dir():
        raise ServiceError(f"shared_dir: {shared_dir} is not mounted in this step's pod (the pipeline's "
                           "shared_volume)")
    workdir = base / f"mer-kfp-{key}"
    if entry.kubeflow is not None and entry.kubeflow.ray_job and ray_dashboard:
        _job_step(step, key, params_file, overrides, tracking_uri, inputs, output, workdir, ray_dashboard,
                  ray_job_timeout_s)
        return
    raw, params = resolve_params(params_file, overrides, ray_address)
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    cwd = Path.cwd()
    try:
        atomic_write(workdir / "params.yaml", yaml.safe_dump(raw, sort_keys=False))
        _link_inputs(inputs, workdir)
        os.chdir(workdir)
        local = load_params("params.yaml")  # relative paths resolve in the working directory, as for `mer <step>`
        for companion in companions(step, local):
            log.info("kfp step %s: %s first", step, companion.name)
            companion.function(local)
        log.info("kfp step %s", step)
        entry.function(local)
        _collect_outputs(step_outputs(step, params), workdir, output)
    finally:
        os.chdir(cwd)
        shutil.rmtree(workdir, ignore_errors=True)


def _job_step(step: str, key: str, params_file: str, overrides: dict[str, Any], tracking_uri: str, inputs: list[str],
              output: str, workdir: Path, ray_dashboard: str, timeout_s: float) -> None:
    """A step on a cluster: its entry's `ray_job` command in `workdir` as the Ray job of this key and settings
    (pipelines/ray_jobs.py), then its outputs copied into the output artifact.

    A retry of the step (same key, same parameters) submits nothing new: it attaches to the job while it runs,
    takes its outputs when it SUCCEEDED, and resubmits it in the same directory after FAILED or STOPPED (finished
    folds and preprocessed clips are read back, not computed again). The working directory keeps the outputs for
    such a retry (the copied inputs are removed); the inputs and the job's own state are the only things written to
    the shared storage.
    """
    jobs = RayJobs(ray_dashboard)  # first: an unreachable job server is one line naming `ray_dashboard`
    raw, params = resolve_params(params_file, overrides, "")
    # Inside the job the command joins the job's own cluster (RAY_ADDRESS); an address in the parameters (e.g. a
    # ray:// one) would make it a Ray Client of that cluster instead.
    raw["tune"]["ray_address"] = None
    raw["preprocess"]["ray_address"] = None
    job_id = submission_id(key, raw, step)
    status = jobs.status(job_id)
    if status in ("PENDING", "RUNNING", "SUCCEEDED"):
        log.info("kfp step %s: Ray job %s is %s already (an earlier attempt of this step): not submitted again",
                 step, job_id, status)
    else:
        if status is None:  # a first attempt: a fresh directory, as for the other steps
            shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        atomic_write(workdir / "params.yaml", yaml.safe_dump(raw, sort_keys=False))
        copied = _copy_inputs(inputs, workdir)
        write_json(workdir / COPIED_FILE, copied)
        env = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
        entrypoint = f"cd {shlex.quote(str(workdir))} && {STAGES[step].kubeflow.ray_job} --params params.yaml"
        jobs.submit(job_id, entrypoint, env)
    jobs.wait(job_id, timeout_s)
    expected = workdir / step_outputs(step, params)[0]
    if not expected.exists():
        raise ServiceError(f"{DASHBOARD_KEY}: Ray job {job_id} SUCCEEDED but {expected} is missing here: the "
                           "working directory (shared_dir) must be storage the Ray head shares at the same path")
    _collect_outputs(step_outputs(step, params), workdir, output, keep=True)
    copied_file = workdir / COPIED_FILE
    for rel in json.loads(copied_file.read_text()) if copied_file.exists() else []:
        target = workdir / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def log_metrics(metrics_dir: str, metrics_file: str, sink: Any) -> None:
    """Copy the scalar numbers of metrics.json (one level of nesting flattened) to a KFP Metrics artifact."""
    data = json.loads((Path(metrics_dir) / metrics_file).read_text())
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, number in items:
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                sink.log_metric(f"{key}.{sub}" if sub else key, float(number))


def run_component(step: str, values: dict[str, Any]) -> None:
    """What the generated Kubeflow component of `step` does (pipelines/kfp_pipeline.py): `values` are its inputs by
    name (pipeline parameters, the upstream steps' artifacts, its output artifact). Keyed by `data_key` when cached,
    else by the run; then its metrics file, if it has one, copied to its Metrics artifact."""
    step_kfp = STAGES[step].kubeflow
    params_file, overrides = values["params_file"], values["overrides"]
    key = data_key(params_file, overrides, values["data_version"]) if step_kfp.cached else values["run_id"]
    output = values[step_kfp.artifact].path
    run_step(step, key, params_file, overrides, values.get("tracking_uri", ""), values.get("ray_address", ""),
             [values[entry.kubeflow.artifact].path for entry in upstream(step)], output,
             ray_dashboard=values.get("ray_dashboard", ""),
             ray_job_timeout_s=values.get("ray_job_timeout_s", DEFAULT_TIMEOUT_S), shared_dir=values["shared_dir"])
    if step_kfp.metrics:
        _, params = resolve_params(params_file, overrides, "")
        log_metrics(output, PathKey(step_kfp.metrics).resolve(params), values["metrics"])
