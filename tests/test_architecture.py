"""The layering, checked on the source (AST), not on a drawing: mer_model <- components <- pipelines <- the CLI.

* no module imports a higher layer, and nothing imports the CLI module;
* no import cycle between project modules (imports inside functions count too: deferring one side of a cycle does
  not remove it);
* an import inside a function is allowed only for a heavy optional dependency (HEAVY), or for a project module that
  pulls one in at import time: deferring anything else only hides a dependency;
* the library imports no orchestration or tracking package, and MLflow is imported only by components/tracking.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder -> import name: the installed code has one import root, `mer` (setup.py).
PACKAGES = {"mer_model": "mer.model", "components": "mer.components", "pipelines": "mer.pipelines"}
CLI = "mer.pipelines.cli"
LAYERS = {"mer.model": 0, "mer.components": 1, "mer.pipelines": 2}
# Third-party packages slow or heavy enough to import on first use only (each takes seconds on the CI machine).
HEAVY = {"torch", "torchvision", "ray", "mlflow", "kfp", "dlib", "cv2", "timm", "sklearn", "matplotlib", "boto3",
         "pyarrow", "optuna", "tqdm", "openpyxl", "skimage", "face_recognition_models", "scipy", "pandas"}
NOT_IN_LIBRARY = {"ray", "mlflow", "dvc", "kfp", "mer.components", "mer.pipelines"}


@dataclass
class Module:
    name: str
    path: Path
    top: set[str] = field(default_factory=set)  # imported at module level (project modules and third-party roots)
    deferred: dict[str, int] = field(default_factory=dict)  # imported inside a function -> line


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(name: str) -> str | None:
    """The project package (`mer.model`, `mer.components`, `mer.pipelines`) a dotted module name lies in, if any."""
    return next((p for p in PACKAGES.values() if name == p or name.startswith(p + ".")), None)


def _targets(node: ast.Import | ast.ImportFrom, modules: set[str], package: str) -> list[str]:
    """Project modules (or third-party roots) an import statement names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        root = name.split(".")[0]
        if _package(name):
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            out.append(name)
        else:
            out.append(root)
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def scan() -> dict[str, Module]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {_module_name(p): Module(_module_name(p), p) for p in files}
    names = set(modules)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), str(module.path))
        package = module.name if module.path.name == "__init__.py" else module.name.rsplit(".", 1)[0]

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(child, names, package):
                        if in_function:
                            module.deferred.setdefault(target, child.lineno)
                        else:
                            module.top.add(target)
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, nested)

        visit(tree, False)
    return modules


MODULES = scan()


def _layer(name: str) -> int:
    return 3 if name == CLI else LAYERS[_package(name)]


def _project(targets: set[str] | dict[str, int]) -> list[str]:
    return [t for t in targets if _package(t)]


def _with_packages(targets: list[str]) -> set[str]:
    """The modules an import runs: each target and its parent packages (importing `mer.model.data.aus` runs
    `mer_model/data/__init__.py`, which imports every loader and pandas)."""
    return {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 2)}


def heavy_modules() -> set[str]:
    """Project modules that import a HEAVY package at import time, directly or through other project modules (a
    module's parent packages included)."""
    heavy = {m.name for m in MODULES.values() if m.top & HEAVY}
    changed = True
    while changed:
        changed = False
        for m in MODULES.values():
            if m.name not in heavy and any(t in heavy for t in _with_packages(_project(m.top))):
                heavy.add(m.name)
                changed = True
    return heavy


def test_the_scan_sees_the_layers() -> None:
    """Guards the test itself: the walk finds modules of every layer and the edges between them."""
    assert {CLI, "mer.pipelines.engine.driver", "mer.components.evaluate", "mer.model.config"} <= set(MODULES)
    assert "mer.pipelines.stages" in MODULES[CLI].top
    assert "mer.components.evaluate" in MODULES["mer.pipelines.stages"].top
    assert "mer.model.training.results" in MODULES["mer.components.evaluate"].top
    assert "mer.pipelines.engine.driver" in MODULES["mer.pipelines.loso"].deferred
    assert "ray" in MODULES["mer.pipelines.engine.tasks"].top
    assert "mer.pipelines.engine.driver" in heavy_modules() and "mer.model.config" not in heavy_modules()


