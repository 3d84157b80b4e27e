"""Dataset loaders behind one call: `load_annotations(source, root, annotation=None, **options)`.

Each loader reads a dataset in its native (as distributed) layout and returns the unified annotation table of
`mer_model.data.schema`. Loaders register themselves by dataset name, so adding a dataset is adding a module here.

Subjects are normalised in ONE place per dataset: the function registered with the loader (`subject_name`) turns any
spelling a sheet uses (`6`, `6.0`, `006`; `1`, `01`, `sub01`) into the dataset's own folder name, and every loader
uses it both for the table's `subject` and wherever it builds a file name from a subject (frame folders, the
composite's flow maps, the composite's AU join), so keys are compared in that one form.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from mer_model.errors import ConfigError

Loader = Callable[..., pd.DataFrame]
SubjectNormaliser = Callable[..., str]
LOADERS: dict[str, Loader] = {}
SUBJECTS: dict[str, SubjectNormaliser] = {}
_MODULES = ("casme2", "samm", "smic", "casme3", "megc2019")


def register(name: str, loader: Loader, subject: SubjectNormaliser | None = None) -> None:
    """Register `loader` for dataset `name`, with the dataset's subject normaliser where it has subjects of its own
    (`subject(raw, file=, row=) -> folder name`, DataError naming file and row for an impossible spelling)."""
    LOADERS[name] = loader
    if subject is not None:
        SUBJECTS[name] = subject


def subject_name(dataset: str, raw: object, *, file: str | Path | None = None, row: int | None = None) -> str:
    """The normalised subject (the dataset's folder name, e.g. `sub01`, `006`, `s03`, `spNO.1`) of a raw cell."""
    if dataset not in SUBJECTS:
        raise ConfigError(f"no subject normaliser for dataset {dataset!r} (known: {', '.join(sorted(SUBJECTS))})")
    return SUBJECTS[dataset](raw, file=Path(file) if file else None, row=row)


def load_annotations(source: str, root: str | Path, annotation: str | Path | None = None, **options: Any
                     ) -> pd.DataFrame:
    """Load dataset `source` from `root` (annotation sheet: `annotation`, or the loader's default file under root).

    Options: `frames=False` skips locating frames (annotation-only use); `au_sheets={dataset: path}` for megc2019.
    """
    if source not in LOADERS:
        raise ConfigError(f"data.source: unknown dataset {source!r} (known: {', '.join(sorted(LOADERS))})")
    return LOADERS[source](Path(root).expanduser().resolve(),
                           Path(annotation).expanduser().resolve() if annotation else None, **options)


for _module in _MODULES:
    importlib.import_module(f"{__name__}.{_module}")
