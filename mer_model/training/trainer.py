"""Training of LOSO folds under an explicit evaluation protocol, and of the final all-subject model.

ONE training loop serves every caller (the shape of torchvision's references' single `train_one_epoch`, with mixed
precision and weight averaging as options): `_Loop` trains F >= 1 folds of one configuration along a fold axis and
`_fit` is its epoch loop. One fold (`train_fold`, each seed-ensemble member, `train_final`, `fit_check`) is the F = 1
case, with the model itself on its device; a fold group (`train_fold_group`, where `stack_folds` says so) is F > 1,
with the folds' models stacked into one (mer.model.training.fold_batch). A change to training is made once.

Protocols (TrainConfig.protocol; each an EpochProtocol of mer.model.training.protocols that this module asks):

* `fixed`  - train a fixed number of epochs; the test subject is predicted ONCE, with the last epoch's weights.
* `inner`  - hold out some TRAINING subjects (subject-wise, never the test subject) as validation; select the epoch with
             the best validation UF1 (optionally stopping early); predict the test subject once with those weights.
             `val_score` is the honest number a hyperparameter search may optimise.
* `oracle` - evaluate the test subject every epoch and keep the epoch with its best ACCURACY, as the public HTNet,
             MMNet and FaceSleuth scripts do. Reported for comparison with published numbers only: the result is
             flagged `leaky=True` because the test labels chose the epoch.

Runs are reproducible for a given seed: the model is initialised from the seed, and every epoch reseeds the global
torch RNG, the shuffling generator and the augmentation draws from (seed, epoch), so a fold resumed from a checkpoint
continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mer.model.config import ModelConfig, TrainConfig
from mer.model.errors import ConfigError, NonFiniteError
from mer.model.io import write_with
from mer.model.training.augment import tta_forward
from mer.model.training.data import DeviceArrays, SampleDataset, SampleStore
from mer.model.training.fold_batch import StackedModel
from mer.model.training.folds import Fold, fold_fingerprint, inner_split
from mer.model.training.metrics import au_f1, classification_metrics, flow_epe, landmark_nme, mean_defined
from mer.model.training.protocols import get_protocol
from mer.model.training.results import CHECKPOINT_NAME, FoldResult

log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, Any]], None]
# Cache keys a loss or an auxiliary metric may need besides the model's inputs; loaded where every sample has them.
TARGET_KEYS = ("aus",)


@dataclass
class FoldSpec:
    """Everything that determines the result of one fold."""

    model: ModelConfig
    train: TrainConfig
    fold: Fold
    class_names: list[str]
    num_classes: int = 0  # 0 = len(class_names)

    def __post_init__(self) -> None:
        self.num_classes = self.num_classes or len(self.class_names)
        if self.num_classes != len(self.class_names):
            raise ConfigError(f"fold {self.fold.name}: {self.num_classes} classes but {len(self.class_names)} names")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} requested but CUDA is not available")
    return device


def build_model(model_cfg: ModelConfig, num_classes: int, tta: str = "none") -> nn.Module:
    """The registered model named by the config, predicting with test-time augmentation `tta` (train.tta) (imported
    here so the training core does not depend on every model's third-party code at import time)."""
    from mer.model.models import create_model

    return create_model(model_cfg.name, model_cfg.config, num_classes=num_classes, **model_cfg.kwargs).set_tta(tta)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """'Balanced' weights n / (K * n_c) over the K classes present in the TRAINING labels (absent classes: 0, they
    never occur as a target). They make the expected loss class-balanced, i.e. aligned with UF1/UAR."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(parameters: Iterable[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """`train.optimizer` over the trainable tensors of `parameters` (a model's, or a fold group's stacked ones:
    every update rule here is elementwise, so one optimizer over stacked tensors updates each fold as its own would)."""
    params = [p for p in parameters if p.requires_grad]
    # The fused kernels (one pass over parameter, gradient and state per step, CPU and CUDA) compute the same update
    # as the default per-tensor loop: on HTNet's 139.6M parameters an Adam step takes ~1.4 s instead of ~8 s on two
    # CPU cores (tests/test_training_trainer.py checks the update against the unfused one).
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, fused=fused)


def lr_factor(epoch: int, cfg: TrainConfig, total: int) -> float:
    """Multiplier of `cfg.lr` during 0-based `epoch` of a `total`-epoch run: a linear warm-up over
    `cfg.warmup_epochs` ((e+1)/(w+1)), then `cfg.schedule` over the remaining epochs (constant 1; cosine
    0.5 (1 + cos(pi t)) with t the fraction of the post-warm-up epochs done; exponential lr_gamma^t in epochs)."""
    warmup = min(cfg.warmup_epochs, max(total - 1, 0))
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    done = epoch - warmup
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done / max(total - warmup, 1)))
    if cfg.schedule == "exponential":
        return cfg.lr_gamma**done
    return 1.0


class WeightAverage:
    """Exponential moving average of the trained weights (Polyak averaging), the weights an epoch evaluates and keeps
    when `train.ema_decay` > 0. Works on any list of live tensors, a model's parameters or a fold group's stacked ones
    (the update is elementwise, so each fold of a stack is averaged as its own would be).

    `update()` after every optimiser step: average <- average + (1 - d_t) (weights - average) with the warm-up of
    timm's ModelEmaV3, d_t = min(decay, (1 + t) / (10 + t)) at step t, so the first epochs do not drag the
    initialisation along. `use(averaged)` puts the average (True) or the trained weights (False) into the live
    tensors by swapping them in place; training always resumes on the trained weights. With `decay` 0 (averaging off)
    both are no-ops, so the loops call them unconditionally.

    Why: the `inner` protocol keeps the epoch its few validation subjects score best, typically one from the high
    learning-rate phase, where consecutive epochs' weights (and their validation scores) swing most; the average over
    the last ~10 steps is a less noisy snapshot. At the end of an annealed schedule the average equals the weights,
    so `fixed` is unchanged (5-fold subject CV on the MEGC2019 composite: README "How the settings were chosen").
    """

    def __init__(self, live: Iterable[Tensor], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"train.ema_decay: must be in [0, 1), got {decay}")
        self.decay = decay
        self.live = [t for t in live if t.requires_grad] if decay > 0 else []
        self.steps = 0
        self.averaged = False  # whether `live` holds the average (and `other` the trained weights)
        self.other = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current trained weights into the average (call after every optimiser step)."""
        if not self.live:
            return
        if self.averaged:
            raise RuntimeError("WeightAverage.update: the live tensors hold the average, not the trained weights")
        self.steps += 1
        weight = 1.0 - min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, live in zip(self.other, self.live, strict=True):
            average.lerp_(live.detach(), weight)

    @torch.no_grad()
    def use(self, averaged: bool) -> None:
        """Put the average (True) or the trained weights (False) into the live tensors."""
        if averaged == self.averaged or not self.live:
            return
        for other, live in zip(self.other, self.live, strict=True):
            kept = live.detach().clone()
            live.copy_(other)
            other.copy_(kept)
        self.averaged = averaged

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "averaged": self.averaged, "other": [t.detach().cpu() for t in self.other]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.averaged = int(state["steps"]), bool(state["averaged"])
        for other, saved in zip(self.other, state["other"], strict=True):
            other.copy_(saved)


def mixed_precision(device: torch.device, amp: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for float32, whether a GradScaler is needed) for `train.amp` on `device`: bfloat16 where
    the GPU supports it (its float32 exponent range needs no loss scaling), float16 + GradScaler otherwise; CPU runs
    stay float32 (their numbers must not change with the mixed-precision setting)."""
    if not amp or device.type != "cuda":
        return None, False
    from mer.model.models.checkpoint import autocast_dtype

    dtype = autocast_dtype(device)
    return dtype, dtype == torch.float16


def configure_backends(device: torch.device, cfg: TrainConfig) -> None:
    """cuDNN autotuning (`train.cudnn_benchmark`) or deterministic algorithms (the default: reproducible folds)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        torch.backends.cudnn.deterministic = not cfg.cudnn_benchmark


def accumulate(sums: dict[str, Tensor], parts: dict[str, Tensor], n: int | Tensor) -> None:
    """Add a batch's loss parts, weighted by its sample count `n`, to the device-side epoch sums (`loss` is recorded
    as `train_loss`, every other part as `train_<part>`). Nothing is read back to the host here."""
    for name, value in parts.items():
        key = "train_loss" if name == "loss" else f"train_{name}"
        value = value.detach().double() * n  # float64 sums: the epoch means match a host-side sum
        sums[key] = sums[key] + value if key in sums else value


def read_epoch(sums: dict[str, Tensor], seen: int, epoch: int, who: Sequence[str]) -> list[dict[str, float]]:
    """The epoch's sample-weighted means of the (F,) sums, one dict per fold, read from the device in ONE transfer.
    A non-finite training loss (or part) is a NonFiniteError naming the epoch and the fold (`who[f]`: "fold s01",
    "final model")."""
    names = list(sums)
    if not names:
        return [{} for _ in who]
    rows = (torch.stack([sums[k] for k in names], dim=-1) / max(seen, 1)).tolist()
    out = []
    for name, row in zip(who, rows, strict=True):
        means = dict(zip(names, row, strict=True))
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"{name}: loss became non-finite at epoch {epoch} "
                                 f"({', '.join(f'{k}={means[k]}' for k in bad)})")
        out.append(means)
    return out


