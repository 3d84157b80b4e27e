"""dvc.yaml agrees with the stage declarations (pipelines/stages.py), and `dvc repro` re-runs a stage exactly when
something that shapes its outputs changed.

Each DVC stage is a declared stage, in the declared order: its cmd is `mer <name>`, its params are the entry's, its
data deps are the entry's inputs and its outs (with metrics and plots) the entry's outputs (compared as the paths
params.yaml gives them), and its code deps hold the module of the entry's function.

Every params.yaml key a stage's code reads must be among that stage's DVC params (or interpolated into its
deps/outs, e.g. `${tune.results}`). A key read but not declared is a silent no-op: changing `tracking.experiment`
left every stage "didn't change" and the new experiment was never created.

What a stage reads is found in its code deps (the .py files and packages under components/ and pipelines/ listed in
its `deps`): attribute chains `params.<section>[.<key>]` on the validated Params (mer.components.settings), and the sections
a `params.model_dump(include={...})` hashes into a key. (A whole-config dump that is only logged, or handed to a trial
that reads its own sections, is not counted.) The library (mer_model/) is given sections, never the whole Params."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

from mer.components.settings import Params, load_params
from mer.pipelines.stages import STAGES as DECLARED

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
CODE = ("components", "pipelines", "mer_model")
# Keys read in a code dep by code that no stage runs: `mer predict`'s model loading (load_for_inference falls back on
# params.preprocess for a model that records none) lives beside the tracker the tune and register stages use.
NOT_STAGE_CODE = {"components/tracking/pyfunc.py": {"preprocess"}}


def _code_files(stage: dict) -> list[Path]:
    files: list[Path] = []
    for dep in stage.get("deps", []):
        if "${" in dep or not dep.startswith(("components", "pipelines")):
            continue
        path = REPO / dep
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.suffix == ".py" else []
    return files


def _chain(node: ast.AST) -> list[str] | None:
    """`params.a.b` -> ["a", "b"]; None for chains not rooted at the name `params`."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return parts[::-1] if isinstance(node, ast.Name) and node.id == "params" else None


def keys_read(files: list[Path]) -> set[str]:
    """Dotted params keys read in `files`: a whole section (`tracking`) where the section object is used as such."""
    found: set[str] = set()
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # parts of a longer chain
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "model_dump":
                if _chain(node.func.value) == []:
                    include = next((k.value for k in node.keywords if k.arg == "include"), None)
                    if isinstance(include, (ast.Set, ast.List, ast.Tuple)):
                        found.update(e.value for e in include.elts if isinstance(e, ast.Constant))
            if not isinstance(node, ast.Attribute) or id(node) in inner:
                continue
            chain = _chain(node)
            if not chain or chain[0] not in Params.model_fields:
                continue
            section = Params.model_fields[chain[0]].annotation
            fields = getattr(section, "model_fields", {})
            key = ".".join(chain[:2]) if len(chain) > 1 and chain[1] in fields else chain[0]
            if key not in NOT_STAGE_CODE.get(path.relative_to(REPO).as_posix(), set()):
                found.add(key)
    return found


def covered(key: str, stage: dict) -> bool:
    declared = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
    interpolated = set(re.findall(r"\$\{([^}]+)\}", yaml.safe_dump({k: stage.get(k) for k in ("deps", "outs")})))
    return any(key == d or key.startswith(f"{d}.") for d in declared) or key in interpolated


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_declares_the_params_its_code_reads(name: str) -> None:
    stage = STAGES[name]
    read = keys_read(_code_files(stage))
    missing = sorted(k for k in read if not covered(k, stage))
    assert not missing, f"dvc.yaml stage {name} reads {missing} but does not list them under params"


def test_the_scan_sees_what_the_tracked_stages_read() -> None:
    """The scan itself finds the keys that decide where a stage logs (a scan that found nothing would pass above)."""
    assert {"tracking", "data.source", "tune"} <= keys_read(_code_files(STAGES["tune"]))
    assert "tracking" in keys_read(_code_files(STAGES["register"]))
    assert "tracking" in keys_read(_code_files(STAGES["evaluate"]))


def _declared_params(stage: dict) -> list[str]:
    return [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]


def _paths(items: list, raw: dict) -> list[str]:
    """dvc.yaml paths (an entry may be a mapping path -> options) with `${a.b}` filled in from params.yaml."""
    def value(match: re.Match) -> str:
        node = raw
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    return [re.sub(r"\$\{([^}]+)\}", value, item if isinstance(item, str) else next(iter(item))) for item in items]


def test_the_dvc_stages_are_the_declared_ones_in_order() -> None:
    assert list(STAGES) == [entry.dvc for entry in DECLARED.entries() if entry.dvc]


@pytest.mark.parametrize("entry", [e for e in DECLARED.entries() if e.dvc], ids=lambda e: e.dvc)
def test_each_dvc_stage_agrees_with_its_declaration(entry) -> None:
    stage, raw = STAGES[entry.dvc], yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    assert stage["cmd"] == f"mer {entry.name}"
    assert sorted(_declared_params(stage)) == sorted(entry.params)
    deps = _paths(stage.get("deps", []), raw)
    assert sorted(d for d in deps if not d.startswith(CODE)) == sorted(entry.input_paths(params))
    module = Path(sys.modules[entry.function.__module__].__file__).relative_to(REPO).as_posix()
    assert any(module == d or module.startswith(f"{d}/") for d in deps), f"{module} is not a dep of {entry.dvc}"
    written = _paths(stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []), raw)
    declared = entry.output_paths(params)
    assert written and declared
    assert [w for w in written if not any(w == o or w.startswith(f"{o}/") for o in declared)] == []
    assert [o for o in declared if not any(w == o or w.startswith(f"{o}/") for w in written)] == []
