"""The preprocessed cache as training data: a `SampleStore` over index.csv and per-sample npz files, and torch
datasets that turn cache arrays into the model batch (docs/architecture.md, "Model contract").

MER datasets are small (hundreds of clips), so arrays are read lazily and then kept in memory for the whole run: every
LOSO fold re-reads the same samples, and decompressing npz files each epoch would dominate the run time of small models.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mer_model.batch_keys import BATCH_KEYS
from mer_model.errors import DataError
from mer_model.training import augment as aug_lib

log = logging.getLogger(__name__)


class SampleStore:
    """Read access to a preprocessed cache (only rows with status 'ok')."""

    def __init__(self, root: Path, index: pd.DataFrame, class_names: Sequence[str], manifest: dict[str, Any]) -> None:
        self.root = root
        self.index = index.reset_index(drop=True)
        self.class_names = list(class_names)
        self.manifest = manifest
        self._rows = {sid: i for i, sid in enumerate(self.index["sample_id"])}
        self._cache: dict[tuple[str, str], np.ndarray] = {}
        self._keys: dict[str, frozenset[str]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to a Ray task or a spawned loader worker) without the array cache: the copy reloads lazily."""
        return {**self.__dict__, "_cache": {}}

    @classmethod
    def open(cls, cache_dir: str | Path, class_names: Sequence[str] | None = None) -> SampleStore:
        """Open `cache_dir` (index.csv, manifest.json, samples/). Class names come from `class_names`, else from the
        manifest's `class_names`, else are the label numbers (with a warning)."""
        root = Path(cache_dir)
        index_path = root / "index.csv"
        if not index_path.is_file():
            raise DataError("no index.csv; run `mer preprocess` first", file=str(root))
        index = pd.read_csv(index_path, keep_default_na=False, dtype={"sample_id": str, "subject": str,
                                                                       "dataset": str, "npz": str})
        for column in ("sample_id", "subject", "dataset", "label", "npz", "status"):
            if column not in index.columns:
                raise DataError(f"missing column '{column}'", file=str(index_path))
        ok = index[index["status"] == "ok"].copy()
        if ok.empty:
            raise DataError("no sample with status 'ok'", file=str(index_path))
        ok["label"] = ok["label"].astype(int)
        manifest_path = root / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        names = list(class_names) if class_names is not None else manifest.get("class_names")
        if names is None:
            names = [str(c) for c in range(int(ok["label"].max()) + 1)]
            log.warning("%s has no class_names; using label numbers %s", manifest_path, names)
        top = int(ok["label"].max())
        if top >= len(names) or int(ok["label"].min()) < 0:
            bad = ok[(ok["label"] < 0) | (ok["label"] >= len(names))].iloc[0]
            raise DataError(f"sample {bad['sample_id']}: label {bad['label']} outside the {len(names)} classes",
                            file=str(index_path))
        if len(index) > len(ok):
            log.info("%s: using %d of %d samples (others failed preprocessing)", index_path, len(ok), len(index))
        return cls(root, ok, names, manifest)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subjects(self) -> list[str]:
        return sorted(self.index["subject"].unique().tolist())

    def sample_ids(self, subjects: Sequence[str]) -> list[str]:
        """Sample ids of these subjects, in index order."""
        return self.index.loc[self.index["subject"].isin(set(subjects)), "sample_id"].tolist()

    def rows(self, sample_ids: Sequence[str]) -> pd.DataFrame:
        return self.index.iloc[[self._row(s) for s in sample_ids]]

    def labels(self, sample_ids: Sequence[str]) -> np.ndarray:
        return self.index["label"].to_numpy()[[self._row(s) for s in sample_ids]]

    def _row(self, sample_id: str) -> int:
        try:
            return self._rows[sample_id]
        except KeyError:
            raise DataError(f"sample {sample_id} is not in the cache (or failed preprocessing)",
                            file=str(self.root / "index.csv")) from None

    def npz_path(self, sample_id: str) -> Path:
        path = Path(self.index.at[self._row(sample_id), "npz"])
        return path if path.is_absolute() else self.root / path

    def keys(self, sample_id: str) -> frozenset[str]:
        """Array names stored for a sample (reads only the zip directory)."""
        if sample_id not in self._keys:
            path = self.npz_path(sample_id)
            if not path.is_file():
                raise DataError(f"sample {sample_id}: cache file missing", file=str(path))
            with np.load(path) as npz:
                self._keys[sample_id] = frozenset(npz.files)
        return self._keys[sample_id]

    def arrays(self, sample_id: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The requested arrays of one sample; loaded once, then served from memory."""
        missing = [k for k in keys if (sample_id, k) not in self._cache]
        if missing:
            with np.load(self.npz_path(sample_id)) as npz:
                loaded = {k: npz[k] for k in missing}
            self._cache.update({(sample_id, k): v for k, v in loaded.items()})
        return {k: self._cache[(sample_id, k)] for k in keys}

    def au_coded(self, sample_id: str) -> float:
        """1.0 when the sample's dataset codes AUs (its `aus` is ground truth, empty meaning "no AU"), 0.0 when not
        (SMIC, composite rows without joined coding). A cache written before `au_coded` existed counts as coded,
        which is how it was trained then."""
        if "au_coded" not in self.keys(sample_id):
            return 1.0
        return float(self.arrays(sample_id, ("au_coded",))["au_coded"])

    def check_inputs(self, sample_ids: Sequence[str], inputs: Sequence[str]) -> None:
        """Fail before training, with one line, if a sample lacks an array the model reads."""
        for sid in sample_ids:
            have = self.keys(sid)
            for key in inputs:
                if key not in have:
                    raise DataError(
                        f"sample {sid} has no '{key}' (has {', '.join(sorted(have))}); the model reads "
                        f"{', '.join(inputs)} - preprocess with the stage that produces '{key}' or pick another model",
                        file=str(self.npz_path(sid)))

    def torch_dataset(
        self,
        sample_ids: Sequence[str],
        inputs: Sequence[str],
        augment: bool,
        seed: int,
        optional: Sequence[str] = (),
    ) -> SampleDataset:
        """A dataset yielding batch dicts with `inputs` (required: a missing one raises DataError here), the
        `optional` keys that a sample has (targets for auxiliary losses and metrics, e.g. `aus`, `flows128`),
        `label` and `index` (position in `sample_ids`)."""
        inputs = tuple(inputs)
        self.check_inputs(sample_ids, inputs)
        extra = tuple(k for k in optional if k not in inputs)
        if extra:
            # A key that only some samples have cannot be collated; use it only where every sample has it.
            extra = tuple(k for k in extra if all(k in self.keys(s) for s in sample_ids))
        return SampleDataset(self, list(sample_ids), inputs + extra, augment, seed)


def to_tensor(key: str, value: np.ndarray) -> torch.Tensor:
    """Cache array -> batch tensor by the key's spec (mer_model.batch_keys): pixels to [0, 1] floats, HWC images to
    CHW, everything else float32."""
    spec = BATCH_KEYS.get(key)
    if spec is not None and spec.pixels:
        tensor = torch.from_numpy(np.ascontiguousarray(value)).float().div_(255.0)
        return tensor.permute(2, 0, 1).contiguous() if spec.hwc else tensor
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


class SampleDataset(Dataset):
    """Batch items for a list of samples; augmentation is redrawn every epoch (`set_epoch`) from (seed, epoch, item),
    so results do not depend on the number of loader workers and a resumed run sees the same draws."""

    def __init__(self, store: SampleStore, sample_ids: list[str], keys: tuple[str, ...], augment: bool,
                 seed: int) -> None:
        self.store = store
        self.sample_ids = sample_ids
        self.keys = keys
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.labels = store.labels(sample_ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        arrays = self.store.arrays(self.sample_ids[i], self.keys)
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            arrays = aug_lib.apply(arrays, aug_lib.Augmentation.draw(rng))
        item = {k: to_tensor(k, v) for k, v in arrays.items()}
        if "aus" in arrays:  # the AU loss and AU metrics ignore samples whose dataset has no AU coding
            item["aus_mask"] = torch.tensor(self.store.au_coded(self.sample_ids[i]), dtype=torch.float32)
        item["label"] = torch.tensor(int(self.labels[i]), dtype=torch.long)
        item["index"] = torch.tensor(i, dtype=torch.long)
        return item
