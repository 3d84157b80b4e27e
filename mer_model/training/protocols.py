"""Epoch-selection protocols behind one registry, and the platform's leak rule.

A protocol decides which split a fold evaluates after every epoch (none, the inner validation subjects, or the test
subject), how an epoch's score is ranked, and so which epoch's weights predict the test subject. The trainer asks the
protocol instead of branching on its name, so a new protocol is one class here with `@register_protocol`.

The leak rule lives here too, because a protocol is half of it: a result is LEAKY when its protocol looked at test
labels to choose the epoch (`oracle`, as the public HTNet/MMNet/FaceSleuth scripts do) or when the model reads the
dataset's annotated AUs, the human coding the emotion labels were partly derived from (CVA+FPF+AU, au_mode=annotated).
Every stage (engine, tracking tags, reports, benchmark, register, predict) calls `is_leaky`, never its own copy.

Registered: `fixed`, `inner`, `oracle` (docs/architecture.md, "Training contract"). `retrain_epochs` turns the folds
of an `inner` run into the epoch count of a model retrained without validation subjects (`fixed`, the final model).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from mer.model.registry import Registry

if TYPE_CHECKING:
    from mer.model.training.results import FoldSummary

Watch = Literal["none", "val", "test"]


class EpochProtocol:
    """How one fold chooses its epoch. Subclasses set the class attributes and, if they watch a split, `score`.

    * `watch`: the split evaluated after every epoch: `none` (the last epoch is used), `val` (validation subjects
      drawn from the fold's TRAINING subjects) or `test` (the test subject itself: leaky);
    * `leaky`: the selection used test labels;
    * `early_stopping`: `train.patience` applies (epochs without improvement of the watched score).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    watch: ClassVar[Watch] = "none"
    leaky: ClassVar[bool] = False
    early_stopping: ClassVar[bool] = False

    @property
    def needs_validation(self) -> bool:
        """The fold must hold out validation subjects (drawn from its training subjects only)."""
        return self.watch == "val"

    def score(self, entry: Mapping[str, Any]) -> tuple[float, ...]:
        """The ranking key of an epoch's history entry (higher is better)."""
        return (float(entry["epoch"]),)

    def improved(self, score: tuple[float, ...], best: tuple[float, ...] | None) -> bool:
        """True when `score` replaces the best epoch so far."""
        return best is None or score > best


PROTOCOLS: Registry[EpochProtocol] = Registry("protocol", "train.protocol", "mer_model/training/protocols.py")
P = TypeVar("P", bound=type[EpochProtocol])


def register_protocol(cls: P) -> P:
    """Class decorator: register an instance of the EpochProtocol under its `name`; registration order is display
    order (`PROTOCOLS.rank`) in every table and figure."""
    PROTOCOLS.add(cls.name, cls(), stacklevel=2)
    return cls


def get_protocol(name: str) -> EpochProtocol:
    """The registered protocol `name`; ConfigError naming `train.protocol` when unknown."""
    return PROTOCOLS.get(name)


@register_protocol
class Fixed(EpochProtocol):
    name = "fixed"
    description = "train.epochs epochs; the test subject is predicted once, with the last epoch's weights (honest)"


@register_protocol
class Inner(EpochProtocol):
    name = "inner"
    description = ("the epoch with the best validation UF1 (ties: lower validation loss) on subjects held out from "
                   "the fold's TRAINING subjects; optional early stopping; test predicted once (honest)")
    watch = "val"
    early_stopping = True

    def score(self, entry: Mapping[str, Any]) -> tuple[float, ...]:
        return (float(entry["val_uf1"]), -float(entry["val_loss"]))


@register_protocol
class Oracle(EpochProtocol):
    name = "oracle"
    description = ("per test subject, the LAST epoch with the best test accuracy, as the authors' scripts do; "
                   "for reproducing published numbers only (leaky)")
    watch = "test"
    leaky = True

    def score(self, entry: Mapping[str, Any]) -> tuple[float, ...]:
        return (float(entry["test_accuracy"]),)

    def improved(self, score: tuple[float, ...], best: tuple[float, ...] | None) -> bool:
        return best is None or score >= best  # `>=`: the last epoch reaching the best accuracy wins


def retrain_epochs(folds: Sequence["FoldSummary"]) -> int:
    """Epochs for a model retrained on all of a fold's training subjects, from an epoch-selecting run's folds.

    `folds`: the run's fold summaries (their per-epoch `history`, 1-based `epoch`, and `selected_epoch`). When
    every fold has a validation curve (`val_uf1`, the `inner` protocol): the epoch that maximises the validation UF1
    averaged over the folds (over the epochs every fold reached; ties: the earliest), as xgboost.cv and lightgbm.cv
    choose a number of boosting rounds. Otherwise (no validation curve: `fixed`, or `oracle`'s test-based choice): the
    median selected epoch. Returns >= 1; ValueError when there are no folds.

    Why not the median of the per-fold choices: each fold's curve is measured on a handful of validation subjects, so
    its argmax is mostly noise, and it favours early epochs, whose scores swing most while the learning rate is high.
    Measured on the shared composite (LOSO, `inner`, 40 folds): CVA+FPF+AU's per-fold choices had median 11 of 30
    epochs while the fold-averaged curve kept rising to epoch 21; retrained for 11 epochs it scored 0.706 UF1 against
    0.753 for the full 30 (5-fold CV, three partitions; MMNet 18 vs 40 epochs: 0.687 vs 0.718).
    """
    if not folds:
        raise ValueError("retrain_epochs: no folds")
    histories = [f.history for f in folds]
    if all(h and all("val_uf1" in e for e in h) for h in histories):
        reached = min(len(h) for h in histories)
        mean = [statistics.fmean(float(h[i]["val_uf1"]) for h in histories) for i in range(reached)]
        best = max(range(reached), key=lambda i: (mean[i], -i))
        return int(histories[0][best]["epoch"])
    return max(1, int(round(statistics.median(f.selected_epoch for f in folds))))


# --------------------------------------------------------------------------------------------------------------------
# The leak rule


def _model_fields(model: Any) -> tuple[str, str, dict[str, Any]]:
    """(name, config, kwargs) of a ModelConfig, of its JSON mapping, or of a built model (its `build_spec`)."""
    spec = getattr(model, "build_spec", None)
    if spec is not None:
        return spec["name"], spec["config"], dict(spec["overrides"])
    if isinstance(model, Mapping):
        return str(model["name"]), str(model.get("config", "small")), dict(model.get("kwargs") or {})
    return model.name, model.config, dict(model.kwargs)


def reads_annotated_aus(model: Any) -> bool:
    """True when the model (a ModelConfig, its mapping, or a model built by `create_model`) takes the dataset's AU
    coding as an input; known from the registry without building the network. Unknown names raise ConfigError
    naming `model.*`."""
    from mer.model.models import model_inputs  # torch + timm: only when a model is asked about

    name, config, kwargs = _model_fields(model)
    return "aus" in model_inputs(name, config, **kwargs)


def is_leaky(protocol: str, model: Any) -> bool:
    """The one leak rule: the protocol chose epochs on test labels, or the model reads annotated AUs."""
    return get_protocol(protocol).leaky or reads_annotated_aus(model)


def leak_reasons(protocol: str, model: Any) -> list[str]:
    """Why a result is leaky, as short phrases (empty when honest)."""
    reasons = [f"{protocol} epoch selection"] if get_protocol(protocol).leaky else []
    return reasons + (["annotated AUs as input"] if reads_annotated_aus(model) else [])


def result_verdict(folds: Sequence["FoldSummary"]) -> bool:
    """The leak verdict of a pooled result: leaky when any of its folds was stored leaky. Each fold's verdict was
    decided once, by `is_leaky` on the configuration that trained it (after a search, the chosen one), and every
    output of the result (summary, metrics.json, reports, tables, tags, the champion alias) reads this, never the
    current params.yaml."""
    return any(f.leaky for f in folds)


def run_label(protocol: str, leaky: bool) -> str:
    """The protocol as run names, titles and tables show it, e.g. "oracle (leaky)"."""
    return f"{protocol} (leaky)" if leaky else protocol

