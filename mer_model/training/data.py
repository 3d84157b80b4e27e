"""The preprocessed cache as training data: a `SampleStore` over index.csv, modalities.csv and the per-modality npz
entries, selecting the samples that have what an experiment reads, and torch datasets that turn cache arrays into
the model batch (docs/architecture.md, "Model contract").

MER datasets are small (hundreds of clips), so arrays are read lazily and then kept in memory for the whole run: every
LOSO fold re-reads the same samples, and decompressing npz files each epoch would dominate the run time of small models.
Where they fit a byte budget, `DeviceArrays` stacks them once onto the training device (the whole MEGC2019 composite's
flow maps are about 4 MB): a batch is then an index, a dtype conversion and a batched augmentation there, instead of
per-sample `__getitem__` calls, OpenCV warps, a collate and a host-to-device copy. `SampleDataset` stays the CPU
reference path (used when the data does not fit, and on the CPU by default).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mer.model.batch_keys import BATCH_KEYS
from mer.model.errors import DataError
from mer.model.io import digest, read_json
from mer.model.preprocess.cache import ENTRY_COLUMNS, coverage, decode_npz, nonfinite, require_index
from mer.model.preprocess.modalities import check_modalities, stored_keys
from mer.model.training import augment as aug_lib

log = logging.getLogger(__name__)

# Arrays stored in another modality's entry (au_coded lives in the aus entry).
_MODALITY_OF = {companion: spec.name for spec in BATCH_KEYS.entries() for companion in spec.companions}


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """A cache CSV as strings; unreadable or lacking a column: DataError naming the file."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as err:
        raise DataError(f"cannot read ({str(err).splitlines()[0]}); run `mer preprocess` again", file=str(path)
                        ) from None
    for column in required:
        if column not in frame.columns:
            raise DataError(f"missing column '{column}'", file=str(path))
    return frame


