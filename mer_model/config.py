"""Typed, validated configuration of the library: the sections of `params.yaml` that library code reads (synth,
data, preprocess, model, train; the interval settings of mer.model.training.stats) and the generic loaders.

The platform's own sections (tune, tracking, evaluate, the search seed) are defined with the platform, in
components/settings.py, whose `Params` extends `LibraryParams`: params.yaml is validated once, by that model, with the
loaders below. DVC stages depend on sections of params.yaml (`params:` in dvc.yaml), so a training parameter never
invalidates the preprocessing cache. Validation errors name the offending key (e.g. `params.yaml: train.protocol:
Input should be 'fixed', 'inner' or 'oracle'`).

Every numeric setting has the range in which it means something, checked at load: a count is not negative, a
fraction lies in [0, 1], and sizes, epochs and rates have upper bounds far above any sensible value but below the
absurd (`train.epochs: 1e12` would run without end; `train.lr: 1e30` only produces NaN). The bounds are generous on
purpose: they catch typos and unit slips, not unusual choices.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from mer.model.errors import ConfigError
from mer.model.training.protocols import PROTOCOLS


def registered(names: Callable[[], list[str]]) -> AfterValidator:
    """A name checked against a registry at validation time, worded like pydantic's literal error."""

    def check(value: str) -> str:
        known = names()
        if value not in known:
            expected = (f"{', '.join(repr(n) for n in known[:-1])} or {known[-1]!r}" if len(known) > 1
                        else repr(known[0]))
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return value

    return AfterValidator(check)


def _dataset_names() -> list[str]:
    """The registered datasets, imported when a dataset name is validated (they import pandas and every loader: not
    a cost of `import mer.model.config`)."""
    from mer.model.data.loaders import DATASETS

    return DATASETS.names()


def _split_names() -> list[str]:
    """The registered splits, imported when a split name is validated (pandas)."""
    from mer.model.training.splits import SPLITS

    return SPLITS.names()


def _class_set_names() -> list[str]:
    """The registered class sets, imported when a class-set name is validated (pandas)."""
    from mer.model.data.labels import CLASS_SETS

    return CLASS_SETS.names()


def _batch_key_names() -> list[str]:
    """The batch keys (mer.model.batch_keys), imported when a modality is validated (numpy and the AU list)."""
    from mer.model.batch_keys import BATCH_KEYS

    return BATCH_KEYS.names()


DatasetName = Annotated[str, registered(_dataset_names)]  # mer.model.data.loaders
Protocol = Annotated[str, registered(PROTOCOLS.names)]  # mer.model.training.protocols
SplitName = Annotated[str, registered(_split_names)]  # mer.model.training.splits
ClassSetName = Annotated[str, registered(_class_set_names)]  # mer.model.data.labels
# The arrays of the preprocessed cache, one cache entry each: the batch keys (docs/architecture.md, "Preprocessed
# cache").
Modality = Annotated[str, registered(_batch_key_names)]  # mer.model.batch_keys


