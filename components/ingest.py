"""`mer ingest`: the dataset named in params.data -> the unified annotation table, its exclusions and a summary.

Outputs (beside params.data.ingested, e.g. data/ingested/annotations.csv):
* `annotations.csv` -- the labelled table (mer.model.data.schema), read back with `mer.model.data.read_table`;
* `annotations.exclusions.csv` -- every row left out, with `stage` (class_set/disk), `reason` and `detail`;
* `annotations.summary.json` -- counts per dataset, class, exclusion reason and warning.
Each is written atomically (`mer.model.io`): an interrupted ingest leaves the previous files, never half of one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from mer.components.settings import Params
from mer.model.config import DataConfig
from mer.model.data import DATASETS, apply_class_set, check_table, get_class_set, load_annotations, validate_table
from mer.model.errors import DataError
from mer.model.io import write_csv, write_json

log = logging.getLogger(__name__)


def output_paths(params: Params) -> dict[str, Path]:
    table = Path(params.data.ingested)
    return {
        "table": table,
        "exclusions": table.with_name(f"{table.stem}.exclusions.csv"),
        "summary": table.with_name(f"{table.stem}.summary.json"),
    }


def loader_options(data: DataConfig) -> dict[str, Any]:
    """The `data.*` settings the dataset's loader accepts (its registry entry's `options`, e.g. the composite's
    `au_sheets`); one that another dataset accepts, set here for a dataset that does not, is named in a warning and
    ignored."""
    accepted = DATASETS.get(data.source).options
    for option in dict.fromkeys(o for entry in DATASETS.entries() for o in entry.options):
        if option not in accepted and getattr(data, option):
            users = ", ".join(n for n, e in DATASETS.items() if option in e.options)
            log.warning("data.%s is only used by %s; ignored for %s", option, users, data.source)
    return {option: getattr(data, option) for option in accepted}


def ingest(params: Params) -> pd.DataFrame:
    """Load, label (params.data.class_set), check against disk (params.data.strict), write; returns the table."""
    data = params.data
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise DataError("data.root: directory not found", file=str(root))
    class_set = get_class_set(data.class_set)
    loaded = load_annotations(data.source, root, data.annotation, **loader_options(data))
    labelled, by_class = apply_class_set(loaded, class_set, strict=data.strict)
    kept, by_disk, checks = check_table(labelled, strict=data.strict)
    if kept.empty:
        raise DataError(f"no sample of {data.source} passed the disk checks (see the warnings above)", file=str(root))
    validate_table(kept)

    paths = output_paths(params)
    exclusions = pd.concat([by_class.assign(stage="class_set"), by_disk.assign(stage="disk")], ignore_index=True)
    summary = {
        "source": data.source, "root": str(root.resolve()), "class_set": class_set.name,
        "classes": list(class_set.names), "loaded": len(loaded), "ingested": len(kept),
        "subjects": int(kept["subject"].nunique()),
        "per_dataset": {str(k): int(v) for k, v in kept["dataset"].value_counts().sort_index().items()},
        "per_class": {class_set.names[int(k)]: int(v) for k, v in kept["label"].value_counts().sort_index().items()},
        "excluded": {str(k): int(v) for k, v in exclusions["reason"].value_counts().items()},
        "excluded_per_dataset": {str(k): int(v) for k, v in exclusions["dataset"].value_counts().sort_index().items()},
        "warnings": dict(checks.warnings),
    }
    # Table first, summary last: preprocessing reads the summary's class names beside a complete table.
    write_csv(paths["table"], kept)
    write_csv(paths["exclusions"], exclusions)
    write_json(paths["summary"], summary)
    log.info("ingested %d of %d samples (%d subjects) -> %s; %d excluded -> %s", len(kept), len(loaded),
             summary["subjects"], paths["table"], len(exclusions), paths["exclusions"])
    return kept