class SampleStore:
    """Read access to a preprocessed cache: the samples usable for one experiment.

    A sample is usable when it has every modality the experiment reads (`keys`: a model's inputs and loss targets,
    see `mer.model.preprocess.modalities.model_modalities`); without `keys`, when every modality its preprocessing
    run was asked for is ok (`status == ok`). `coverage()` says how many of the collection's samples that is.
    """

    def __init__(self, root: Path, index: pd.DataFrame, class_names: Sequence[str], manifest: dict[str, Any],
                 entries: pd.DataFrame | None = None, total: pd.DataFrame | None = None) -> None:
        self.root = root
        self.index = index.reset_index(drop=True)
        self.class_names = list(class_names)
        self.manifest = manifest
        self._rows = {sid: i for i, sid in enumerate(self.index["sample_id"])}
        self._entries: dict[tuple[str, str], tuple[str, int, str]] = {}  # (sample, modality) -> file, bytes, sha256
        self._keys: dict[str, frozenset[str]] = {}
        if entries is not None:
            for e in entries[entries["status"] == "ok"].itertuples(index=False):
                self._entries[(e.sample_id, e.modality)] = (e.file, int(e.bytes), e.sha256)
                for key in stored_keys(e.modality):
                    self._keys[e.sample_id] = self._keys.get(e.sample_id, frozenset()) | {key}
        self._total = total if total is not None else self.index
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to a Ray task or a spawned loader worker) without the array cache: the copy reloads lazily."""
        return {**self.__dict__, "_cache": {}}

    @classmethod
    def open(cls, cache_dir: str | Path, class_names: Sequence[str] | None = None,
             keys: Sequence[str] | None = None) -> SampleStore:
        """Open `cache_dir` (index.csv, modalities.csv, manifest.json, samples/), keeping the samples that have every
        modality in `keys` (None: the samples whose preprocessing run succeeded for every modality it was asked
        for). Class names come from `class_names`, else from the manifest's `class_names`, else are the label
        numbers (with a warning). Every problem with the files is a DataError naming the file."""
        root = Path(cache_dir)
        index_path, entries_path = require_index(root), root / "modalities.csv"
        index = _read_csv(index_path, ("sample_id", "subject", "dataset", "label", "status", "modalities"))
        if not entries_path.is_file():
            raise DataError("no modalities.csv: a cache written by an older version; run `mer preprocess` again",
                            file=str(root))
        entries = _read_csv(entries_path, ENTRY_COLUMNS)
        manifest_path = root / "manifest.json"
        manifest = read_json(manifest_path, "preprocessing manifest") if manifest_path.is_file() else {}
        if keys is None:
            usable = index["status"] == "ok"
        else:
            wanted = set(check_modalities(keys, "SampleStore keys"))
            usable = index["modalities"].map(lambda text: wanted <= set(text.split("+")))
        ok = index[usable].copy()
        what = "status 'ok'" if keys is None else f"every modality of {'+'.join(sorted(wanted))}"
        if ok.empty:
            raise DataError(f"no sample with {what}", file=str(index_path))
        try:
            ok["label"] = ok["label"].astype(int)
        except ValueError:
            raise DataError("label column is not integral", file=str(index_path)) from None
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
            log.info("%s: using %d of %d samples (with %s)", index_path, len(ok), len(index), what)
        return cls(root, ok, names, manifest, entries[entries["sample_id"].isin(set(ok["sample_id"]))], index)

    def coverage(self) -> dict[str, Any]:
        """{"usable", "total", "per_dataset": {dataset: {"usable", "total"}}}: how many of the cache's samples (the
        whole ingested collection, failed ones included) this store uses, e.g. 413 of 442."""
        return coverage(self._total, self._total["sample_id"].isin(set(self.index["sample_id"])))

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

    def keys(self, sample_id: str) -> frozenset[str]:
        """Array names stored for a sample (from modalities.csv; no file is read)."""
        self._row(sample_id)
        return self._keys.get(sample_id, frozenset())

    def entry_path(self, sample_id: str, modality: str) -> Path:
        """The file of one cache entry (DataError when the sample lacks that modality)."""
        if (sample_id, modality) not in self._entries:
            raise DataError(f"sample {sample_id} has no '{modality}' entry", file=str(self.root / "modalities.csv"))
        return self.root / self._entries[(sample_id, modality)][0]

    def _load(self, sample_id: str, modality: str) -> dict[str, np.ndarray]:
        """One entry's arrays, validated against the size and SHA-256 recorded when it was written and for NaN/inf:
        a corrupt or tampered file is a DataError naming it, never a silent wrong batch."""
        path = self.entry_path(sample_id, modality)
        _, size, sha256 = self._entries[(sample_id, modality)]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DataError(f"sample {sample_id}: cache entry unreadable ({err.strerror}); run `mer preprocess`",
                            file=str(path)) from None
        if len(data) != size or digest(data) != sha256:
            raise DataError(f"sample {sample_id}: cache entry changed since it was written (size/hash differ); "
                            "run `mer preprocess` to recompute it", file=str(path))
        try:
            arrays = decode_npz(data)
        except Exception as err:  # noqa: BLE001 - zipfile, pickle and format errors alike mean a corrupt file
            raise DataError(f"sample {sample_id}: cache entry is not a readable npz ({type(err).__name__}); run "
                            "`mer preprocess` to recompute it", file=str(path)) from None
        bad = nonfinite(arrays)
        if bad:
            raise DataError(f"sample {sample_id}: {', '.join(repr(k) for k in bad)} has NaN/inf values in its cache "
                            "entry; run `mer preprocess` to recompute it", file=str(path))
        return arrays

    def arrays(self, sample_id: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The requested arrays of one sample; loaded once, then served from memory."""
        missing = [k for k in keys if (sample_id, k) not in self._cache]
        for modality in dict.fromkeys(_MODALITY_OF.get(k, k) for k in missing):
            self._cache.update({(sample_id, k): v for k, v in self._load(sample_id, modality).items()})
        return {k: self._cache[(sample_id, k)] for k in keys}

    def verify(self, sample_ids: Sequence[str], keys: Sequence[str]) -> None:
        """Read every entry holding `keys` of `sample_ids` once, as training would (size, SHA-256, npz, finite
        values), without keeping the arrays: a truncated, edited or NaN entry is a DataError naming its file before
        any work starts, not in a fold task after a cluster started."""
        modalities = list(dict.fromkeys(_MODALITY_OF.get(k, k) for k in keys))
        for sid in sample_ids:
            for modality in modalities:
                if (sid, modality) in self._entries:
                    self._load(sid, modality)

    def check_inputs(self, sample_ids: Sequence[str], inputs: Sequence[str]) -> None:
        """Fail before training, with one line, if a sample lacks an array the model reads."""
        for sid in sample_ids:
            have = self.keys(sid)
            for key in inputs:
                if key not in have:
                    raise DataError(
                        f"sample {sid} has no '{key}' (has {', '.join(sorted(have)) or 'nothing'}); the model reads "
                        f"{', '.join(inputs)} - open the store with keys= what the model reads, or run `mer "
                        f"preprocess` with '{key}' in preprocess.modalities", file=str(self.root / "modalities.csv"))

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
    """Cache array -> batch tensor by the key's spec (mer.model.batch_keys): pixels to [0, 1] floats, HWC images to
    CHW, everything else float32."""
    spec = BATCH_KEYS[key] if key in BATCH_KEYS else None  # label, au_coded: plain numbers
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
        with_aus = "aus" in self.keys  # the AU loss and AU metrics ignore samples whose dataset has no AU coding
        arrays = self.store.arrays(self.sample_ids[i], self.keys + (("au_coded",) if with_aus else ()))
        au_coded = float(arrays.pop("au_coded")) if with_aus else None
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            arrays = aug_lib.apply(arrays, aug_lib.Augmentation.draw(rng))
        item = {k: to_tensor(k, v) for k, v in arrays.items()}
        if au_coded is not None:  # 1 where `aus` is ground truth, 0 for SMIC and unjoined composite rows
            item["aus_mask"] = torch.tensor(au_coded, dtype=torch.float32)
        item["label"] = torch.tensor(int(self.labels[i]), dtype=torch.long)
        item["index"] = torch.tensor(i, dtype=torch.long)
        return item