class Section(BaseModel):
    """Unknown keys are errors: a typo in params.yaml must not be silently ignored. The platform's sections
    (components/settings.py) are built on it too."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SynthConfig(Section):
    """The embedded synthetic dataset (CASME II layout)."""

    out: str = "data/synthetic"
    subjects: int = Field(8, ge=2, le=1000)
    clips_per_subject: int = Field(10, ge=1, le=1000)
    min_frames: int = Field(12, ge=10, le=30)
    max_frames: int = Field(24, ge=10, le=30)
    image_size: int = Field(256, ge=128, le=2048)
    # Source datasets the subjects are spread over (round robin): 1 = dataset `synthetic`; n > 1 = `synthetic1` ..
    # `syntheticN`, a composite-like set for the leave-one-dataset-out split.
    datasets: int = Field(1, ge=1, le=100)
    seed: int = Field(0, ge=0)


class DataConfig(Section):
    """Which dataset to read and how to label it."""

    source: DatasetName = "synthetic"
    root: str = "data/synthetic"
    annotation: str | None = None  # coding sheet; None = the loader's default file name under root
    class_set: ClassSetName = "casme2_5"
    au_sheets: dict[str, str] = Field(default_factory=dict)  # composite AU join: {"casme2": path, "samm": path}
    strict: bool = False  # annotation-vs-disk warnings become errors
    ingested: str = "data/ingested/annotations.csv"


class FlowConfig(Section):
    """TV-L1 settings (cv2.optflow.DualTVL1OpticalFlow) and the 28x28 flow-map convention."""

    tau: float = Field(0.25, gt=0, le=1)
    lambda_: float = Field(0.15, alias="lambda", gt=0, le=100)
    theta: float = Field(0.3, gt=0, le=1)
    nscales: int = Field(5, ge=1, le=20)
    warps: int = Field(5, ge=1, le=100)
    epsilon: float = Field(0.01, gt=0, le=1)
    inner_iterations: int = Field(30, ge=1, le=1000)
    outer_iterations: int = Field(10, ge=1, le=1000)
    scale_step: float = Field(0.8, gt=0, lt=1)
    median_filtering: int = Field(5, ge=1, le=31)
    size: int = Field(224, ge=32, le=2048)  # side of the aligned grey crops the onset->apex flow is computed on
    map_size: int = Field(28, ge=4, le=1024)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PreprocessConfig(Section):
    """Face alignment, crops, flow and landmarks; the cache every model reads."""

    out: str = "data/preprocessed"
    detector: Literal["dlib", "annotation"] = "dlib"  # annotation = use landmarks saved with the dataset
    detector_upsample: int = Field(1, ge=0, le=4)
    margin: float = Field(0.15, ge=0, le=1)  # per side, a fraction of the landmarks' extent
    face_size: int = Field(224, ge=16, le=2048)
    seq_frames: int = Field(8, ge=2, le=256)
    seq_size: int = Field(128, ge=16, le=2048)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    # Which cache arrays to compute; [] = what `model` reads (its inputs and loss targets). Only what is missing is
    # computed: a later model reading another modality adds it to the same cache.
    modalities: list[Modality] = Field(default_factory=list)
    num_workers: int = Field(0, ge=0, le=4096)  # Ray CPUs to use; 0 = all available
    ray_address: str | None = None  # None = local Ray; "auto" or ray://host:port for a cluster


class ModelConfig(Section):
    """Which registered model to build; `config` picks a named preset, `kwargs` overrides single arguments."""

    name: str = "cva_fpf"
    config: str = "small"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Section):
    """The fold trainer and the evaluation protocol."""

    protocol: Protocol = "fixed"
    # How the cache becomes folds: loso (one per subject) | subject_5fold (5 subject groups) | lodo (one per dataset).
    split: SplitName = "loso"
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    # Learning-rate schedule over the epochs of a run, stepped once per epoch (mer.model.training.trainer.lr_factor):
    # constant; cosine annealing to 0 at the last epoch; exponential decay by `lr_gamma` per epoch (MMNet's recipe,
    # gamma 0.987). `warmup_epochs` ramp linearly up to `lr` first.
    # Recompute every BatchNorm layer's population statistics over the (non-augmented) training set, with the final
    # weights of an epoch, before that epoch's model is evaluated or kept ("precise BN", Wu & Johnson 2021). The
    # running averages otherwise lag far behind the weights over the few dozen steps of a small MER fold: eval-mode
    # predictions collapse to one class while the training set is already fitted (docs/architecture.md).
    precise_bn: bool = True
    schedule: Literal["constant", "cosine", "exponential"] = "constant"
    warmup_epochs: int = Field(0, ge=0, le=10_000)
    lr_gamma: float = Field(0.987, gt=0, le=1)  # exponential only
    # Class-balanced cross-entropy (weights n / (K n_c) from the training fold). On by default: the field's metrics
    # (UF1, UAR) weight every class equally while MER classes are heavily imbalanced, so a balanced loss optimises the
    # quantity that is reported; set false to reproduce authors' plain-CE training.
    class_weights: bool = True
    val_fraction: float = Field(0.2, gt=0, lt=1)  # `inner`: share of TRAINING subjects held out for validation
    # `inner`: early stopping patience in epochs (0 = select best epoch, no stop)
    patience: int = Field(0, ge=0, le=10_000)
    augment: bool = True
    # Test-time augmentation of every evaluation (validation, test, final model, `mer predict`; MERModel.tta): "flip"
    # averages the class probabilities of each sample and its mirror image -- the flip the training augmentation
    # already draws, so the mirror is in the training distribution. It cuts the variance of the larger networks' test
    # predictions (5-fold subject CV on the MEGC2019 composite: docs/results.md "How the settings were chosen").
    tta: Literal["none", "flip"] = "none"
    # Weight averaging (mer.model.training.trainer.WeightAverage): > 0 = every evaluated or kept epoch uses an
    # exponential moving average of the weights, this decay per optimiser step (timm's warm-up; 0.9 ~ the last 10
    # steps). Steadies the snapshot `inner` keeps from the high learning-rate phase; `fixed` after an annealed schedule
    # is unchanged. 0 = off.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    # Seed ensemble (mer.model.training.trainer.train_fold): > 1 = every fold trains this many members, each as the
    # single model of its own seed would be trained -- under `inner` with its own validation subjects drawn from the
    # fold's training subjects and its own kept epoch -- and the test subject is predicted with the mean of their class
    # probabilities. Costs `ensemble` x the fold's training time. It cuts the variance of the larger networks (5-fold
    # subject CV on the MEGC2019 composite: docs/results.md "How the settings were chosen"). 1 = one model.
    ensemble: int = Field(1, ge=1, le=100)
    checkpoint_every: int = Field(0, ge=0, le=10_000)  # epochs; 0 = no intermediate checkpoints
    device: str = "auto"
    # Mixed precision on CUDA only (CPU runs stay float32): bfloat16 autocast where the GPU supports it, else float16
    # with a GradScaler (mer.model.models.checkpoint.autocast_dtype).
    amp: bool = True
    # cuDNN autotuning: faster convolutions, but the algorithm (and so the last bits of every number) may change from
    # run to run. Off = deterministic cuDNN, reproducible folds (the default).
    cudnn_benchmark: bool = False
    # Device-resident data (mer.model.training.data.DeviceArrays): the samples' arrays stacked once on the training
    # device, batches gathered and augmented there (affine_grid/grid_sample; the same draws as the CPU path, equal
    # within interpolation tolerance). auto = on CUDA when they fit `device_data_mb`; on = wherever they fit (CPU
    # too); off = the CPU reference path (per-sample OpenCV warps, collate, host-to-device copy).
    device_data: Literal["auto", "on", "off"] = "auto"
    device_data_mb: float = Field(2048, ge=0, le=1_000_000)
    num_workers: int = Field(0, ge=0, le=256)
    seed: int = Field(0, ge=0)


class IntervalConfig(Section):
    """Subject-bootstrap confidence intervals and paired comparisons (mer.model.training.stats)."""

    # Resamples of the bootstrap and of the permutation test. benchmarks/stats.py, 68 subjects / 442 samples, 20 seeds:
    # every bound within 0.0038 of its median at 8000 (0.0058 at 4000, 0.0075 at 2000); 0.22 s per table row on
    # one core (intervals pooled and per dataset + one paired comparison).
    resamples: int = Field(8000, ge=100, le=1_000_000)
    seed: int = Field(0, ge=0)  # fixed: the same predictions give the same interval
    confidence: float = Field(0.95, gt=0.5, lt=1)


class LibraryParams(Section):
    """The sections of params.yaml the library reads (each function is given its section, never the whole). The
    platform's settings model (components/settings.py `Params`) extends this with its own sections; the generic
    loaders below validate with whichever model they are given."""

    synth: SynthConfig = Field(default_factory=SynthConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


P = TypeVar("P", bound=BaseModel)


def _shown(value: Any) -> str:
    """A value as it would be written in params.yaml or after -S (YAML flow style), cut at 60 characters."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def _close_key(root: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """For an unknown key: the known key of the same section of `root` it most resembles (`train.epoch` ->
    `train.epochs`), when the section is a fixed set of fields."""
    model: Any = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    names = [f.alias or name for name, f in model.model_fields.items()]
    match = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return ".".join([*map(str, loc[:-1]), match[0]]) if match else None


def _format_validation_error(root: type[BaseModel], source: str, err: ValidationError,
                             overrides: Mapping[str, Any] | None = None) -> str:
    """One line for the first error: `source: key: message (did you mean KEY; got VALUE; set by the override
    KEY=VALUE) (and N more: KEYS)` -- the suggestion for an unknown key, the value when pydantic has one, the override
    when the key is (or lies under) one of `overrides`."""
    errors = err.errors()
    first = errors[0]
    key = ".".join(str(p) for p in first["loc"])
    detail = []
    if first["type"] == "extra_forbidden" and (close := _close_key(root, tuple(first["loc"]))):
        detail.append(f"did you mean {close}")
    if first["type"] != "missing" and not isinstance(first.get("input"), Mapping):
        detail.append(f"got {_shown(first.get('input'))}")
    overrides = overrides or {}
    origin = next((k for k in overrides if key == k or key.startswith(f"{k}.")), None)
    if origin is not None:
        detail.append(f"set by the override {origin}={_shown(overrides[origin])}")
    note = f" ({'; '.join(detail)})" if detail else ""
    others = list(dict.fromkeys(".".join(str(p) for p in e["loc"]) or "(top level)" for e in errors[1:]))
    more = (f" (and {len(errors) - 1} more: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
            if others else "")
    return f"{source}: {key}: {first['msg']}{note}{more}" if key else f"{source}: {first['msg']}{note}{more}"


def parse_params(model: type[P], raw: Mapping[str, Any] | None, source: str = "params",
                 overrides: Mapping[str, Any] | None = None) -> P:
    """Validate a params mapping with `model` (the platform's `Params`, or any settings model built from `Section`s);
    a ConfigError names the first bad key, its value, and the override that set it (`overrides`, dotted keys) if one
    did."""
    try:
        return model.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(model, source, err, overrides)) from None


def load_params(model: type[P], path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> P:
    """Load a settings file and validate it with `model`, applying dotted overrides such as {"train.epochs": 3}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if raw is None:
        # Refused rather than read as "all defaults": an empty file is far more often a truncated or failed write
        # than a wish, and the defaults are a different, much longer experiment. `{}` says "all defaults".
        raise ConfigError(f"{path}: empty parameters file (write `{{}}` to run with every default)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return with_overrides(raw, overrides or {}, str(path), model)


def with_overrides(base: P | Mapping[str, Any], overrides: Mapping[str, Any], source: str,
                   model: type[P] | None = None) -> P:
    """`base` (a settings object, or a mapping validated with `model`) with dotted `overrides` applied
    ({"train.lr": 1e-3}), re-validated: the one way every stage derives a configuration from another. `model`
    defaults to the type of `base`. A bad key or value is a ConfigError naming `source`."""
    if isinstance(base, BaseModel):
        tree, model = base.model_dump(mode="json", by_alias=True), model or type(base)
    elif model is None:
        raise TypeError("with_overrides: a mapping needs the settings model to validate it with")
    else:
        tree = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return parse_params(model, tree, source, overrides)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set tree["a"]["b"] for key "a.b", creating intermediate mappings."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a mapping")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a CLI override `key=value`; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
