"""One small registry mechanism for every axis the platform extends (models, datasets, protocols, splits, class sets,
batch keys, trackers, stages).

A registry maps a name to a typed entry record that carries what the entry's consumers need (timm's `default_cfgs` /
`PretrainedCfg` next to `@register_model`: metadata lives on the entry, so no consumer branches on a name). Every
registry behaves alike:

* names keep registration order, which is their display order;
* a duplicate name is an error naming both places (file:line of the first and of the second registration); the
  same place registering again (a module reloaded) replaces the entry;
* an unknown name is a `ConfigError` naming the setting that holds it and the known names.

Every registry created is listed by `all_registries()`, so one test covers every axis without a hand list.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from mer.model.errors import ConfigError

E = TypeVar("E")


class DuplicateNameError(ValueError):
    """A name registered twice in one registry from two places; the message names both."""


@dataclass(frozen=True)
class _Slot(Generic[E]):
    entry: E
    where: str


class Registry(Generic[E]):
    """Name -> entry of one axis.

    `axis` is what an entry is ("model", "dataset"), used in messages; `setting` is the params key that selects an
    entry (`model.name`), named by the `ConfigError` of an unknown name. `where_to_add` is the file (relative to the
    repository root) in which a new entry is written, shown in docs/architecture.md's "where to add X" table.
    """

    _ALL: list[Registry] = []

    def __init__(self, axis: str, setting: str, where_to_add: str) -> None:
        self.axis = axis
        self.setting = setting
        self.where_to_add = where_to_add
        self._slots: dict[str, _Slot[E]] = {}
        Registry._ALL.append(self)

    def add(self, name: str, entry: E, *, stacklevel: int = 1) -> E:
        """Register `entry` under `name`; `stacklevel` = frames between the registering code and this call (1: the
        caller of `add`; a decorator built on `add` passes 2). Returns the entry."""
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.axis}: a registered name must be a non-empty string, not {name!r}")
        frame = sys._getframe(stacklevel)
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        old = self._slots.get(name)
        if old is not None and old.where != where:
            raise DuplicateNameError(f"{self.axis} {name!r} registered twice: at {old.where} and at {where}")
        self._slots[name] = _Slot(entry, where)
        return entry

    def decorator(self, name: str, make: Callable[[E], E] | None = None) -> Callable[[E], E]:
        """`@registry.decorator(name)`: register the decorated object (or `make(obj)`, an entry built from it) and
        return the object unchanged."""

        def wrap(obj):
            self.add(name, make(obj) if make else obj, stacklevel=2)
            return obj

        return wrap

    def get(self, name: str) -> E:
        """The entry of `name`; ConfigError naming the setting and the known names when there is none."""
        slot = self._slots.get(name)
        if slot is None:
            raise ConfigError(f"{self.setting}: unknown {self.axis} {name!r} (known: {', '.join(self._slots)})")
        return slot.entry

    __getitem__ = get

    def remove(self, name: str) -> E:
        """Unregister `name` and return its entry (a test's temporary entry); ConfigError when unknown."""
        entry = self.get(name)
        del self._slots[name]
        return entry

    def where(self, name: str) -> str:
        """file:line that registered `name`."""
        self.get(name)
        return self._slots[name].where

    def names(self) -> list[str]:
        """Registered names in registration (display) order."""
        return list(self._slots)

    def entries(self) -> list[E]:
        return [slot.entry for slot in self._slots.values()]

    def items(self) -> list[tuple[str, E]]:
        return [(name, slot.entry) for name, slot in self._slots.items()]

    def rank(self, name: str) -> int:
        """Display position of `name`; after every registered name when unknown (a row of an old table)."""
        names = self.names()
        return names.index(name) if name in names else len(names)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._slots))

    def __len__(self) -> int:
        return len(self._slots)

    def __repr__(self) -> str:
        return f"Registry({self.axis!r}, {len(self)} entries)"


def all_registries() -> list[Registry]:
    """Every registry created so far (import the modules that define them first)."""
    return list(Registry._ALL)