def batch_tensor(key: str, value: torch.Tensor) -> torch.Tensor:
    """`to_tensor` for a stacked (B, ...) tensor of cache arrays, on its device."""
    spec = BATCH_KEYS[key] if key in BATCH_KEYS else None  # label, au_coded: plain numbers
    if spec is not None and spec.pixels:
        value = value.float().div_(255.0)
        return value.permute(0, 3, 1, 2) if spec.hwc else value
    return value.float()


class DeviceArrays:
    """The cache arrays `keys` of `sample_ids`, stacked once on `device` in their cache dtypes (uint8 pixels stay
    uint8), with labels and AU masks; `group_batch` serves SampleDatasets' items from them, augmented in one batched
    call (augment.apply_batch) with the draws SampleDataset would make."""

    def __init__(self, store: SampleStore, sample_ids: Sequence[str], keys: Sequence[str],
                 device: torch.device) -> None:
        self.keys = tuple(keys)
        self.device = device
        self.rows = {sid: i for i, sid in enumerate(sample_ids)}
        with_aus = "aus" in self.keys
        loaded = [store.arrays(sid, self.keys + (("au_coded",) if with_aus else ())) for sid in sample_ids]
        self.tensors = {k: torch.from_numpy(np.stack([a[k] for a in loaded])).to(device) for k in self.keys}
        if with_aus:
            self.tensors["aus_mask"] = torch.tensor([float(a["au_coded"]) for a in loaded], device=device)
        self.draws = aug_lib.DrawTable()
        self._dataset_rows: dict[int, tuple[SampleDataset, np.ndarray]] = {}

    def _rows_of(self, dataset: SampleDataset) -> np.ndarray:
        """Stack rows of a dataset's samples, by position (computed once per dataset)."""
        known = self._dataset_rows.get(id(dataset))
        if known is None or known[0] is not dataset:
            known = (dataset, np.array([self.rows[sid] for sid in dataset.sample_ids], dtype=np.int64))
            self._dataset_rows[id(dataset)] = known
        return known[1]

    @staticmethod
    def nbytes(store: SampleStore, sample_ids: Sequence[str], keys: Sequence[str]) -> int:
        """Device bytes the stack would take (one sample's arrays x the sample count: shapes are fixed per key)."""
        if not sample_ids:
            return 0
        return len(sample_ids) * sum(a.nbytes for a in store.arrays(sample_ids[0], keys).values())

    def group_batch(self, datasets: Sequence[SampleDataset], positions: np.ndarray, keys: Sequence[str]
                    ) -> dict[str, torch.Tensor]:
        """A fold group's (F, B, ...) batch: row f holds `datasets[f]`'s items at `positions[f]` (as the collated
        `datasets[f][i]` would be, on the device) with `keys`; one gather and one batched augmentation for the whole
        group, with the draws of (dataset.seed, dataset.epoch, position) where the datasets augment."""
        positions = np.asarray(positions, dtype=np.int64)
        folds, size = positions.shape
        rows = torch.as_tensor(np.concatenate([self._rows_of(d)[pos] for d, pos in zip(datasets, positions,
                                                                                         strict=True)]),
                               device=self.device)
        out = {k: batch_tensor(k, self.tensors[k].index_select(0, rows)) for k in keys}
        augmenting = [d.augment for d in datasets]
        if any(augmenting):
            if not all(augmenting):
                raise ValueError("group_batch: augmented and plain datasets in one batch")
            params = np.concatenate([self.draws.params(d.seed, d.epoch, pos)
                                     for d, pos in zip(datasets, positions, strict=True)])
            out = aug_lib.apply_batch(out, params)
        if "aus" in keys:
            out["aus_mask"] = self.tensors["aus_mask"].index_select(0, rows)
        labels = np.concatenate([d.labels[pos] for d, pos in zip(datasets, positions, strict=True)])
        out["label"] = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        out["index"] = torch.as_tensor(positions.reshape(-1), device=self.device)
        return {k: v.reshape(folds, size, *v.shape[1:]) for k, v in out.items()}
