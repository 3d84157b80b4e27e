"""The one registry mechanism (mer.model.registry) every axis is built on: order, duplicates, unknown names."""

from __future__ import annotations

import pytest

from mer.model.errors import ConfigError
from mer.model.registry import DuplicateNameError, Registry, all_registries


def _register_from_another_line(registry: Registry, name: str) -> None:
    registry.add(name, "second")


def test_a_registry_keeps_order_refuses_a_duplicate_naming_both_places_and_names_the_setting() -> None:
    registry: Registry[str] = Registry("widget", "demo.widget", "tests/test_registry.py")
    try:
        registry.add("b", "first")
        registry.add("a", "other")
        assert registry.names() == ["b", "a"] and registry.rank("a") == 1 and registry.rank("old") == 2
        with pytest.raises(DuplicateNameError) as err:
            _register_from_another_line(registry, "b")
        message = str(err.value)
        assert message.count("test_registry.py:") == 2 and "widget 'b' registered twice" in message
        assert registry.get("b") == "first"
        with pytest.raises(ConfigError, match=r"demo.widget: unknown widget 'c' \(known: b, a\)"):
            registry.get("c")
        for _ in range(2):  # the same place registering again (a reloaded module) replaces its entry
            registry.add("c", "again")
        assert registry["c"] == "again" and registry in all_registries()
    finally:
        Registry._ALL.remove(registry)


def test_the_decorator_registers_what_it_builds_and_returns_the_object() -> None:
    registry: Registry[tuple[str, int]] = Registry("thing", "demo.thing", "tests/test_registry.py")
    try:
        @registry.decorator("seven", make=lambda fn: (fn.__name__, fn()))
        def seven() -> int:
            return 7

        assert seven() == 7 and registry.get("seven") == ("seven", 7)
        assert registry.where("seven").startswith(__file__)
    finally:
        Registry._ALL.remove(registry)
