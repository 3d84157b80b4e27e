"""Fold concurrency follows the Ray cluster: folds ask Ray for their own resources, so an autoscaling cluster whose
GPU workers start at zero grows to run them; a fold that no node can hold fails in one line instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, tiny_data, tiny_params
from tests.servers import LocalRay, ray_head

# Ray's fake multi-node provider (what ray.cluster_utils.AutoscalingCluster configures; its own start() cannot be
# used here, see fake_gpu_cluster): a CPU-only head and a GPU worker type starting at zero nodes.
GPU_WORKER = {"CPU": 1, "GPU": 1, "object_store_memory": 200 * 2**20}


def fake_gpu_cluster() -> dict[str, Any]:
    """The autoscaling config AutoscalingCluster(head_resources={"CPU": 1}, worker_node_types={"gpu": ...}) builds.

    AutoscalingCluster itself cannot run here: its constructor reads fake_multi_node/example.yaml, which the Ray
    2.60 wheel does not ship (FileNotFoundError), and its start()/shutdown() run `ray stop --force`, which kills
    every Ray process of the user on the machine (the session's Ray, other clusters). So the same config is given to
    a head of our own (tests.servers.ray_head: loopback, free ports, own temp dir), and the real autoscaler and fake
    provider do the rest."""
    return {
        "cluster_name": "mer-fake-gpu", "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": dict(GPU_WORKER), "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,  # the workers stay up until the test has looked at them
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def _gpu_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


@pytest.mark.slow
def test_loso_with_fold_gpus_grows_an_autoscaling_cluster_from_zero_gpu_workers(tiny_root: Path, tmp_path: Path,
                                                                                session_ray: LocalRay) -> None:
    """A LOSO asking 0.5 GPU per fold on a cluster with a CPU-only head and GPU workers at zero: the driver does not
    refuse (no sizing from start-time resources), the autoscaler starts GPU workers for the pending folds, and the
    run completes with every fold stored and pooled metrics written. Ray's GPUs here are fake (a node that says it
    has one): torch sees no CUDA on this machine, so the trainer runs on the CPU (train.device: cpu) on those nodes;
    what is tested is the scheduling, not GPU arithmetic."""
    import ray

    from mer.components.ray_session import connect_ray
    from mer.components.settings import load_params
    from mer.model.training.results import read_results

    path = tiny_params(tmp_path, tiny_data(tmp_path), **{
        "tune.fold_cpus": 0.5, "tune.fold_gpus": 0.5, "tune.final_model": False, "tracking.backend": "none",
        "tune.fold_node_wait_s": 120})
    log = tmp_path / "driver.log"
    ray.shutdown()  # leave the session's Ray; this process joins the autoscaling one to look at its nodes
    try:
        with ray_head(num_cpus=1, autoscaling=fake_gpu_cluster()) as head:
            connect_ray(head.address)
            assert not _gpu_nodes() and ray.cluster_resources().get("GPU", 0) == 0  # no GPU worker at start
            env = {**os.environ, "RAY_ADDRESS": head.address, "OMP_NUM_THREADS": "1"}
            env.pop("MLFLOW_TRACKING_URI", None)
            start = time.monotonic()
            with log.open("wb") as out:
                run = subprocess.run([sys.executable, "-m", "mer.pipelines.loso", "--params", str(path)], cwd=REPO,
                                     env=env, stdout=out, stderr=subprocess.STDOUT, timeout=240)
            assert run.returncode == 0, log.read_text(errors="replace")[-6000:]
            gpu_nodes = _gpu_nodes()
            assert 1 <= len(gpu_nodes) <= 2, ray.nodes()  # workers the autoscaler started, within max_workers
            assert all(n["Resources"]["GPU"] == 1 for n in gpu_nodes)
            text = log.read_text(errors="replace")
            assert "no node of the Ray cluster can hold one fold" in text, text[-4000:]  # it waited, not refused
            print(f"autoscaling LOSO: {time.monotonic() - start:.0f} s, {len(gpu_nodes)} GPU worker(s)")
            ray.shutdown()
    finally:
        ray.shutdown()
        connect_ray(session_ray.address)  # back to the session's Ray for the tests that follow

    params = load_params(path)
    results = read_results(params.tune.results)
    assert results.summary.folds == 4 and len(results.folds) == 4
    assert sorted(f.fold for f in results.folds) == sorted(results.predictions["fold"].unique())
    assert {"uf1", "uar", "accuracy"} <= set(results.summary.metrics)
    stored = list((Path(params.tune.storage_path)).glob("*/folds/*/result.json"))
    assert len(stored) == 4


@pytest.mark.slow
def test_a_fold_no_node_can_hold_fails_in_one_line(tiny_root: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """tune.fold_gpus: 1 on the session's CPU-only Ray, with tune.fold_node_wait_s short: no node can hold a fold
    and none joins, so `mer tune` exits 2 with one line naming the settings and what the cluster has (instead of
    folds pending forever)."""
    from mer.pipelines.cli import main

    path = tiny_params(tmp_path, tiny_data(tmp_path), **{"tune.fold_gpus": 1, "tune.fold_node_wait_s": 3,
                                                         "tracking.backend": "none"})
    capsys.readouterr()
    start = time.monotonic()
    assert main(["tune", "--params", str(path)]) == 2
    took = time.monotonic() - start
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line or "Traceback" in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "tune.fold_cpus/tune.fold_gpus" in line and "1 GPU" in line and "tune.fold_node_wait_s" in line, line
    assert "2 CPU / 0 GPU in all" in line, line
    assert 3 <= took < 60, took

    # A Ray that cannot grow (the private local head a `mer` command starts without an address) is said at once.
    from mer.model.errors import ConfigError
    from mer.pipelines.engine.trial import wait_for_fold_node

    start = time.monotonic()
    with pytest.raises(ConfigError, match="1 GPU on one node .* 0 GPU in all.*local Ray cannot grow"):
        wait_for_fold_node(1, 1, 0)
    assert time.monotonic() - start < 5
