"""Fold-batched training: the folds of one configuration trained together in one process.

A LOSO fold of a small MER model leaves a GPU idle most of the time, and one process per fold repeats the model
build, the data load and the CUDA context 68 times. `train_fold_group` trains a GROUP of folds of one configuration:

* models that declare `fold_batching` (mer_model.models.base.MERModel) are trained as ONE stacked model with
  torch.func (https://pytorch.org/docs/stable/func.html, "model ensembling"): `stack_module_state` stacks the
  folds' parameters and buffers along a leading fold axis, `vmap(functional_call)` runs every fold's forward and loss
  in one call (BatchNorm running statistics are stacked buffers updated in place, dropout draws differ per fold),
  and ONE optimizer over the stacked tensors updates each fold exactly as its own optimizer would (Adam(W)/SGD are
  elementwise; the learning-rate schedule is the same for every fold);
* other models are trained one fold after another in the same process (`train_fold`), which still saves the
  process start, model import and data load per fold.

Every fold keeps its own protocol bookkeeping (`trainer.FoldRun`: validation/test sets, kept epoch, early stopping,
history) and its own FoldResult, so callers store each fold under its own key as before.

What differs from one-fold-per-process training (the batched path agrees statistically, not bitwise):

* padded per-fold index tables: every fold of a group takes the same number of steps per epoch, that of its largest
  training set; a smaller fold's epoch is its own shuffled order (the per-fold path's, same generator) followed by
  the first samples of that order again, so the padding is real samples of that fold, never a dummy input that would
  distort BatchNorm statistics or the loss. LOSO training sets differ by one subject's clips, so these repeats are a
  few percent of an epoch; with equal training-set sizes and no dropout, a fold's numbers equal the per-fold path's
  up to float summation order (tests/test_fold_batch.py);
* dropout masks are drawn per fold from one generator (`vmap(randomness="different")`);
* no mid-fold checkpoints: a group whose worker dies retrains its unfinished folds (finished folds are stored by the
  caller); small models, the ones worth batching, take seconds per fold;
* channels-last is not applied to the stacked 5-D inputs.

Precise BatchNorm (`train.precise_bn`) is kept: the stacked running statistics are reset and recomputed over each
fold's non-augmented training set (padded like the training order) as the cumulative average of the batch statistics,
the per-fold path's `momentum=None` average, with the momentum set to 1/k for the k-th batch (vmap cannot read
`num_batches_tracked` back as a Python number).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import default_collate

from mer_model.errors import ConfigError
from mer_model.training.augment import tta_forward
from mer_model.training.data import SampleDataset, SampleStore
from mer_model.training.results import FoldResult
from mer_model.training.trainer import (
    TARGET_KEYS,
    Callback,
    EvalAccumulator,
    FoldRun,
    FoldSpec,
    WeightAverage,
    _derived_seed,
    _seed_everything,
    accumulate,
    build_model,
    class_weights,
    configure_backends,
    device_arrays,
    fold_sets,
    index_batches,
    lr_factor,
    make_optimizer,
    mixed_precision,
    read_epoch,
    resolve_device,
    train_fold,
)

log = logging.getLogger(__name__)


def batchable(spec: FoldSpec) -> bool:
    """Whether the model of `spec` declares that its folds can be trained as one stacked model."""
    from mer_model.models.registry import get_entry

    return bool(getattr(get_entry(spec.model.name).cls, "fold_batching", False))


def train_fold_group(specs: Sequence[FoldSpec], store: SampleStore, callbacks: Sequence[Callback | None] = (),
                     checkpoint_dirs: Sequence[str | Path | None] = (), batched: bool | None = None
                     ) -> list[FoldResult]:
    """Train the folds of `specs` (one configuration, different folds) in this process; returns their FoldResults in
    order. `batched` (default: the model's `fold_batching` and more than one fold) picks the stacked torch.func path;
    otherwise each fold runs `train_fold` with its `callbacks[i]` and `checkpoint_dirs[i]`. ConfigError when the specs
    differ in anything but the fold (they must share one model and one optimiser)."""
    specs = list(specs)
    callbacks = list(callbacks) or [None] * len(specs)
    checkpoint_dirs = list(checkpoint_dirs) or [None] * len(specs)
    if not specs:
        return []
    first = specs[0]
    for spec in specs[1:]:
        if (spec.model, spec.train, spec.class_names) != (first.model, first.train, first.class_names):
            raise ConfigError(f"fold group: fold {spec.fold.name} has another model/train configuration than "
                              f"{first.fold.name}; a group trains one configuration")
    if first.train.ensemble > 1:  # a seed ensemble trains its members one after another, fold by fold
        batched = False
    elif batched is None:
        batched = len(specs) > 1 and batchable(first)
    if not batched:
        return [train_fold(spec, store, callback, ckpt)
                for spec, callback, ckpt in zip(specs, callbacks, checkpoint_dirs, strict=True)]
    if any(checkpoint_dirs) and first.train.checkpoint_every:
        log.info("fold group of %d: batched training writes no mid-fold checkpoints", len(specs))
    return _GroupLoop(specs, store, callbacks).run()


def _padded_order(order: np.ndarray, length: int) -> np.ndarray:
    """`order` followed by its own first entries again (cyclically) up to `length`."""
    return np.resize(order, length)


class _GroupLoop:
    """The stacked model of a fold group, its optimiser and the per-fold data, protocol runs and results."""

    def __init__(self, specs: list[FoldSpec], store: SampleStore, callbacks: list[Callback | None]) -> None:
        self.specs, self.store = specs, store
        self.cfg = cfg = specs[0].train
        self.names = [s.fold.name for s in specs]
        self.device = resolve_device(cfg.device)
        self.amp_dtype, scaled = mixed_precision(self.device, cfg.amp)
        configure_backends(self.device, cfg)
        sets = [fold_sets(spec, store) for spec in specs]
        _seed_everything(cfg.seed)
        model = build_model(specs[0].model, specs[0].num_classes, cfg.tta).to(self.device)  # every fold's seeded init
        targets = tuple(k for k in model.targets if k != "label")
        self.inputs = tuple(model.inputs) + tuple(k for k in targets if k not in model.inputs)
        self.params, self.buffers = stack_module_state([model] * len(specs))
        self.state_keys = list(model.state_dict())
        self.base = copy.deepcopy(model).to("meta")  # structure only: functional_call supplies every tensor
        self.norms = [m for m in self.base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.norm_buffers = [f"{name}.{b}" for name, m in self.base.named_modules() if m in self.norms
                             for b in ("running_mean", "running_var", "num_batches_tracked")]
        self.optimizer = make_optimizer(self.params.values(), cfg)
        self.average = WeightAverage(self.params.values(), cfg.ema_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: lr_factor(e, cfg, cfg.epochs))
        self.scaler = torch.amp.GradScaler("cuda", enabled=scaled)
        self.runs = [FoldRun(spec, store, self.inputs, TARGET_KEYS, callback, s)
                     for spec, callback, s in zip(specs, callbacks, sets, strict=True)]
        self.train_sets = [store.torch_dataset(r.train_ids, self.inputs, cfg.augment, cfg.seed, TARGET_KEYS)
                           for r in self.runs]
        self.stats_sets = ([store.torch_dataset(r.train_ids, self.inputs, False, cfg.seed, TARGET_KEYS)
                            for r in self.runs] if cfg.precise_bn and self.norms else None)
        self.weights = (torch.stack([class_weights(store.labels(r.train_ids), spec.num_classes)
                                     for r, spec in zip(self.runs, specs, strict=True)]).to(self.device)
                        if cfg.class_weights else None)
        # The keys every fold's items have (an optional target only some folds' samples all have is left out).
        self.keys = set.intersection(*(set(d[0]) for d in self.train_sets))
        self.data_keys = self.keys - {"aus_mask", "label", "index"}  # cache arrays; the rest is derived
        self.arrays = device_arrays(cfg, store, self.inputs, self.device)

    # ---------------------------------------------------------------------------------------------------- batches

    def _order(self, size: int, epoch: int) -> np.ndarray:
        """A fold's shuffled order of its `size` training samples: the per-fold path's (same generator, same
        draws)."""
        return torch.cat(list(index_batches(size, self.cfg, True, epoch, batchnorm=False))).numpy()

    def _tables(self, sizes: list[int], orders: list[np.ndarray], batchnorm: bool) -> list[np.ndarray]:
        """Per-step (F, B) index tables: each fold's order padded to the largest size; a final step of one sample
        is dropped for BatchNorm in training mode, as the per-fold loader does."""
        length = max(sizes)
        table = np.stack([_padded_order(order, length) for order in orders])
        bs = self.cfg.batch_size
        steps = [table[:, i:i + bs] for i in range(0, length, bs)]
        if batchnorm and length % bs == 1 and length > 1:
            steps = steps[:-1]
        return steps

    def _collate(self, datasets: Sequence[SampleDataset], rows: np.ndarray) -> dict[str, Tensor]:
        """One (F, B, ...) device batch: fold f's items `rows[f]` of `datasets[f]`, from the device-resident arrays
        (one gather and one batched augmentation for the group) or through the CPU reference path."""
        if self.arrays is not None and self.data_keys <= set(self.arrays.keys):
            return self.arrays.group_batch(datasets, rows, sorted(self.data_keys))
        folds = []
        for dataset, idx in zip(datasets, rows, strict=True):
            items = [dataset[int(i)] for i in idx]
            folds.append(default_collate([{k: v for k, v in item.items() if k in self.keys} for item in items]))
        return {k: v.to(self.device, non_blocking=True) for k, v in default_collate(folds).items()}

    # ------------------------------------------------------------------------------------------------ the model

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _forward(self, batch: dict[str, Tensor], with_loss: bool, tta: str = "none"
                 ) -> tuple[dict[str, Tensor], Any]:
        """Every fold's outputs (and losses) for an (F, B, ...) batch, in one vmapped call; `tta`: the test-time
        augmentation of an evaluation (augment.tta_forward)."""
        weights = self.weights

        def one_fold(params: dict, buffers: dict, fold_batch: dict, fold_weights: Tensor | None) -> Any:
            if fold_weights is not None:
                fold_batch = {**fold_batch, "class_weights": fold_weights}
            outputs = tta_forward(lambda b: functional_call(self.base, (params, buffers), (b,)), fold_batch, tta)
            if not with_loss:
                return outputs, {}
            loss, parts = self.base.loss(outputs, fold_batch)
            return outputs, {**parts, "loss": loss}

        in_dims = (0, 0, 0, 0 if weights is not None else None)
        with self.autocast():
            return vmap(one_fold, in_dims=in_dims, randomness="different")(self.params, self.buffers, batch, weights)

    def _mode(self, training: bool) -> None:
        self.base.train(training)

    # ---------------------------------------------------------------------------------------------------- epochs

    def train_epoch(self, epoch: int, final: bool) -> list[dict[str, float]]:
        self.average.use(False)
        torch.manual_seed(_derived_seed(self.cfg.seed, epoch, 2))
        for dataset in self.train_sets:
            dataset.set_epoch(epoch)
        self._mode(True)
        sizes = [len(d) for d in self.train_sets]
        steps = self._tables(sizes, [self._order(n, epoch) for n in sizes], batchnorm=True)
        sums: dict[str, Tensor] = {}
        seen = 0
        for rows in steps:
            batch = self._collate(self.train_sets, rows)
            _, parts = self._forward(batch, with_loss=True)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(parts["loss"].sum()).backward()  # fold f's parameters get fold f's gradient
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.average.update()
            n = rows.shape[1]
            seen += n
            accumulate(sums, parts, n)
        means = read_epoch(sums, seen, epoch, self.names)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if final:
            self.average.use(True)
            self.refresh_batchnorm()
        return [{**m, "lr": lr} for m in means]

    @torch.no_grad()
    def refresh_batchnorm(self) -> None:
        """Precise BatchNorm for every fold at once (see the module docstring)."""
        if self.stats_sets is None:
            return
        self.base.eval()
        for name in self.norm_buffers:
            buffer = self.buffers[name]
            buffer.fill_(1) if name.endswith("running_var") else buffer.zero_()
        momenta = [m.momentum for m in self.norms]
        for m in self.norms:
            m.train()
        sizes = [len(d) for d in self.stats_sets]
        steps = self._tables(sizes, [np.arange(n) for n in sizes], batchnorm=True)
        for k, rows in enumerate(steps, start=1):
            for m in self.norms:
                m.momentum = 1.0 / k  # cumulative average of the batch statistics
            self._forward(self._collate(self.stats_sets, rows), with_loss=False)
        for m, momentum in zip(self.norms, momenta, strict=True):
            m.momentum = momentum
            m.eval()

    @torch.no_grad()
    def evaluate(self, datasets: Sequence[SampleDataset | None]) -> list[tuple[np.ndarray, dict[str, Any]] | None]:
        """Every fold's (probs, extra) on its dataset (None where a fold has none), in dataset order; batches of
        `train.batch_size` per fold as the per-fold path uses, so each fold's loss is the same sample-weighted mean.
        Shorter datasets are padded with their own first samples, whose outputs are discarded."""
        self._mode(False)
        present = [d if d is not None and len(d) else None for d in datasets]
        real = [d for d in present if d is not None]
        if not real:
            return [None] * len(datasets)
        stand_in = real[0]
        sets = [d if d is not None else stand_in for d in present]
        sizes = [len(d) for d in sets]
        orders = [np.arange(n) for n in sizes]
        scores = [EvalAccumulator() for _ in sets]
        bs = self.cfg.batch_size
        for start, rows in zip(range(0, max(sizes), bs), self._tables(sizes, orders, batchnorm=False), strict=True):
            batch = self._collate(sets, rows)
            outputs, _ = self._forward(batch, with_loss=False, tta=self.base.tta)
            for f, (dataset, n) in enumerate(zip(present, sizes, strict=True)):
                count = min(n - start, bs)
                if dataset is None or count <= 0:
                    continue
                fold_out = {k: v[f, :count] for k, v in outputs.items()}
                fold_batch = {k: v[f, :count] for k, v in batch.items()}
                if self.weights is not None:
                    fold_batch["class_weights"] = self.weights[f]
                with self.autocast():
                    loss, _ = self.base.loss(fold_out, fold_batch)
                scores[f].add(fold_out, fold_batch, loss)
        return [s.result(n) if d is not None else None
                for s, d, n in zip(scores, present, sizes, strict=True)]

    # ----------------------------------------------------------------------------------------------- fold state

    def _fold_state(self, f: int) -> dict[str, Tensor]:
        stacked = {**self.params, **self.buffers}
        return {k: stacked[k][f] for k in self.state_keys}

    def _keeper(self, f: int) -> Any:
        def keep(into: dict[str, Tensor] | None) -> dict[str, Tensor]:
            state = self._fold_state(f)
            if into is None:
                return {k: v.detach().clone() for k, v in state.items()}
            for k, v in state.items():
                into[k].copy_(v.detach())
            return into

        return keep

    @torch.no_grad()
    def _load(self, f: int, state: dict[str, Tensor]) -> None:
        for k, v in self._fold_state(f).items():
            v.copy_(state[k])

    # -------------------------------------------------------------------------------------------------- the run

    def run(self) -> list[FoldResult]:
        cfg = self.cfg
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            active = [not r.stopped for r in self.runs]
            watched = [r.watched if a else None for r, a in zip(self.runs, active, strict=True)]
            watching = self.runs[0].watched is not None
            entries = self.train_epoch(epoch, watching or epoch == cfg.epochs)
            evaluated = self.evaluate(watched) if watching else [None] * len(self.runs)
            for f, run in enumerate(self.runs):
                if active[f]:
                    run.record({"epoch": epoch, **entries[f]}, evaluated[f], self._keeper(f), t0)
            if all(r.stopped for r in self.runs):
                break
        for f, run in enumerate(self.runs):
            if run.protocol.watch != "none":
                self._load(f, run.best["state"])
        final = (self.evaluate([r.test_set for r in self.runs]) if self.runs[0].protocol.watch != "test"
                 else [None] * len(self.runs))
        return [run.result(final[f], self.device) for f, run in enumerate(self.runs)]
