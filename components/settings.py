"""The platform's settings: the sections of params.yaml that only the platform reads (the search and Ray Tune, the
tracker, where `mer evaluate` writes, the search seed) and `Params`, the whole of params.yaml, validated once here.

The library validates what the library uses (mer_model/config.py: synth, data, preprocess, model, train, the
intervals); `Params` extends its `LibraryParams` with these sections, and `load_params` / `parse_params` /
`with_overrides` are the library's generic loaders bound to it, so an unknown key anywhere is the same one-line
error naming the file and key. The benchmark's model catalogue is not a run-time setting: it lives in its own file
(benchmarks/catalogue.yaml), validated by `Catalogue` below and read by `mer benchmark`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from mer.model import config
from mer.model.config import (
    IntervalConfig,
    LibraryParams,
    ModelConfig,
    Protocol,
    Section,
    TrainConfig,
    registered,
    set_dotted,
)
from mer.model.errors import ConfigError


class SearchParam(Section):
    """One dimension of the hyperparameter search space."""

    type: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchParam:
        if self.type == "choice":
            if not self.values:
                raise PydanticCustomError("search_param", "a choice needs a non-empty list of values")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise PydanticCustomError("search_param", "needs low < high")
        elif self.type == "loguniform" and self.low <= 0:
            raise PydanticCustomError("search_param", "loguniform needs low > 0")
        return self

    def candidates(self) -> list[Any]:
        """Values the search may sample at its bounds (every choice), to validate the key with at load."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low or 0), int(self.high or 0)]
        return [self.low, self.high]


class TuneConfig(Section):
    """Ray Tune: LOSO folds as Ray tasks, Optuna search scored on inner validation only."""

    # search trials; 0 = no search, evaluate the configured hyperparameters
    num_samples: int = Field(0, ge=0, le=100_000)
    search_space: dict[str, SearchParam] = Field(default_factory=dict)  # keys like "train.lr", "model.kwargs.dim"
    search_folds: int = Field(3, ge=1, le=100_000)  # LOSO folds whose INNER validation score is a trial's objective
    metric: str = "uf1"
    max_concurrent_trials: int = Field(2, ge=1, le=10_000)
    fold_cpus: float = Field(1, gt=0, le=1024)
    fold_gpus: float = Field(0, ge=0, le=64)  # fractional: several small folds share one GPU
    # Fold tasks (groups of fold_group_size folds) one trial has in flight at once; 0 = no cap: every fold task is
    # submitted and Ray runs as many as the cluster holds at each moment (the pending ones are autoscaler demand).
    folds_per_trial: int = Field(0, ge=0, le=100_000)
    # Seconds the driver waits for a Ray node that can hold one fold (fold_cpus and fold_gpus on one node) before it
    # fails with one line; each node that joins meanwhile (an autoscaler bringing up workers) restarts the clock. On
    # a command's private local Ray (no address), which cannot grow, it fails at once.
    fold_node_wait_s: float = Field(600, gt=0, le=7 * 86_400)
    # Folds one Ray task trains: > 1 trains them as one stacked model with torch.func for models that declare
    # `fold_batching` (mer.model.training.fold_batch; e.g. 68 STSTNet folds on one GPU in one process), one after
    # another in the same process otherwise. Each fold is still stored under its own key.
    fold_group_size: int = Field(1, ge=1, le=10_000)
    max_retries: int = Field(2, ge=0, le=100)  # a fold whose worker died is retried by Ray
    storage_path: str = "runs/tune"  # local dir or s3://bucket/prefix; experiment state survives the head node
    results: str = "runs/results"  # local: summary.json + pooled predictions of the chosen config (the DVC output)
    experiment: str | None = None  # None = derived from dataset x model x protocol
    ray_address: str | None = None
    final_model: bool = True  # train on all subjects with the chosen config and register it
    # Seed repeats: > 1 = the evaluation runs this many times as independent runs, repeat r with train.seed =
    # mer.model.training.repeats.repeat_seed(train.seed, r) (repeat 0 keeps train.seed: it is the single run), as
    # concurrent Tune trials whose fold tasks are all submitted together; summary.json, MLflow and `mer benchmark`
    # report the mean and sd over repeats beside the single run's metrics. Costs `repeats` x the evaluation.
    repeats: int = Field(1, ge=1, le=100)
    # Nested search: the search runs once per evaluation fold, on that fold's TRAINING subjects only (its
    # `search_folds` folds drawn from them by train.split), and each fold is trained and tested with its own choice,
    # so no subject a recipe is scored on took part in choosing it. Costs folds x num_samples x search_folds fold
    # trainings. No final model: the nested run estimates the search procedure, not one configuration.
    nested: bool = False

    @model_validator(mode="after")
    def _search_needs_a_space(self) -> TuneConfig:
        if self.num_samples > 0 and not self.search_space:
            raise PydanticCustomError("search_space", "num_samples > 0 needs a non-empty search_space")
        if self.nested and self.num_samples == 0:
            raise PydanticCustomError("nested", "nested: true needs a search (num_samples > 0)")
        return self


def _tracker_names() -> list[str]:
    """The registered trackers (mer.components.tracking.TRACKERS), imported when a backend name is validated (the
    tracking package imports pandas; a tracker's own module, MLflow's, only when it is chosen)."""
    from mer.components.tracking import TRACKERS

    return TRACKERS.names()


class TrackingConfig(Section):
    """MLflow: an embedded SQLite store by default; MLFLOW_TRACKING_URI overrides `uri`. `backend` is a registered
    tracker (mer.components.tracking.TRACKERS): `none` tracks nothing (no server, no model logging), the results in
    tune.results are still complete."""

    backend: Annotated[str, registered(_tracker_names)] = "mlflow"
    uri: str = "sqlite:///mlflow.db"
    artifact_location: str | None = None
    experiment: str = "mer"
    registered_model: str = "mer-model"
    registered_info: str = "runs/registered.json"  # written by `mer register`: model name, version, source run


