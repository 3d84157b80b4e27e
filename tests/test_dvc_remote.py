"""`dvc push` / `dvc pull` round trip through an S3 remote (moto's server standing in for MinIO / AWS S3).

The remote is configured exactly as the README (Running on a cluster) tells users to: the bucket URL in the committed .dvc/config, the
endpoint only in .dvc/config.local (`dvc remote modify --local`), credentials only in the environment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import boto3
import numpy as np
import pytest

from tests.servers import S3_KEY_ID, S3_SECRET, VENV_BIN, s3_env, s3_server

pytestmark = pytest.mark.slow
BUCKET = "mer-dvc"


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write_cache_like_data(root: Path) -> None:
    """A small stand-in for data/preprocessed: per-sample npz files, an index and a manifest."""
    rng = np.random.default_rng(0)
    samples = root / "samples"
    samples.mkdir(parents=True)
    for i in range(3):
        np.savez_compressed(samples / f"synthetic__s{i}__clip.npz", flow28=rng.random((3, 28, 28), dtype=np.float32))
    (root / "index.csv").write_text("sample_id,status\n" + "".join(f"synthetic/s{i}/clip,ok\n" for i in range(3)))
    (root / "manifest.json").write_text('{"samples": 3}\n')


def test_dvc_push_pull_roundtrip_through_s3(tmp_path: Path) -> None:
    dvc = str(VENV_BIN / "dvc")
    with s3_server(buckets=(BUCKET,)) as endpoint:
        env = {**os.environ, **s3_env(endpoint), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
               "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
        repo = tmp_path / "repo"
        data = repo / "data" / "preprocessed"
        _write_cache_like_data(data)
        expected = _digest(data)

        _run(["git", "init", "-q"], repo, env)
        _run([dvc, "init", "-q"], repo, env)
        _run([dvc, "remote", "add", "-d", "storage", f"s3://{BUCKET}/store"], repo, env)
        _run([dvc, "remote", "modify", "--local", "storage", "endpointurl", endpoint], repo, env)
        _run([dvc, "add", "-q", "data/preprocessed"], repo, env)

        committed = (repo / ".dvc" / "config").read_text()
        assert f"s3://{BUCKET}/store" in committed and endpoint not in committed and S3_SECRET not in committed
        assert endpoint in (repo / ".dvc" / "config.local").read_text()

        _run([dvc, "push", "-q"], repo, env)
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY_ID,
                          aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        keys = [obj["Key"] for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix="store/").get("Contents", [])]
        # 5 files plus the .dir listing object of the tracked directory.
        assert len(keys) == len(expected) + 1, keys

        shutil.rmtree(data)
        shutil.rmtree(repo / ".dvc" / "cache")
        _run([dvc, "pull", "-q"], repo, env)
        assert _digest(data) == expected
