"""Fold batching: the model of a fold group trained as ONE stacked model (the F > 1 case of the training loop).

A LOSO fold of a small MER model leaves a GPU idle most of the time, and one process per fold repeats the model
build, the data load and the CUDA context 68 times. The training loop (mer.model.training.trainer) runs every fold of a
group along one fold axis; for models that declare `fold_batching` (mer.model.models.base.MERModel) its model is a
`StackedModel` built with torch.func (https://pytorch.org/docs/stable/func.html, "model ensembling"):
`stack_module_state` stacks the folds' parameters and buffers along a leading fold axis, `vmap(functional_call)` runs
every fold's forward and loss in one call (BatchNorm running statistics are stacked buffers updated in place, dropout
draws differ per fold), and ONE optimizer over the stacked tensors updates each fold exactly as its own optimizer would
(Adam(W)/SGD are elementwise; the learning-rate schedule is the same for every fold).

What differs from one-fold training (the stacked path agrees statistically, not bitwise):

* padded per-fold index tables (trainer._Loop): every fold of a group takes the same number of steps per epoch, that
  of its largest training set; a smaller fold's epoch is its own shuffled order (the one-fold path's, same generator)
  followed by the first samples of that order again, so the padding is real samples of that fold, never a dummy input
  that would distort BatchNorm statistics or the loss. LOSO training sets differ by one subject's clips, so these
  repeats are a few percent of an epoch; with equal training-set sizes and no dropout, a fold's numbers equal the
  one-fold path's up to float summation order (tests/test_fold_batch.py);
* dropout masks are drawn per fold from one generator (`vmap(randomness="different")`);
* no mid-fold checkpoints: a group whose worker dies retrains its unfinished folds (finished folds are stored by the
  caller); small models, the ones worth batching, take seconds per fold;
* channels-last is not applied to the stacked 5-D inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from mer.model.training.augment import tta_forward


class StackedModel:
    """F copies of one initialised model as stacked tensors with a leading fold axis; the interface the training loop
    uses for any fold count (trainer._OneModel is the F = 1 one): `module` (structure, mode, loss; on the meta device:
    `functional_call` supplies every tensor), `forward` over (F, B, ...) batches, per-fold state views."""

    def __init__(self, model: nn.Module, folds: int, device: torch.device) -> None:
        model = model.to(device)
        self.params, self.buffers = stack_module_state([model] * folds)
        self.state_keys = list(model.state_dict())
        self.module = copy.deepcopy(model).to("meta")
        self.norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.norm_buffers = [f"{name}.{b}" for name, m in self.module.named_modules() if m in self.norms
                             for b in ("running_mean", "running_var", "num_batches_tracked")]

    def parameters(self) -> Iterator[Tensor]:
        return iter(self.params.values())

    def device_batch(self, batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """An (F, B, ...) batch on `device` (no memory-format change for the stacked inputs)."""
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch: dict[str, Tensor], weights: Tensor | None, with_loss: bool, tta: str = "none"
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every fold's outputs (F, B, ...) and, `with_loss`, its loss parts (F,) for an (F, B, ...) batch and the
        folds' (F, C) class weights, in one vmapped call; `tta`: an evaluation's test-time augmentation."""

        def one_fold(params: dict, buffers: dict, fold_batch: dict, fold_weights: Tensor | None) -> Any:
            if fold_weights is not None:
                fold_batch = {**fold_batch, "class_weights": fold_weights}
            outputs = tta_forward(lambda b: functional_call(self.module, (params, buffers), (b,)), fold_batch, tta)
            if not with_loss:
                return outputs, {}
            loss, parts = self.module.loss(outputs, fold_batch)
            return outputs, {**parts, "loss": loss}

        in_dims = (0, 0, 0, 0 if weights is not None else None)
        return vmap(one_fold, in_dims=in_dims, randomness="different")(self.params, self.buffers, batch, weights)

    @torch.no_grad()
    def reset_norms(self) -> None:
        """Every fold's BatchNorm running statistics reset (mean 0, variance 1, no batches tracked)."""
        for name in self.norm_buffers:
            buffer = self.buffers[name]
            buffer.fill_(1) if name.endswith("running_var") else buffer.zero_()

    def fold_state(self, f: int) -> dict[str, Tensor]:
        """Fold f's state dict: views into the stacked tensors, in the model's state_dict order."""
        stacked = {**self.params, **self.buffers}
        return {k: stacked[k][f] for k in self.state_keys}