def device_arrays(cfg: TrainConfig, store: SampleStore, inputs: Sequence[str], device: torch.device
                  ) -> DeviceArrays | None:
    """The store's samples stacked on `device` (inputs + the optional targets every sample has) when
    `train.device_data` asks for it and they fit `train.device_data_mb`; None = the CPU reference data path."""
    if cfg.device_data == "off" or (cfg.device_data == "auto" and device.type != "cuda"):
        return None
    ids = store.sample_ids(store.subjects())
    keys = tuple(inputs) + tuple(k for k in TARGET_KEYS if k not in inputs and all(k in store.keys(s) for s in ids))
    size = DeviceArrays.nbytes(store, ids, keys)
    if size > cfg.device_data_mb * 2**20:
        log.info("train.device_data: %d samples take %.0f MB > device_data_mb %.0f: CPU data path", len(ids),
                 size / 2**20, cfg.device_data_mb)
        return None
    return DeviceArrays(store, ids, keys, device)


def epoch_order(size: int, cfg: TrainConfig, epoch: int) -> np.ndarray:
    """THE shuffled order of an epoch's `size` training samples, drawn from (seed, epoch) as a shuffling DataLoader
    draws it; every fold of a group, and every data path, takes its epoch order from here."""
    generator = torch.Generator().manual_seed(_derived_seed(cfg.seed, epoch, 1))
    return torch.cat(list(DataLoader(range(size), batch_size=size, shuffle=True, generator=generator))).numpy()


