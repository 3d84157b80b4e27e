"""Services that are down or misconfigured (issue 12, item 5): each is one line naming the setting, exit code 2,
within a bounded time and before anything else starts -- not minutes of retries or a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TrackingStack, tiny_data, tiny_params
from tests.servers import free_port

BOUND_S = 180  # generous for a busy 2-core machine; the failure modes fixed here took minutes or hung


def _mer(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=BOUND_S)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if ": error: " in line]
    return line


def test_unreachable_ray_address_is_one_line_naming_the_setting(tiny_root: Path, tmp_path: Path) -> None:
    """`tune.ray_address` (mer tune) and RAY_ADDRESS (mer preprocess) pointing at a port nobody listens on."""
    dead = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    params = tiny_params(tmp_path, tiny_data(tmp_path), **{"tune.ray_address": dead, "tracking.backend": "none"})
    line = _one_error_line(_mer("tune", "--params", str(params), env=env))
    assert line.startswith("mer tune: error: tune.ray_address: " + dead) and "no Ray cluster reachable" in line

    fresh = tiny_params(tmp_path, tiny_data(tmp_path), **{"preprocess.out": str(tmp_path / "preprocessed")})
    line = _one_error_line(_mer("preprocess", "--params", str(fresh), env={**env, "RAY_ADDRESS": dead}))
    assert line.startswith("mer preprocess: error: RAY_ADDRESS: " + dead) and "no Ray cluster reachable" in line


def test_tracking_server_down_is_one_line_naming_the_uri(tiny_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`mer tune` (before Ray or any run starts) and `mer predict` with a registry URI, the server not running."""
    from pipelines.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    down = f"http://127.0.0.1:{free_port()}"
    params = tiny_params(tmp_path, tiny_data(tmp_path), **{"tracking.uri": down})
    for args in (["tune", "--params", str(params)], ["predict", "--params", str(params), "--model", "models:/m/1",
                                                     str(tmp_path)]):
        assert main(args) == 2
        [line] = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert f"tracking.uri: {down}: tracking server not reachable" in line, line


def test_bare_postgresql_uri_uses_the_installed_driver(tracking_stack: TrackingStack,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`postgresql://` as users write it (SQLAlchemy would pick psycopg 3, not installed) reaches the database."""
    from components.tracking import tracking_uri
    from components.tracking.mlflow_tracker import MlflowTracker
    from mer_model.config import TrackingConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pg = tracking_stack.postgres
    bare = f"postgresql://{pg.user}:{pg.password}@{pg.host}:{pg.port}/mlflow"
    cfg = TrackingConfig(uri=bare, experiment="bare-postgresql")
    assert tracking_uri(cfg) == pg.uri("mlflow")
    assert "bare-postgresql" in MlflowTracker(cfg, "test", "unknown").check()
