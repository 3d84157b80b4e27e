"""Dataset loaders behind one call: `load_annotations(source, root, annotation=None, **options)`.

Each loader reads a dataset in its native (as distributed) layout and returns the unified annotation table of
`mer_model.data.schema`. Loaders register themselves by dataset name, so adding a dataset is adding a module here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from mer_model.errors import ConfigError

Loader = Callable[..., pd.DataFrame]
LOADERS: dict[str, Loader] = {}
_MODULES = ("casme2", "samm", "smic", "casme3", "megc2019")


def register(name: str, loader: Loader) -> None:
    LOADERS[name] = loader


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
