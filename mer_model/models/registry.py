"""timm-style model registry: `@register_model` on a model class with named configurations.

Every model has at least a "paper" configuration (the authors' architecture, for real runs) and a "small" one that
trains on two CPU cores within the demo budget. `create_model(name, config, num_classes=..., **overrides)` builds it;
overrides are single constructor arguments (params.yaml `model.kwargs`), checked against the constructor so that a typo
is an error naming the key.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mer.model.errors import ConfigError
from mer.model.models.base import MERModel, OptionalInput
from mer.model.registry import Registry

M = TypeVar("M", bound=type[MERModel])


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its class, named configurations, constructor arguments (what `model.kwargs` may set) and
    `options`, the parts that read data a collection may lack (the class's `optional_inputs`: which argument
    switches which optional input off, and which data capability it needs)."""

    name: str
    cls: type[MERModel]
    configs: Mapping[str, Mapping[str, Any]]
    description: str = ""
    arguments: tuple[str, ...] = field(default=())
    options: tuple[OptionalInput, ...] = field(default=())


MODELS: Registry[ModelEntry] = Registry("model", "model.name", "mer_model/models/<name>.py")


def register_model(name: str, configs: Mapping[str, Mapping[str, Any]], description: str = "") -> Callable[[M], M]:
    """Class decorator: register `cls` under `name` with its named configurations (must include paper and small)."""

    def make(cls: M) -> ModelEntry:
        missing = {"paper", "small"} - set(configs)
        if missing:
            raise ValueError(f"model {name}: configurations {sorted(missing)} are required")
        params = inspect.signature(cls.__init__).parameters
        arguments = tuple(p for p in params if p not in ("self", "num_classes"))
        for cfg_name, cfg in configs.items():
            unknown = set(cfg) - set(arguments)
            if unknown:
                raise ValueError(f"model {name}, config {cfg_name}: unknown arguments {sorted(unknown)}")
        options = cls.optional_inputs()
        unknown = [o.kwarg for o in options if o.kwarg not in arguments]
        if unknown:
            raise ValueError(f"model {name}: optional input switched by {unknown[0]!r}, not a constructor argument")
        cls.name = name
        return ModelEntry(name, cls, dict(configs), description, arguments, options)

    return MODELS.decorator(name, make)


def list_models() -> list[str]:
    return sorted(MODELS.names())


def get_entry(name: str) -> ModelEntry:
    """The registered model `name`; ConfigError naming `model.name` when unknown."""
    return MODELS.get(name)


def list_configs(name: str) -> list[str]:
    return sorted(get_entry(name).configs)


def resolve_kwargs(name: str, config: str = "paper", **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of `name` under `config` plus overrides, defaults filled in (num_classes excluded)."""
    entry = get_entry(name)
    if config not in entry.configs:
        raise ConfigError(f"model.config: {name} has no configuration {config!r} (known: {', '.join(entry.configs)})")
    for key in overrides:
        if key not in entry.arguments:
            raise ConfigError(f"model.kwargs.{key}: not an argument of {name} (known: {', '.join(entry.arguments)})")
    params = inspect.signature(entry.cls.__init__).parameters
    empty = inspect.Parameter.empty
    resolved = {key: params[key].default for key in entry.arguments if params[key].default is not empty}
    resolved.update(entry.configs[config])
    resolved.update(overrides)
    return resolved


def create_model(name: str, config: str = "paper", *, num_classes: int, **overrides: Any) -> MERModel:
    """Build a registered model; records name/config/overrides on it so a checkpoint can rebuild it."""
    entry = get_entry(name)
    kwargs = resolve_kwargs(name, config, **overrides)
    model = entry.cls(num_classes, **kwargs)
    model.build_spec = {"name": name, "config": config, "overrides": dict(overrides), "num_classes": num_classes}
    return model


def model_io(name: str, config: str = "paper", **overrides: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, targets) batch keys of a configuration, without building the network."""
    return get_entry(name).cls.io_keys(**resolve_kwargs(name, config, **overrides))


def model_inputs(name: str, config: str = "paper", **overrides: Any) -> tuple[str, ...]:
    """Batch keys the forward pass reads; what the data layer must load for inference."""
    return model_io(name, config, **overrides)[0]


def model_targets(name: str, config: str = "paper", **overrides: Any) -> tuple[str, ...]:
    """Batch keys only the loss reads (label, and AU/flow/landmark targets); needed for training only."""
    return model_io(name, config, **overrides)[1]