class _OneModel:
    """The model of ONE fold (the F = 1 case of the loop's fold axis; fold_batch.StackedModel is F > 1): the module
    itself on its device (channels-last where it helps), batches and outputs carrying a fold axis of length 1 as views,
    so the loop's arithmetic is the plain model's."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        from mer.model.models.checkpoint import prepare_for_device, to_device_batch

        self.module = prepare_for_device(model, device)
        self.to_device_batch = to_device_batch
        self.norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def parameters(self) -> Iterator[Tensor]:
        return self.module.parameters()

    def device_batch(self, batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """A (1, B, ...) batch on `device`, image tensors in the model's memory layout (`to_device_batch`)."""
        moved = self.to_device_batch({k: v[0] for k, v in batch.items()}, self.module, device)
        return {k: v.unsqueeze(0) for k, v in moved.items()}

    def forward(self, batch: dict[str, Tensor], weights: Tensor | None, with_loss: bool, tta: str = "none"
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The model's outputs (1, B, ...) and, `with_loss`, its loss parts (1,), as `StackedModel.forward`."""
        fold_batch = {k: v[0] for k, v in batch.items()}
        if weights is not None:
            fold_batch["class_weights"] = weights[0]
        outputs = tta_forward(self.module, fold_batch, tta)
        parts: dict[str, Tensor] = {}
        if with_loss:
            loss, parts = self.module.loss(outputs, fold_batch)
            parts = {**parts, "loss": loss}
        return {k: v.unsqueeze(0) for k, v in outputs.items()}, {k: v.unsqueeze(0) for k, v in parts.items()}

    @torch.no_grad()
    def reset_norms(self) -> None:
        for m in self.norms:
            m.reset_running_stats()

    def fold_state(self, f: int) -> dict[str, Tensor]:
        """The state dict of the one fold (f = 0), its tensors sharing the model's storage."""
        return self.module.state_dict()


class _Loop:
    """Model, optimiser and data of F >= 1 folds of one configuration trained along a fold axis: `train_fold`,
    `train_final` and `fit_check` use one fold (the plain model), `train_fold_group` several (one stacked model,
    fold_batch.StackedModel). Batches are (F, B, ...) and every epoch figure is per fold; fold f trains on
    `train_ids[f]` and is named `names[f]` in errors."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, store: SampleStore, num_classes: int,
                 train_ids: Sequence[list[str]], epochs: int, names: Sequence[str]) -> None:
        self.cfg, self.names = cfg, list(names)
        self.device = resolve_device(cfg.device)
        self.amp_dtype, scaled = mixed_precision(self.device, cfg.amp)
        configure_backends(self.device, cfg)
        _seed_everything(cfg.seed)
        module = build_model(model_cfg, num_classes, cfg.tta)  # every fold's seeded initialisation
        self.model = (_OneModel(module, self.device) if len(train_ids) == 1
                      else StackedModel(module, len(train_ids), self.device))
        # Loss targets are needed for every split (validation and test losses are reported too); `label` comes from
        # the index, not the npz.
        targets = tuple(k for k in module.targets if k != "label")
        self.inputs = tuple(module.inputs) + tuple(k for k in targets if k not in module.inputs)
        self.optimizer = make_optimizer(self.model.parameters(), cfg)
        self.average = WeightAverage(self.model.parameters(), cfg.ema_decay)
        # Stepped once per epoch; `epochs` is the length of THIS run (a final model may train for fewer epochs than
        # train.epochs), so a cosine schedule always ends annealed.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: lr_factor(e, cfg, epochs))
        self.scaler = torch.amp.GradScaler("cuda", enabled=scaled)
        self.train_sets = [store.torch_dataset(ids, self.inputs, cfg.augment, cfg.seed, TARGET_KEYS)
                           for ids in train_ids]
        self.stats_sets = ([store.torch_dataset(ids, self.inputs, False, cfg.seed, TARGET_KEYS) for ids in train_ids]
                           if cfg.precise_bn and self.model.norms else None)
        self.weights = (torch.stack([class_weights(store.labels(ids), num_classes) for ids in train_ids]
                                    ).to(self.device) if cfg.class_weights else None)
        self.arrays = device_arrays(cfg, store, self.inputs, self.device)

    def _steps(self, orders: Sequence[np.ndarray], batchnorm: bool) -> list[np.ndarray]:
        """Per-step (F, B) position tables of one pass: each fold's order padded to the longest with its own first
        entries again (cyclically); a final step of one sample is dropped for BatchNorm in training mode (it cannot
        normalise one sample)."""
        length = max(len(order) for order in orders)
        table = np.stack([np.resize(order, length) for order in orders])
        bs = self.cfg.batch_size
        steps = [table[:, i:i + bs] for i in range(0, length, bs)]
        if batchnorm and length % bs == 1 and length > 1:
            steps = steps[:-1]
        return steps

    def _batches(self, datasets: Sequence[SampleDataset], steps: Sequence[np.ndarray]) -> Iterator[dict[str, Tensor]]:
        """The (F, B, ...) device batches of `steps` (row f: `datasets[f]`'s items), with the keys every dataset
        has: gathered from the device-resident arrays (one gather and one batched augmentation per step) when they
        hold those keys, else through the CPU reference loaders (`train.num_workers` each)."""
        keys = [k for k in datasets[0].keys if all(k in d.keys for d in datasets)]
        if self.arrays is not None and set(keys) <= set(self.arrays.keys):
            for rows in steps:
                yield self.model.device_batch(self.arrays.group_batch(datasets, rows, keys), self.device)
            return
        # Each loader draws its workers' base seed from its own generator, never from the global RNG (dropout's).
        loaders = [DataLoader(d, batch_sampler=[rows[f].tolist() for rows in steps], num_workers=self.cfg.num_workers,
                              generator=torch.Generator(), pin_memory=self.device.type == "cuda")
                   for f, d in enumerate(datasets)]
        for items in zip(*loaders, strict=True):
            common = set.intersection(*(set(item) for item in items))
            batch = {k: items[0][k].unsqueeze(0) if len(items) == 1 else torch.stack([item[k] for item in items])
                     for k in items[0] if k in common}
            yield self.model.device_batch(batch, self.device)

    def autocast(self) -> torch.autocast:
        """Mixed precision around forward + loss (a no-op context for float32 runs)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_epoch(self, epoch: int, final: bool = True) -> list[dict[str, float]]:
        """One pass over every fold's training set; returns per fold the sample-weighted means of the loss and its
        parts and the learning rate. `final`: the weights after this epoch will be evaluated or kept, so the model is
        left holding the weight average (`train.ema_decay` > 0) and BatchNorm statistics are made precise
        (`refresh_batchnorm`). NonFiniteError naming the fold when its loss becomes NaN/inf."""
        self.average.use(False)
        torch.manual_seed(_derived_seed(self.cfg.seed, epoch, 2))
        for dataset in self.train_sets:
            dataset.set_epoch(epoch)
        self.model.module.train()
        steps = self._steps([epoch_order(len(d), self.cfg, epoch) for d in self.train_sets], batchnorm=True)
        # Loss parts stay on the device; the step never waits for the GPU (no float(), no isfinite check per step).
        sums: dict[str, Tensor] = {}
        seen = 0
        for rows, batch in zip(steps, self._batches(self.train_sets, steps), strict=True):
            with self.autocast():
                _, parts = self.model.forward(batch, self.weights, with_loss=True)
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
        """Precise BatchNorm (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): every fold's BN running mean and
        variance become the average of its batch statistics over one pass of its non-augmented training set with the
        current weights (everything else in eval mode, so dropout does not distort them), as the cumulative average
        of the k batches, momentum 1/k (what `momentum=None` computes, set explicitly because vmap cannot read
        `num_batches_tracked` back). No-op for models without BatchNorm or with `train.precise_bn: false`."""
        if self.stats_sets is None:
            return
        self.model.module.eval()
        self.model.reset_norms()
        momenta = [m.momentum for m in self.model.norms]
        for m in self.model.norms:
            m.train()
        steps = self._steps([np.arange(len(d)) for d in self.stats_sets], batchnorm=True)
        for k, batch in enumerate(self._batches(self.stats_sets, steps), start=1):
            for m in self.model.norms:
                m.momentum = 1.0 / k
            with self.autocast():
                self.model.forward(batch, self.weights, with_loss=False)
        for m, momentum in zip(self.model.norms, momenta, strict=True):
            m.momentum = momentum
            m.eval()

    @torch.no_grad()
    def predict_and_score(self, datasets: Sequence[SampleDataset | None]
                          ) -> list[tuple[np.ndarray, dict[str, Any]] | None]:
        """Every fold's prediction of its split (None where a fold has none), in dataset order: (class
        probabilities (N, C), its loss and the auxiliary-task metrics where the model predicts them and the batch has
        ground truth). Batches of `train.batch_size`; a shorter split is padded with its own first samples, whose
        outputs are discarded, so each fold's loss is its own sample-weighted mean."""
        self.model.module.eval()
        present = [d if d is not None and len(d) else None for d in datasets]
        real = [d for d in present if d is not None]
        if not real:
            return [None] * len(datasets)
        sets = [d if d is not None else real[0] for d in present]
        sizes = [len(d) for d in sets]
        scores = [EvalAccumulator() for _ in sets]
        steps = self._steps([np.arange(n) for n in sizes], batchnorm=False)
        for start, rows, batch in zip(range(0, max(sizes), self.cfg.batch_size), steps, self._batches(sets, steps),
                                      strict=True):
            with self.autocast():
                outputs, _ = self.model.forward(batch, self.weights, with_loss=False, tta=self.model.module.tta)
            for f, (dataset, n) in enumerate(zip(present, sizes, strict=True)):
                count = min(n - start, rows.shape[1])
                if dataset is None or count <= 0:
                    continue
                whole = count == rows.shape[1]  # no padding: an output without a batch axis is kept whole
                fold_out = {k: v[f] if whole else v[f, :count] for k, v in outputs.items()}
                fold_batch = {k: v[f] if whole else v[f, :count] for k, v in batch.items()}
                if self.weights is not None:
                    fold_batch["class_weights"] = self.weights[f]
                with self.autocast():
                    loss, _ = self.model.module.loss(fold_out, fold_batch)
                scores[f].add(fold_out, fold_batch, loss)
        return [s.result(n) if d is not None else None for s, d, n in zip(scores, present, sizes, strict=True)]

    def keeper(self, f: int) -> Callable[[dict[str, Tensor] | None], dict[str, Tensor]]:
        """`keep(into)` for fold f: the weights of the epoch a protocol keeps, copied in place into `into`
        (allocated on the device the first time): an epoch that replaces the best one (oracle ties included) costs
        one device-side copy, no allocation and no transfer to the host."""

        def keep(into: dict[str, Tensor] | None) -> dict[str, Tensor]:
            state = self.model.fold_state(f)
            if into is None:
                return {k: v.detach().clone() for k, v in state.items()}
            for k, v in state.items():
                into[k].copy_(v.detach())
            return into

        return keep

    @torch.no_grad()
    def load(self, f: int, state: Mapping[str, Tensor]) -> None:
        """Put `state` (a kept epoch's or a checkpoint's weights) into fold f."""
        for k, v in self.model.fold_state(f).items():
            v.copy_(state[k])


class EvalAccumulator:
    """Evaluation outputs of one model over the batches of one dataset (in order): probabilities stay on the device
    until `result`; the auxiliary-task metrics are computed where the model predicts them and the batch has ground
    truth."""

    def __init__(self) -> None:
        self.probs: list[Tensor] = []
        self.loss_sum: Tensor | float = 0.0
        self.au_true: list[np.ndarray] = []
        self.au_pred: list[np.ndarray] = []
        self.epe_sum, self.nme_sum, self.epe_n, self.nme_n = 0.0, 0.0, 0, 0

    def add(self, outputs: dict[str, Tensor], batch: dict[str, Tensor], loss: Tensor) -> None:
        """One batch: `outputs` of the model, the `batch` it read, its mean `loss`."""
        n = int(batch["label"].shape[0])
        self.loss_sum = self.loss_sum + loss.detach().double() * n
        self.probs.append(torch.softmax(outputs["logits"].float(), dim=1))
        if "au_logits" in outputs and "aus" in batch:
            coded = (batch["aus_mask"] > 0.5).cpu().numpy() if "aus_mask" in batch else slice(None)
            self.au_true.append(batch["aus"].cpu().numpy()[coded] > 0.5)
            self.au_pred.append(outputs["au_logits"].float().cpu().numpy()[coded] > 0.0)
        if "flow" in outputs and "flows128" in batch and outputs["flow"].shape == batch["flows128"].shape:
            self.epe_sum += flow_epe(outputs["flow"].float().cpu().numpy(), batch["flows128"].cpu().numpy()) * n
            self.epe_n += n
        if "landmarks" in outputs and "landmarks68" in batch:
            pred, true = outputs["landmarks"].float().cpu().numpy(), batch["landmarks68"].cpu().numpy()
            if pred.shape[1] == true.shape[1] - 1:  # landmarks predicted for frames 2..N
                true = true[:, 1:]
            if pred.shape == true.shape:
                self.nme_sum += landmark_nme(pred, true) * n
                self.nme_n += n

    def result(self, size: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(probabilities (N, C), {"loss", and au_f1 / flow_epe / landmark_nme where available}) over `size`
        samples."""
        extra: dict[str, Any] = {"loss": float(self.loss_sum) / max(size, 1)}
        if self.au_true and sum(len(t) for t in self.au_true):  # a SMIC-only test fold has no AU ground truth
            scores = au_f1(np.concatenate(self.au_true), np.concatenate(self.au_pred))
            if scores["au_f1"] is not None:  # None: no coded AU occurs on these samples, so the F1 is absent
                extra["au_f1"], extra["per_au_f1"] = scores["au_f1"], scores["per_au_f1"]
        if self.epe_n:
            extra["flow_epe"] = self.epe_sum / self.epe_n
        if self.nme_n:
            extra["landmark_nme"] = self.nme_sum / self.nme_n
        return torch.cat(self.probs).cpu().numpy(), extra


def _score(dataset: SampleDataset, probs: np.ndarray, extra: dict[str, Any], num_classes: int,
           class_names: Sequence[str], prefix: str) -> dict[str, Any]:
    m = classification_metrics(dataset.labels, probs.argmax(1), num_classes, class_names)
    out = {f"{prefix}_uf1": m["uf1"], f"{prefix}_uar": m["uar"], f"{prefix}_accuracy": m["accuracy"]}
    out.update({f"{prefix}_{k}": v for k, v in extra.items() if not isinstance(v, Mapping)})  # per-AU: test only
    return out


def check_finite(probs: np.ndarray, who: str, when: str) -> None:
    """NonFiniteError ("fold casme2/sub03: outputs became non-finite at epoch 2 (val set)") when any class
    probability is NaN/inf: argmax would still name a class, and such a fold must fail, not be pooled."""
    if not np.isfinite(probs).all():
        rows = int((~np.isfinite(probs)).any(axis=1).sum())
        raise NonFiniteError(f"{who}: outputs became non-finite {when} ({rows} of {len(probs)} samples)")


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    write_with(path, lambda out: torch.save(payload, out))  # a worker killed mid-write leaves the previous one


def _resume_state(path: Path, fold: str) -> dict[str, Any] | None:
    """A fold's resumable state, or None (with a warning: the fold starts again from epoch 1) when the file is
    unreadable or its weights are not finite -- derived state, never worth a failed fold."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        weights = saved["model"].values()
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is only lost time
        log.warning("fold %s: %s is unreadable (%s); training from epoch 1", fold, path, type(err).__name__)
        return None
    if not all(bool(torch.isfinite(w).all()) for w in weights if w.is_floating_point()):
        log.warning("fold %s: %s holds NaN/inf weights; training from epoch 1", fold, path)
        return None
    return saved


def _predictions(store: SampleStore, dataset: SampleDataset, probs: np.ndarray, fold: str) -> pd.DataFrame:
    rows = store.rows(dataset.sample_ids)
    frame = pd.DataFrame({
        "sample_id": rows["sample_id"].to_numpy(), "subject": rows["subject"].to_numpy(),
        "dataset": rows["dataset"].to_numpy(), "fold": fold, "label": dataset.labels.astype(int),
        "pred": probs.argmax(1).astype(int),
    })
    for c in range(probs.shape[1]):
        frame[f"prob_{c}"] = probs[:, c]
    return frame


def fold_sets(spec: FoldSpec, store: SampleStore) -> tuple[tuple[str, ...], tuple[str, ...], list[str], list[str]]:
    """(training subjects, validation subjects, training sample ids, test sample ids) of a fold under its protocol;
    the validation subjects are drawn from the fold's TRAINING subjects only. ConfigError for a test subject used in
    training or an empty side."""
    cfg, fold = spec.train, spec.fold
    train_subjects, val_subjects = tuple(fold.train_subjects), ()
    if get_protocol(cfg.protocol).needs_validation:
        if fold.val_subjects:
            val_subjects = tuple(fold.val_subjects)
        else:
            subject_labels = {s: store.labels(store.sample_ids([s])) for s in train_subjects}
            train_subjects, val_subjects = inner_split(train_subjects, cfg.val_fraction, cfg.seed, subject_labels)
    leaked = set(fold.test_subjects) & (set(train_subjects) | set(val_subjects))
    if leaked:
        raise ConfigError(f"fold {fold.name}: test subjects {sorted(leaked)} are also used for training/validation")
    train_ids = store.sample_ids(train_subjects)
    test_ids = store.sample_ids(fold.test_subjects)
    if not train_ids or not test_ids:
        raise ConfigError(f"fold {fold.name}: {len(train_ids)} training and {len(test_ids)} test samples in the cache")
    return train_subjects, val_subjects, train_ids, test_ids


class FoldRun:
    """One fold's protocol bookkeeping, whatever trains it (`train_fold`, or a fold-batched group): its evaluation
    datasets, the history, the kept epoch and early stopping; `result` builds the FoldResult."""

    def __init__(self, spec: FoldSpec, store: SampleStore, inputs: Sequence[str], optional: Sequence[str],
                 callback: Callback | None = None, sets: tuple | None = None) -> None:
        self.spec, self.store, self.callback = spec, store, callback
        self.start = time.perf_counter()
        self.protocol = get_protocol(spec.train.protocol)
        self.train_subjects, self.val_subjects, self.train_ids, test_ids = sets or fold_sets(spec, store)
        seed = spec.train.seed
        self.test_set = store.torch_dataset(test_ids, inputs, False, seed, optional)
        self.val_set = (store.torch_dataset(store.sample_ids(self.val_subjects), inputs, False, seed, optional)
                        if self.val_subjects else None)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"score": None, "epoch": 0, "state": None, "probs": None, "extra": None}
        self.bad_epochs = 0
        self.stopped = False

    @property
    def watched(self) -> SampleDataset | None:
        """The dataset evaluated after every epoch (validation, test under `oracle`), or None."""
        return {"val": self.val_set, "test": self.test_set}.get(self.protocol.watch)

    def record(self, entry: dict[str, Any], evaluated: tuple[np.ndarray, dict[str, Any]] | None,
               keep: Callable[[dict[str, Tensor] | None], dict[str, Tensor]], started: float) -> bool:
        """Add one epoch (`entry` = its training figures, `evaluated` = (probs, extra) on `watched`); `keep(into)`
        copies the current weights when this epoch becomes the kept one. Returns True when the fold stops early."""
        spec = self.spec
        if evaluated is not None:
            check_finite(evaluated[0], f"fold {spec.fold.name}", f"at epoch {entry['epoch']} ({self.protocol.watch} "
                         "set)")
            entry.update(_score(self.watched, *evaluated, spec.num_classes, spec.class_names, self.protocol.watch))
        score = self.protocol.score(entry)
        best = self.best
        if self.protocol.improved(score, None if best["score"] is None else tuple(best["score"])):
            best.update(score=list(score), epoch=entry["epoch"], state=keep(best["state"]) if evaluated else None)
            if self.protocol.watch == "test":  # the test predictions of that epoch are the fold's result
                best.update(probs=evaluated[0], extra=evaluated[1])
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        entry["time_s"] = time.perf_counter() - started
        self.history.append(entry)
        if self.callback is not None:
            self.callback(entry["epoch"], dict(entry))
        self.stopped = self.protocol.early_stopping and spec.train.patience > 0 and self.bad_epochs >= spec.train.patience
        if self.stopped:
            log.info("fold %s: early stop after epoch %d (best %d)", spec.fold.name, entry["epoch"], best["epoch"])
        return self.stopped

    @property
    def selected_epoch(self) -> int:
        if self.protocol.watch == "none":
            return self.history[-1]["epoch"] if self.history else self.spec.train.epochs
        return self.best["epoch"]

    def test_outputs(self, final: tuple[np.ndarray, dict[str, Any]] | None) -> tuple[np.ndarray, dict[str, Any]]:
        """The fold's test (probabilities, extra figures): the kept epoch's (`oracle`), else `final`, the test set
        evaluated with the selected weights."""
        return (self.best["probs"], self.best["extra"]) if self.protocol.watch == "test" else final

    def result(self, final: tuple[np.ndarray, dict[str, Any]] | None, device: torch.device) -> FoldResult:
        """The FoldResult: test predictions = the kept epoch's (`oracle`) or `final` = the test set evaluated with
        the selected weights."""
        spec = self.spec
        probs, extra = self.test_outputs(final)
        check_finite(probs, f"fold {spec.fold.name}", f"on the test set (epoch {self.selected_epoch})")
        test_metrics = classification_metrics(self.test_set.labels, probs.argmax(1), spec.num_classes,
                                               spec.class_names)
        test_metrics.update(extra)
        result = FoldResult(
            fold=spec.fold.name, predictions=_predictions(self.store, self.test_set, probs, spec.fold.name),
            history=self.history, selected_epoch=self.selected_epoch,
            val_score=float(self.best["score"][0]) if self.protocol.watch == "val" else None,
            protocol=self.protocol.name, leaky=self.protocol.leaky,
            wall_time=time.perf_counter() - self.start, device=str(device), test_metrics=test_metrics,
            train_subjects=tuple(self.train_subjects), val_subjects=tuple(self.val_subjects),
            test_subjects=tuple(spec.fold.test_subjects), class_names=tuple(spec.class_names),
        )
        log.info("fold %s (%s): epoch %d, test acc %.3f, %.1fs", spec.fold.name, self.protocol.name,
                 result.selected_epoch, test_metrics["accuracy"], result.wall_time)
        return result


def stack_folds(specs: Sequence[FoldSpec], requested: bool | None = None) -> bool:
    """THE answer to "train these folds (of one configuration) as one stacked model?" (fold_batch.StackedModel):
    only several folds of single models (a seed ensemble trains its members one after another, fold by fold), and
    then `requested`, or by default whether the model declares `fold_batching`."""
    if len(specs) < 2 or specs[0].train.ensemble > 1:
        return False
    if requested is not None:
        return requested
    from mer.model.models.registry import get_entry

    return bool(getattr(get_entry(specs[0].model.name).cls, "fold_batching", False))


def train_fold_group(specs: Sequence[FoldSpec], store: SampleStore, callbacks: Sequence[Callback | None] = (),
                     checkpoint_dirs: Sequence[str | Path | None] = (), batched: bool | None = None
                     ) -> list[FoldResult]:
    """Train the folds of `specs` (one configuration, different folds) in this process; returns their FoldResults in
    order. Where `stack_folds(specs, batched)` says so, ONE loop over the folds' axis trains them as one stacked
    model (fold_batch; no mid-fold checkpoints); otherwise each fold runs `train_fold` with its `callbacks[i]` and
    `checkpoint_dirs[i]`. ConfigError when the specs differ in anything but the fold (they must share one model and
    one optimiser)."""
    specs = list(specs)
    callbacks = list(callbacks) or [None] * len(specs)
    checkpoint_dirs = list(checkpoint_dirs) or [None] * len(specs)
    for spec in specs[1:]:
        if (spec.model, spec.train, spec.class_names) != (specs[0].model, specs[0].train, specs[0].class_names):
            raise ConfigError(f"fold group: fold {spec.fold.name} has another model/train configuration than "
                              f"{specs[0].fold.name}; a group trains one configuration")
    if not stack_folds(specs, batched):
        return [train_fold(spec, store, callback, ckpt)
                for spec, callback, ckpt in zip(specs, callbacks, checkpoint_dirs, strict=True)]
    first, cfg = specs[0], specs[0].train
    if any(checkpoint_dirs) and cfg.checkpoint_every:
        log.info("fold group of %d: batched training writes no mid-fold checkpoints", len(specs))
    sets = [fold_sets(spec, store) for spec in specs]
    loop = _Loop(first.model, cfg, store, first.num_classes, [s[2] for s in sets], cfg.epochs,
                 [f"fold {spec.fold.name}" for spec in specs])
    runs = [FoldRun(spec, store, loop.inputs, TARGET_KEYS, callback, s)
            for spec, callback, s in zip(specs, callbacks, sets, strict=True)]
    finals = _fit(loop, runs)
    return [run.result(final, loop.device) for run, final in zip(runs, finals, strict=True)]


def train_fold(spec: FoldSpec, store: SampleStore, callback: Callback | None = None,
               checkpoint_dir: str | Path | None = None) -> FoldResult:
    """Train and evaluate one fold under `spec.train.protocol`; see the module docstring.

    `callback(epoch, metrics)` receives each epoch's history entry (1-based epoch). With `checkpoint_dir` and
    `train.checkpoint_every > 0` the state is saved every that many epochs, and an existing checkpoint of the same spec
    is resumed, so a retried fold continues where its worker died.

    With `train.ensemble` K > 1 the fold trains K members one after another, member m as the single model of seed
    `member_seed(train.seed, m)` would be trained: under `inner` each member draws its own validation subjects from
    the fold's training subjects (so together the members train on all of them, as a cross-validation ensemble does),
    keeps its own epoch, and the test subject is predicted with the mean of the members' class probabilities (deep
    ensembles, Lakshminarayanan et al. 2017). The result's `history` is the members' per-epoch mean, `selected_epoch`
    the median of their kept epochs (rounded; each member's seed and epoch: `member_seeds`, `member_epochs`),
    `val_score` the mean of their validation UF1s, `train_subjects` / `val_subjects` the subjects any member trained /
    validated on.
    """
    sets = fold_sets(spec, store)  # configuration errors before a model is built; member 0's subjects
    if spec.train.ensemble == 1:
        run, loop, final = _train_member(spec, store, 0, callback, checkpoint_dir, sets)
        return run.result(final, loop.device)
    members = []
    for m in range(spec.train.ensemble):  # one member in memory at a time: only its predictions are kept
        run, loop, final = _train_member(spec, store, m, callback, checkpoint_dir, sets if m == 0 else None)
        members.append(_Member(run, run.test_outputs(final), str(loop.device)))
        run.best["state"] = None
        del loop
    return _ensemble_result(spec, store, members)


@dataclass
class _Member:
    """What a fold keeps of one ensemble member: its protocol run and its test (probabilities, extra figures) at the
    kept epoch."""

    run: FoldRun
    test: tuple[np.ndarray, dict[str, Any]]
    device: str


def member_seed(seed: int, member: int) -> int:
    """Seed of ensemble member `member` of a fold trained with `train.seed` = `seed` (member 0 keeps `seed`, so a
    one-member ensemble is the single model)."""
    return seed if member == 0 else _derived_seed(seed, member, 3)


def member_spec(spec: FoldSpec, member: int) -> FoldSpec:
    """The single-model spec ensemble member `member` of `spec` is trained as (its seed: `member_seed`)."""
    if member == 0:
        return spec
    train = spec.train.model_copy(update={"seed": member_seed(spec.train.seed, member)})
    return FoldSpec(spec.model, train, spec.fold, spec.class_names, spec.num_classes)


def _train_member(spec: FoldSpec, store: SampleStore, member: int, callback: Callback | None,
                  checkpoint_dir: str | Path | None, sets: tuple | None = None
                  ) -> tuple[FoldRun, _Loop, tuple[np.ndarray, dict[str, Any]] | None]:
    """One model of a fold (ensemble member `member`, whose `fold_sets` the caller may have drawn already): (its
    protocol run, its loop holding the kept weights, its test evaluation or None under `oracle`, whose run holds the
    kept epoch's test predictions)."""
    spec = member_spec(spec, member)
    cfg, fold = spec.train, spec.fold
    sets = sets or fold_sets(spec, store)
    who = f"fold {fold.name}" + (f" (ensemble member {member})" if member else "")
    loop = _Loop(spec.model, cfg, store, spec.num_classes, [sets[2]], cfg.epochs, [who])
    run = FoldRun(spec, store, loop.inputs, TARGET_KEYS, callback, sets)
    name = CHECKPOINT_NAME if member == 0 else f"member{member}-{CHECKPOINT_NAME}"
    ckpt = Path(checkpoint_dir) / name if checkpoint_dir is not None else None
    (final,) = _fit(loop, [run], ckpt, fold_fingerprint(spec.model, cfg, fold, spec.class_names), member)
    return run, loop, final


def _fit(loop: _Loop, runs: Sequence[FoldRun], ckpt: Path | None = None, fingerprint: str = "", member: int = 0
         ) -> list[tuple[np.ndarray, dict[str, Any]] | None]:
    """THE epoch loop over the folds of `loop` (`runs`: their protocol runs, in fold order): train an epoch, predict
    and score each active fold's watched split, let each fold's protocol keep the epoch or stop the fold (a stopped
    fold of a stack trains on with the others, unrecorded); then each fold's selected weights predict its test split
    (None per fold under `oracle`: its run holds the kept epoch's predictions). With `ckpt` (one fold) an existing
    checkpoint of the same `fingerprint` is resumed and the state saved every `train.checkpoint_every` epochs and
    when the fold stops. `member` > 0 marks a seed-ensemble member's history entries."""
    cfg = loop.cfg
    first_epoch = _resume(loop, runs[0], ckpt, fingerprint, member) if ckpt is not None and ckpt.is_file() else 1
    for epoch in range(first_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        active = [not r.stopped for r in runs]
        watched = [r.watched if a else None for r, a in zip(runs, active, strict=True)]
        watching = runs[0].watched is not None
        entries = loop.train_epoch(epoch, watching or epoch == cfg.epochs)
        evaluated = loop.predict_and_score(watched) if watching else [None] * len(runs)
        for f, run in enumerate(runs):
            if active[f]:
                entry = {"epoch": epoch, **entries[f], **({"member": member} if member else {})}
                run.record(entry, evaluated[f], loop.keeper(f), t0)
        stopped = all(r.stopped for r in runs)
        if ckpt is not None and cfg.checkpoint_every and (epoch % cfg.checkpoint_every == 0 or stopped):
            (run,) = runs
            _save_checkpoint(ckpt, {"fingerprint": fingerprint, "epoch": epoch, "model": loop.model.fold_state(0),
                                    "optimizer": loop.optimizer.state_dict(), "scaler": loop.scaler.state_dict(),
                                    "scheduler": loop.scheduler.state_dict(), "average": loop.average.state_dict(),
                                    "history": run.history, "best": run.best, "bad_epochs": run.bad_epochs})
        if stopped:
            break
    for f, run in enumerate(runs):
        if run.protocol.watch != "none":
            loop.load(f, run.best["state"])
    if runs[0].protocol.watch == "test":
        return [None] * len(runs)
    return loop.predict_and_score([run.test_set for run in runs])


def _resume(loop: _Loop, run: FoldRun, ckpt: Path, fingerprint: str, member: int) -> int:
    """Load a one-fold loop and its run from checkpoint `ckpt` (ConfigError when it is of another configuration);
    returns the first epoch to train (1 when the checkpoint is unusable)."""
    fold = run.spec.fold.name
    saved = _resume_state(ckpt, fold)
    if saved is None:
        return 1
    if saved["fingerprint"] != fingerprint:
        raise ConfigError(f"{ckpt}: checkpoint of a different configuration; use another checkpoint_dir")
    loop.load(0, saved["model"])
    loop.optimizer.load_state_dict(saved["optimizer"])
    loop.scaler.load_state_dict(saved["scaler"])
    loop.scheduler.load_state_dict(saved["scheduler"])
    loop.average.load_state_dict(saved["average"])
    run.history, run.best, run.bad_epochs = saved["history"], saved["best"], saved["bad_epochs"]
    # A warning, so that it reaches the driver's log from a Ray worker (whose info lines are not forwarded).
    log.warning("fold %s%s resumed from epoch %d (%s)", fold, f" member {member}" if member else "", saved["epoch"],
                ckpt)
    return saved["epoch"] + 1


def _mean_history(histories: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per epoch, the mean of every numeric figure over the members that reached it (early stopping may end members
    at different epochs); `member` markers dropped."""
    out = []
    for i in range(max(len(h) for h in histories)):
        entries = [h[i] for h in histories if len(h) > i]
        keys = [k for k in entries[0] if k != "member" and all(isinstance(e.get(k), (int, float)) for e in entries)]
        out.append({k: (entries[0][k] if k == "epoch" else float(np.mean([e[k] for e in entries]))) for k in keys})
    return out


def _mean_extra(extras: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The members' extra test figures combined: each the mean over the members that define it (a figure may be
    None or missing: an AU F1 where no coded AU occurs), absent where none does, never 0; `per_au_f1` per AU
    likewise. Members share the test subject, so they normally agree on which figures exist; this does not rely on
    it."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for e in extras for k in e):
        values = [e.get(key) for e in extras]
        if key == "per_au_f1":
            aus = dict.fromkeys(a for v in values if isinstance(v, Mapping) for a in v)
            merged = {a: mean_defined([v.get(a) for v in values if isinstance(v, Mapping)]) for a in aus}
            if any(x is not None for x in merged.values()):
                out[key] = {a: x for a, x in merged.items() if x is not None}
        elif (mean := mean_defined(values)) is not None:
            out[key] = mean
    return out


def _ensemble_result(spec: FoldSpec, store: SampleStore, members: Sequence[_Member]) -> FoldResult:
    """The FoldResult of a seed ensemble: the test probabilities averaged over the members at their kept epochs."""
    probs = np.mean([m.test[0] for m in members], axis=0)
    check_finite(probs, f"fold {spec.fold.name}", "on the test set (ensemble mean)")
    extra = _mean_extra([m.test[1] for m in members])
    first = members[0]
    run = first.run
    scores = [float(m.run.best["score"][0]) for m in members] if run.protocol.watch == "val" else None
    test_metrics = classification_metrics(run.test_set.labels, probs.argmax(1), spec.num_classes, spec.class_names)
    test_metrics.update(extra)
    epochs = [m.run.selected_epoch for m in members]

    def union(attr: str) -> tuple[str, ...]:
        return tuple(sorted({s for m in members for s in getattr(m.run, attr)}))

    result = FoldResult(
        fold=spec.fold.name, predictions=_predictions(store, run.test_set, probs, spec.fold.name),
        history=_mean_history([m.run.history for m in members]), selected_epoch=int(round(float(np.median(epochs)))),
        val_score=float(np.mean(scores)) if scores else None, protocol=run.protocol.name,
        leaky=run.protocol.leaky, wall_time=time.perf_counter() - run.start, device=first.device,
        test_metrics=test_metrics, train_subjects=union("train_subjects"), val_subjects=union("val_subjects"),
        test_subjects=tuple(spec.fold.test_subjects), class_names=tuple(spec.class_names),
        member_seeds=tuple(member_seed(spec.train.seed, m) for m in range(len(members))), member_epochs=tuple(epochs),
    )
    log.info("fold %s (%s, ensemble of %d): epochs %s, test acc %.3f, %.1fs", spec.fold.name, run.protocol.name,
             len(members), epochs, test_metrics["accuracy"], result.wall_time)
    return result


def train_final(model_cfg: ModelConfig, train_cfg: TrainConfig, store: SampleStore, subjects: Sequence[str],
                epochs: int) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train on all `subjects` for a fixed number of epochs (chosen beforehand, e.g. from the folds' selected epochs)
    without any evaluation; returns the model in eval mode on the CPU and the per-epoch history. NonFiniteError
    ("final model: ...") when the loss or the weights become NaN/inf."""
    if epochs < 1:
        raise ConfigError(f"final model: epochs must be at least 1, got {epochs}")
    ids = store.sample_ids(subjects)
    if not ids:
        raise ConfigError(f"final model: no samples for subjects {list(subjects)[:3]}...")
    loop = _Loop(model_cfg, train_cfg, store, store.num_classes, [ids], epochs, ["final model"])
    history = [{"epoch": e, **loop.train_epoch(e, final=e == epochs)[0]} for e in range(1, epochs + 1)]
    model = loop.model.module
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"final model: weights became non-finite ({', '.join(bad[:3])})")
    return model.cpu().eval(), history


def fit_check(model_cfg: ModelConfig, train_cfg: TrainConfig, store: SampleStore, sample_ids: Sequence[str],
              epochs: int, every: int = 0) -> list[dict[str, Any]]:
    """Can this configuration fit its own training samples? The check to run before tuning a model (a network that
    cannot overfit two dozen samples has a bug, not a budget problem).

    Trains on `sample_ids` for `epochs` and evaluates the same samples, non-augmented and in eval mode, every `every`
    epochs (0: only the last). Returns one entry per evaluation: `epoch`, `lr`, `train_loss` (while training),
    `fit_uf1`, `fit_accuracy` and `fit_loss` (eval mode, the returned weights), plus `fit_au_f1`, `fit_flow_epe`
    (pixels of the 128 px frame) and `fit_landmark_nme` where the model predicts them and the cache has the ground
    truth. Raises ConfigError for an empty sample list or `epochs` < 1.
    """
    if epochs < 1 or not sample_ids:
        raise ConfigError(f"fit check: need at least one epoch and one sample, got {epochs} and {len(sample_ids)}")
    ids = list(sample_ids)
    loop = _Loop(model_cfg, train_cfg, store, store.num_classes, [ids], epochs, ["fit check"])
    fit_set = store.torch_dataset(ids, loop.inputs, False, train_cfg.seed, TARGET_KEYS)
    out = []
    for epoch in range(1, epochs + 1):
        evaluate = epoch == epochs or (every > 0 and epoch % every == 0)
        entry: dict[str, Any] = {"epoch": epoch, **loop.train_epoch(epoch, final=evaluate)[0]}
        if evaluate:
            ((probs, extra),) = loop.predict_and_score([fit_set])
            scores = classification_metrics(fit_set.labels, probs.argmax(1), store.num_classes)
            entry |= {"fit_uf1": scores["uf1"], "fit_accuracy": scores["accuracy"],
                      **{f"fit_{k}": v for k, v in extra.items()}}
            out.append(entry)
            log.info("fit check %s/%s epoch %d: %s", model_cfg.name, model_cfg.config, epoch,
                     ", ".join(f"{k} {v:.3g}" for k, v in entry.items() if isinstance(v, float)))
    return out
