"""Dataset loaders behind one call: `load_annotations(source, root, annotation=None, **options)`.

Each loader reads a dataset in its native (as distributed) layout and returns the unified annotation table of
`mer.model.data.schema`. Each module registers its datasets (`register_dataset`: a `DatasetEntry` with the loader,
the subject normaliser, the options it accepts and the columns it provides) on the `DATASETS` registry, and every
module of this package is imported (pkgutil), so adding a dataset is adding a module here.

Subjects are normalised in ONE place per dataset: the function registered with the loader (`subject_name`) turns any
spelling a sheet uses (`6`, `6.0`, `006`; `1`, `01`, `sub01`) into the dataset's own folder name, and every loader
uses it both for the table's `subject` and wherever it builds a file name from a subject (frame folders, the
composite's flow maps, the composite's AU join), so keys are compared in that one form.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mer.model.errors import ConfigError
from mer.model.registry import Registry

Loader = Callable[..., pd.DataFrame]
SubjectNormaliser = Callable[..., str]


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset.

    * `load(root, annotation, frames=True, **options) -> table` reads the native layout (`annotation` None: the
      loader's default sheet under root);
    * `subject(raw, file=, row=) -> folder name`, the dataset's subject normaliser (None for a composite, whose
      rows keep their source datasets' subjects);
    * `options`: the `data.*` settings the loader accepts beyond `frames` (e.g. `au_sheets` of the composite):
      ingest passes exactly these and warns, naming it, about one set for a dataset that does not accept it;
    * `provides`: the optional table columns (mer.model.data.schema) the loader can fill, i.e. what the data can
      feed (`frames_dir`: frame-based modalities; `flow_path`/`apex_path`: the composite's maps and crops;
      `aus`/`au_coded`: AU coding).
    """

    name: str
    load: Loader
    subject: SubjectNormaliser | None = None
    options: tuple[str, ...] = ()
    provides: frozenset[str] = frozenset()
    description: str = ""


DATASETS: Registry[DatasetEntry] = Registry("dataset", "data.source", "mer_model/data/loaders/<name>.py")


def register_dataset(name: str, load: Loader, subject: SubjectNormaliser | None = None, *,
                     options: tuple[str, ...] = (), provides: tuple[str, ...] = (), description: str = ""
                     ) -> DatasetEntry:
    """Register dataset `name` (a duplicate name from another place is an error naming both). An option the loader
    does not take as a keyword is refused here, not when a user sets it."""
    params = inspect.signature(load).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [o for o in options if o not in params and not takes_any]
    if missing:
        raise ValueError(f"dataset {name}: the loader takes no option {missing[0]!r}")
    entry = DatasetEntry(name, load, subject, tuple(options), frozenset(provides), description)
    return DATASETS.add(name, entry, stacklevel=2)


def subject_name(dataset: str, raw: object, *, file: str | Path | None = None, row: int | None = None) -> str:
    """The normalised subject (the dataset's folder name, e.g. `sub01`, `006`, `s03`, `spNO.1`) of a raw cell."""
    normalise = DATASETS.get(dataset).subject
    if normalise is None:
        with_subjects = [n for n, e in DATASETS.items() if e.subject is not None]
        raise ConfigError(f"no subject normaliser for dataset {dataset!r} (known: {', '.join(with_subjects)})")
    return normalise(raw, file=Path(file) if file else None, row=row)


def load_annotations(source: str, root: str | Path, annotation: str | Path | None = None, **options: Any
                     ) -> pd.DataFrame:
    """Load dataset `source` from `root` (annotation sheet: `annotation`, or the loader's default file under root).

    Options: `frames=False` skips locating frames (annotation-only use); the dataset's own `options` (e.g.
    `au_sheets={dataset: path}` for megc2019). ConfigError naming `data.source` for an unknown dataset.
    """
    return DATASETS.get(source).load(Path(root).expanduser().resolve(),
                                     Path(annotation).expanduser().resolve() if annotation else None, **options)


# Every module of this package registers its datasets when imported: adding a dataset is adding a module here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