def test_no_upward_import_and_nothing_imports_the_cli() -> None:
    upward = [f"{m.name} -> {t}" for m in MODULES.values() for t in _project(m.top | set(m.deferred))
              if _layer(t) > _layer(m.name)]
    assert upward == []


def test_no_import_cycle() -> None:
    graph = {m.name: set(_project(m.top | set(m.deferred))) - {m.name} for m in MODULES.values()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert cycles == []


def test_function_level_imports_are_of_heavy_modules_only() -> None:
    heavy = heavy_modules()
    light = [f"{m.path.relative_to(REPO)}:{line} imports {t} inside a function"
             for m in MODULES.values() for t, line in sorted(m.deferred.items())
             if t not in HEAVY and t not in heavy]
    assert light == []


@pytest.mark.parametrize("package", ["mer.model"])
def test_the_library_imports_no_orchestration(package: str) -> None:
    found = [f"{m.name} -> {t}" for m in MODULES.values() if _package(m.name) == package
             for t in m.top | set(m.deferred) if (_package(t) or t.split(".")[0]) in NOT_IN_LIBRARY]
    assert found == []


def test_mlflow_is_imported_only_by_the_tracking_package() -> None:
    found = [m.name for m in MODULES.values() if "mlflow" in m.top | set(m.deferred)
             and not m.name.startswith("mer.components.tracking")]
    assert found == []


def test_every_stage_is_a_command_and_no_module_builds_its_own() -> None:
    """Each declared stage is reachable from `mer` (a step nobody can run is dead code), and subcommands come from
    the stage declarations only (pipelines/stages.py): no module adds a subparser of its own beside them."""
    from mer.pipelines.cli import build_parser
    from mer.pipelines.stages import STAGES

    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them there
    assert list(commands) == STAGES.names()
    own = [m.name for m in MODULES.values() if m.name != CLI and ".add_parser(" in m.path.read_text()]
    assert own == []


def test_deferred_imports_are_not_hidden_duplicates() -> None:
    """A module imported both at the top and inside a function of the same file: the inner one is dead weight."""
    twice = defaultdict(list)
    for m in MODULES.values():
        for t in set(m.deferred) & m.top:
            twice[m.name].append(t)
    assert dict(twice) == {}


def test_dependencies_are_declared_runtime_apart_from_test_and_all_pinned() -> None:
    """pyproject.toml declares what the platform needs to run and, as the `test` extra, what only the suite needs;
    requirements.lock, compiled from those declarations, pins every one of them."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    runtime, test = names(project["dependencies"]), names(project["optional-dependencies"]["test"])
    assert {"torch", "ray", "mlflow", "dvc", "kfp", "timm"} <= runtime
    assert {"pytest", "moto", "kubernetes-validate"} <= test and not runtime & test, runtime & test
    lock = (REPO / "requirements.lock").read_text()
    assert "uv pip compile pyproject.toml --extra test" in lock
    pinned = {line.split("==")[0].lower() for line in lock.splitlines() if "==" in line and not line.startswith(" ")}
    assert runtime | test <= pinned, (runtime | test) - pinned


def test_importing_the_configuration_loads_no_loader_and_no_pandas() -> None:
    """params.yaml's schema is imported by every command and worker: the dataset loaders and splits (pandas) load
    when a name is validated, not with the module; validating `tracking.backend` against the tracker registry
    imports no tracker's client (MLflow: seconds) until one is built."""
    import subprocess
    import sys

    code = ("import sys, mer.model.config; "
            "print(sorted(m for m in ('pandas', 'mer.model.data.loaders', 'mer.model.training.splits') "
            "if m in sys.modules)); "
            "from mer.components.settings import load_params; load_params('params.yaml'); "
            "print(sorted(m for m in ('mlflow', 'mer.components.tracking.mlflow_tracker') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert out.splitlines() == ["[]", "[]"], out


def test_the_installed_code_has_one_import_root() -> None:
    """Every project module is imported under `mer` (a bare `components` or `pipelines` would collide with any other
    package of that name, and would import only from the checkout's root), and the install maps each import name to
    its folder."""
    import importlib.util

    bare = [f"{m.name} -> {t}" for m in MODULES.values() for t in m.top | set(m.deferred) if t in PACKAGES]
    assert bare == []
    for folder, name in PACKAGES.items():
        spec = importlib.util.find_spec(name)
        assert spec is not None and Path(spec.origin).parent == REPO / folder, name
