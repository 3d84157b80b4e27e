"""The cache's modalities: which arrays exist, which a model reads, and what each one's content depends on.

Why per modality: preprocessing dominates an experiment's cost and models read very different inputs (STSTNet the
28x28 flow map only, MOL 128 px sequences with their flows and landmarks), so the stage computes only what the
configured model(s) read, a later model adds only what is missing, and a sample is dropped only for a modality the
chosen model reads (docs/architecture.md, "Preprocessed cache").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mer.model.batch_keys import BATCH_KEYS
from mer.model.config import ModelConfig, PreprocessConfig
from mer.model.data.aus import AU_LIST
from mer.model.errors import ConfigError

MODALITIES: tuple[str, ...] = tuple(BATCH_KEYS.names())  # canonical order: the batch keys' registration order
CACHE_FORMAT = 2  # bump when the entry layout changes: every entry is then recomputed

# Annotation columns that shape the arrays (a changed label or sheet row number recomputes nothing).
ROW_COLUMNS = ("sample_id", "dataset", "onset", "apex", "offset", "frames_dir", "frame_template", "n_frames",
               "flow_path", "apex_path", "landmarks_path", "points5", "aus", "au_coded")


def check_modalities(keys: Iterable[str], what: str = "preprocess.modalities") -> tuple[str, ...]:
    """`keys` in canonical order, without repeats; an unknown name is a ConfigError naming `what`."""
    keys = list(keys)
    unknown = [k for k in keys if k not in MODALITIES]
    if unknown:
        raise ConfigError(f"{what}: unknown cache array {unknown[0]!r} (known: {', '.join(MODALITIES)})")
    return tuple(k for k in MODALITIES if k in keys)


def model_modalities(name: str, config: str = "paper", **kwargs: Any) -> tuple[str, ...]:
    """The modalities one model configuration reads: its inputs and its loss targets (not `label`, which comes from
    the annotation table). Uses the registry's `model_io`, so no network is built."""
    from mer.model.models.registry import model_io  # the registry imports torch: only when asked

    inputs, targets = model_io(name, config, **kwargs)
    return check_modalities([k for k in (*inputs, *targets) if k != "label"], f"model {name}/{config} reads")


def modalities_for(models: Iterable[tuple[str, str, Mapping[str, Any]]]) -> tuple[str, ...]:
    """The union of what several models read, e.g. every model of a benchmark: [(name, config, kwargs), ...]."""
    union: set[str] = set()
    for name, config, kwargs in models:
        union.update(model_modalities(name, config, **dict(kwargs)))
    return check_modalities(union)


def requested(cfg: PreprocessConfig, model: ModelConfig) -> tuple[str, ...]:
    """What a `mer preprocess` run computes: `preprocess.modalities` when set, else what `model` reads."""
    if cfg.modalities:
        return check_modalities(cfg.modalities)
    return model_modalities(model.name, model.config, **model.kwargs)


def stored_keys(modality: str) -> tuple[str, ...]:
    """The array names an entry of `modality` holds."""
    return BATCH_KEYS[modality].stored


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics shape the arrays (a new OpenCV may give a different TV-L1 flow)."""
    import cv2
    import dlib

    return {"opencv": cv2.__version__, "dlib": dlib.__version__, "numpy": np.__version__}


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _text(value: Any) -> str:
    """A table cell as text, the same for a row of the ingested table and an annotation-like dict."""
    if value is None or (not isinstance(value, str) and pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def input_hashes(row: Mapping[str, Any], cfg: PreprocessConfig, modalities: Sequence[str],
                 versions: Mapping[str, str]) -> dict[str, str]:
    """modality -> hash of everything its arrays depend on: the cache format, the parameters its batch key `depends`
    on (plus the TV-L1 parameters where the apex must be estimated from motion), the library versions, the AU
    vocabulary and the annotation row's array-shaping columns."""
    section = cfg.model_dump(mode="json", by_alias=True)
    row_part = {c: _text(row.get(c)) for c in ROW_COLUMNS}
    if _text(row.get("points5_estimated")):  # only where set, so the hashes of every other row are unchanged
        row_part["points5_estimated"] = _text(row.get("points5_estimated"))
    estimated_apex = not row_part["apex"] and not row_part["flow_path"]
    out = {}
    for modality in modalities:
        fields = BATCH_KEYS[modality].depends + (("flow",) if estimated_apex else ())
        payload = {"format": CACHE_FORMAT, "modality": modality, "versions": dict(versions), "row": row_part,
                   "params": {f: _lookup(section, f) for f in sorted(set(fields))},
                   "au_list": list(AU_LIST) if modality == "aus" else None}
        out[modality] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    return out
