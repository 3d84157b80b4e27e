"""What the driver checks before it starts anything (torch, Ray, the tracker): a configuration error costs `mer tune`
about a second and one line, not a minute of imports and a Ray start.

It imports neither Ray nor MLflow (torch only for the model registry): the tune stage (`mer.pipelines.loso.tune`) calls it
before importing the driver, and `run_tune` calls it first too, for `mer benchmark`.
"""

from __future__ import annotations

from pathlib import Path

from mer.components.common import check_output_dir
from mer.components.settings import Params
from mer.model.errors import ConfigError
from mer.model.io import digest
from mer.model.preprocess.cache import require_index


def check_experiment(params: Params) -> tuple[str, ...]:
    """Output locations writable, the preprocessed cache present, the model known, and every cache entry the model
    reads intact (size, SHA-256, a readable npz, finite values: `SampleStore.verify`); returns the batch keys the
    model reads. Raises a MerError naming the key or file, so a truncated or NaN entry is one line before Ray starts,
    not three Ray tracebacks from fold tasks. Only the model and cache checks import torch (the model registry, with
    timm: seconds on a busy machine), so they come last."""
    cfg = params.tune
    check_output_dir(cfg.results, "tune.results")
    if "://" not in cfg.storage_path:
        check_output_dir(cfg.storage_path, "tune.storage_path")
    elif cfg.storage_path.startswith("s3://"):
        check_s3_credentials(cfg.storage_path, "tune.storage_path")
    require_index(params.preprocess.out)
    from mer.model.models import model_inputs  # torch

    inputs = model_inputs(params.model.name, params.model.config, **params.model.kwargs)
    check_cache(params.preprocess.out, inputs)
    return inputs


_VERIFIED: set[tuple[str, str, tuple[str, ...]]] = set()  # caches verified in this process (`mer tune` checks twice)


def check_cache(cache_dir: str, inputs: tuple[str, ...]) -> None:
    """Every usable sample has the arrays the model reads and their entries are intact (DataError naming the file)."""
    from mer.model.training.data import SampleStore  # torch

    root = Path(cache_dir).resolve()
    entries = root / "modalities.csv"
    key = (str(root), digest(entries.read_bytes()) if entries.is_file() else "", tuple(inputs))
    if key in _VERIFIED:
        return
    store = SampleStore.open(root)
    ids = list(store.index["sample_id"])
    store.check_inputs(ids, inputs)
    store.verify(ids, inputs)
    _VERIFIED.add(key)


def check_s3_credentials(uri: str, key: str) -> None:
    """AWS credentials are configured (environment, shared files or an instance role, as boto3 and pyarrow find
    them) for an s3:// location; otherwise the run would only fail once Ray and the tracked runs had started."""
    import boto3  # boto3's credential chain: the same sources pyarrow's S3 filesystem reads

    if boto3.Session().get_credentials() is None:
        raise ConfigError(f"{key}: {uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")


def setting_warnings(params: Params) -> list[str]:
    """Settings that are valid but probably not meant (the driver logs each once per experiment)."""
    warnings = []
    if params.train.tta == "flip" and not params.train.augment:
        warnings.append("train.tta: flip with train.augment false: every evaluation averages in a mirrored view "
                        "that training never showed the model (set train.tta: none, or train.augment: true)")
    return warnings