class EvaluateConfig(Section):
    """Where `mer evaluate` writes, and the intervals of every reported score (the library's IntervalConfig)."""

    metrics: str = "metrics.json"
    plots: str = "plots"
    report: str = "reports"
    intervals: IntervalConfig = Field(default_factory=IntervalConfig)


class Params(LibraryParams):
    """The whole of params.yaml: the library's sections and the platform's."""

    seed: int = Field(0, ge=0)  # the search's seed (OptunaSearch, the nested search)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _check_search_space(self) -> Params:
        """Every `tune.search_space` key names a model or training parameter that accepts the values the search may
        sample, checked at load (not inside each trial after Ray and the tracker started). Only `model.*` and
        `train.*` may be searched: a fold's stored result is keyed by those sections (folds.fold_fingerprint), and
        the phase sets `train.protocol` / `train.split` itself."""
        sections: dict[str, type[Section]] = {"model": ModelConfig, "train": TrainConfig}
        for key, spec in self.tune.search_space.items():
            where = f"tune.search_space.{key}"
            section, _, rest = key.partition(".")
            if section not in sections or not rest:
                raise PydanticCustomError("search_space", "{where}: only model.* and train.* parameters can be "
                                          "searched", {"where": where})
            if key in ("train.protocol", "train.split"):
                raise PydanticCustomError("search_space", "{where}: set by the experiment phase, not searchable",
                                          {"where": where})
            for value in spec.candidates():
                tree = getattr(self, section).model_dump(mode="json", by_alias=True)
                try:
                    set_dotted(tree, rest, value)
                    sections[section].model_validate(tree)
                except ConfigError as err:
                    raise PydanticCustomError("search_space", "{where}: {detail}",
                                              {"where": where, "detail": str(err)}) from None
                except ValidationError as err:
                    first = err.errors()[0]
                    detail = ("no such parameter" if first["type"] == "extra_forbidden"
                              else f"value {value!r}: {first['msg']}")
                    raise PydanticCustomError("search_space", "{where}: {detail}",
                                              {"where": where, "detail": detail}) from None
        return self


def parse_params(raw: Mapping[str, Any] | None, source: str = "params",
                 overrides: Mapping[str, Any] | None = None) -> Params:
    """A params mapping validated as the whole of params.yaml (mer.model.config.parse_params with `Params`)."""
    return config.parse_params(Params, raw, source, overrides)


def load_params(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> Params:
    """params.yaml loaded and validated, dotted overrides such as {"train.epochs": 3} applied."""
    return config.load_params(Params, path, overrides)


def with_overrides(base: Params | Mapping[str, Any], overrides: Mapping[str, Any], source: str) -> Params:
    """`base` with dotted `overrides` applied, re-validated as the whole of params.yaml (mer.model.config)."""
    return config.with_overrides(base, overrides, source, Params)


# --------------------------------------------------------------------------------------------------------------------
# The benchmark's model catalogue (its own file, not run-time params)

class BenchmarkModel(Section):
    """One model of `mer benchmark`: a registered model and configuration plus its training recipe."""

    name: str
    config: str = "small"
    kwargs: dict[str, Any] = Field(default_factory=dict)  # model.kwargs
    faces: dict[str, Any] = Field(default_factory=dict)  # extra model.kwargs used only when the cache has apex crops
    # preprocess.face_size for this entry's face crops (its network's input size: resized once at preprocessing, not
    # every batch); None = preprocess.face_size. Models benchmarked together share the largest.
    face_size: int | None = Field(None, ge=16, le=2048)
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the train section (epochs, lr, batch_size, ..)
    label: str = ""  # name in the tables; "" = the key


class BenchmarkConfig(Section):
    """`mer benchmark`: LOSO of several models x protocols through ingest -> preprocess -> the LOSO driver."""

    work: str = "runs/benchmark"  # per collection: ingested table, preprocessed cache, Tune/fold state, run results
    out: str = "results"  # tables under <out>/<collection>/ (results.md, results.csv, results.png)
    models: dict[str, BenchmarkModel] = Field(default_factory=dict)
    default_models: list[str] = Field(default_factory=list)  # [] = every entry of `models`
    protocols: list[Protocol] = Field(default_factory=lambda: ["fixed", "inner", "oracle"])
    # `fixed` trains for the epoch count `inner` (run first) supports on validation subjects: the best epoch of its
    # fold-averaged validation UF1 (protocols.retrain_epochs), chosen without looking at a test fold; false = the
    # model's configured epochs.
    fixed_epochs_from_inner: bool = True
    cpus: int = Field(0, ge=0, le=4096)  # local Ray CPUs; 0 = all (tune.ray_address set = use that cluster)
    # The row every honest row is compared with (paired difference over the same samples, per protocol): the first of
    # these entries the table has; [] = no comparison.
    baseline: list[str] = Field(default_factory=list)


class Catalogue(Section):
    """The benchmark's own settings file (benchmarks/catalogue.yaml): one `benchmark` section, so its keys read as
    before (`benchmark.models.<entry>`) in errors and in `mer benchmark -S benchmark.cpus=2`."""

    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)


CATALOGUE = "benchmarks/catalogue.yaml"


def load_catalogue(path: str | Path = CATALOGUE, overrides: Mapping[str, Any] | None = None) -> BenchmarkConfig:
    """The benchmark's model catalogue, validated, dotted `benchmark.*` overrides applied."""
    return config.load_params(Catalogue, path, overrides).benchmark
