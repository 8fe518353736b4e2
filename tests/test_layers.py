"""[Architecture] The import layers of the installed packages, and no import cycles.

Every module of the packages pyproject.toml installs (`[tool.setuptools.package-dir]`: mosaic_ray/ as `mosaic_ray`,
actors/ as `mosaic_ray.actors`, learners/ as `mosaic_ray.learners`, benchmarks/ as `mosaic_ray.benchmarks`) is
parsed, and every `import` / `from ... import` of the project is read: at module level, inside functions and
methods, and under `if TYPE_CHECKING:`. The layers, bottom to top:

| layer | modules | may import |
|---|---|---|
| core | `mosaic_ray.*` but the driver and the CLI | core |
| actors, learners | `mosaic_ray.actors.*`, `mosaic_ray.learners.*` | core, actors, learners |
| driver | `mosaic_ray.driver.*`, `mosaic_ray.cli` | everything but benchmarks |
| benchmarks | `mosaic_ray.benchmarks.*` | everything |

Benchmarks are the top: outside benchmarks/ only scripts/ and tests/ import them. The driver reaches the external
suites' adapters by name only (`mosaic_ray.driver.evaluate.SUITE_MODULES`, imported when a suite is asked for),
as `mosaic_ray.cli` reaches its subcommand modules. A layer rule counts every import; the cycle check counts only
the imports a module runs when it is imported (module level, outside `if TYPE_CHECKING:`).
"""

from __future__ import annotations

import ast
import functools
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "mosaic_ray"

LAYERS = ("core", "actors", "learners", "driver", "benchmarks")
FORBIDDEN: dict[str, frozenset[str]] = {
    "core": frozenset({"actors", "learners", "driver", "benchmarks"}),
    "actors": frozenset({"driver", "benchmarks"}),
    "learners": frozenset({"driver", "benchmarks"}),
    "driver": frozenset({"benchmarks"}),
    "benchmarks": frozenset(),
}
"""Layer → the layers it must not import."""


@dataclass(frozen=True)
class Import:
    """One import of a project module: who imports what, where, and whether it runs when `source` is imported."""

    source: str
    target: str
    path: str
    line: int
    module_level: bool
    type_checking: bool

    @property
    def runs_on_import(self) -> bool:
        return self.module_level and not self.type_checking

    def where(self) -> str:
        scope = ("under TYPE_CHECKING" if self.type_checking else
                 "at module level" if self.module_level else "inside a function")
        return f"{self.path}:{self.line} ({scope})"


def layer(module: str) -> str:
    """The layer of a module of the installed packages."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("actors", "learners", "benchmarks"):
        return parts[1]
    if module == f"{PROJECT}.cli" or (len(parts) > 1 and parts[1] == "driver"):
        return "driver"
    return "core"


def package_dirs() -> dict[str, Path]:
    """Package → its source directory, as pyproject.toml installs them (a package without its own `package-dir`
    entry sits under its nearest parent's directory)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs: dict[str, str] = setuptools.get("package-dir", {})
    out = {}
    for pkg in setuptools["packages"]:
        parent = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len, default="")
        out[pkg] = ROOT.joinpath(dirs.get(parent, ""), *filter(None, pkg[len(parent):].split(".")))
    return out


@functools.cache
def source_modules() -> dict[str, Path]:
    """Every module of the installed packages → its file (a package's module is its `__init__.py`)."""
    out: dict[str, Path] = {}
    for pkg, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            out[name] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """The imports of one module, each with its scope."""

    def __init__(self, module: str, is_package: bool, path: str, known: set[str]) -> None:
        self.module, self.path, self.known = module, path, known
        self.package = module if is_package else module.rpartition(".")[0]
        self.functions = 0
        self.type_checking = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt) -> None:
        if target == PROJECT or target.startswith(PROJECT + "."):
            while target not in self.known and "." in target:  # `import mosaic_ray.x.y` of an attribute: its module
                target = target.rpartition(".")[0]
            if target != self.module:
                self.found.append(Import(self.module, target, self.path, node.lineno, self.functions == 0,
                                         self.type_checking > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        # `from pkg import submodule` imports the submodule, anything else is `pkg`'s
        targets = {sub if sub in self.known else origin: None for sub in (f"{origin}.{a.name}" for a in node.names)}
        for target in targets:
            self._add(target, node)

    def _function(self, node: ast.AST) -> None:
        self.functions += 1
        self.generic_visit(node)
        self.functions -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_checking += 1
        for stmt in node.body:
            self.visit(stmt)
        self.type_checking -= 1
        for stmt in node.orelse:
            self.visit(stmt)


def imports_of(source: str, module: str, path: str, known: set[str], *, is_package: bool = False) -> list[Import]:
    """The project imports in `source`, the text of `module` (at `path`)."""
    collector = _Collector(module, is_package, path, known)
    collector.visit(ast.parse(source, filename=path))
    return collector.found


@functools.cache
def all_imports() -> tuple[Import, ...]:
    modules = source_modules()
    known = set(modules)
    out: list[Import] = []
    for module, path in modules.items():
        out += imports_of(path.read_text(encoding="utf-8"), module, str(path.relative_to(ROOT)), known,
                          is_package=path.stem == "__init__")
    return tuple(out)


def layer_violations(imports: Iterable[Import]) -> list[str]:
    """One line per import that crosses the layers the wrong way, naming file and line."""
    return [f"{i.where()}: {i.source} ({layer(i.source)}) imports {i.target} ({layer(i.target)}); "
            f"{layer(i.source)} must not import {', '.join(sorted(FORBIDDEN[layer(i.source)]))}"
            for i in imports if layer(i.target) in FORBIDDEN[layer(i.source)]]


def import_cycles(imports: Iterable[Import]) -> list[str]:
    """One line per cycle among the imports that run on import (a strongly connected component, shown as one
    closed path through it with the file:line of every step)."""
    edges: dict[str, dict[str, Import]] = {}
    for i in imports:
        if i.runs_on_import:
            edges.setdefault(i.source, {}).setdefault(i.target, i)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_describe_cycle(component, edges) for component in components]


def _describe_cycle(component: list[str], edges: dict[str, dict[str, Import]]) -> str:
    """A closed path through `component`, from its first module back to it (breadth-first: a shortest one)."""
    members, start = set(component), component[0]
    back: dict[str, Import] = {}
    frontier = [start]
    while frontier and start not in back:
        nxt = []
        for v in frontier:
            for w, imp in edges.get(v, {}).items():
                if w in members and w not in back:
                    back[w] = imp
                    nxt.append(w)
        frontier = nxt
    steps, v = [], start
    while True:
        steps.append(back[v])
        v = back[v].source
        if v == start:
            break
    return "import cycle: " + " -> ".join(
        f"{imp.source} [{imp.path}:{imp.line}]" for imp in reversed(steps)) + f" -> {start}"


# ------------------------------------------------------------------------------------------------ the tree


def test_every_installed_module_is_read():
    modules = source_modules()
    assert {"mosaic_ray", "mosaic_ray.cli", "mosaic_ray.driver.train", "mosaic_ray.actors.engines.router",
            "mosaic_ray.learners.group", "mosaic_ray.benchmarks.harness"} <= set(modules)
    for module, path in modules.items():
        assert path.is_file(), f"{module}: {path} missing"
    assert {layer(m) for m in modules} == set(LAYERS)
    assert any(not i.module_level for i in all_imports()) and any(i.type_checking for i in all_imports())


def test_layers_are_respected():
    bad = layer_violations(all_imports())
    assert not bad, "imports across the layers (see this module's docstring):\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = import_cycles(all_imports())
    assert not cycles, "\n".join(cycles)


# ------------------------------------------------------------------------------------------------ the checks


KNOWN = {"mosaic_ray", "mosaic_ray.evaluation", "mosaic_ray.config", "mosaic_ray.benchmarks",
         "mosaic_ray.benchmarks.harness", "mosaic_ray.actors", "mosaic_ray.actors.engines",
         "mosaic_ray.actors.engines.base", "mosaic_ray.driver", "mosaic_ray.driver.cli", "mosaic_ray.learners",
         "mosaic_ray.learners.group"}


def test_a_bad_import_inside_a_function_is_named_with_file_and_line():
    source = ("from mosaic_ray.config import load_config\n"
              "\n"
              "def run():\n"
              "    from mosaic_ray.benchmarks.harness import EngineAgent\n"
              "    return EngineAgent\n")
    bad = layer_violations(imports_of(source, "mosaic_ray.evaluation", "mosaic_ray/evaluation.py", KNOWN))
    expected = ("mosaic_ray/evaluation.py:4 (inside a function): mosaic_ray.evaluation (core) imports "
                "mosaic_ray.benchmarks.harness (benchmarks); core must not import actors, benchmarks, driver, learners")
    assert bad == [expected]


def test_relative_and_type_checking_imports_count_for_the_layers():
    source = ("from typing import TYPE_CHECKING\n"
              "from . import base\n"
              "if TYPE_CHECKING:\n"
              "    from mosaic_ray.driver.cli import init_ray\n")
    found = imports_of(source, "mosaic_ray.actors.engines", "actors/engines/__init__.py", KNOWN, is_package=True)
    assert [(i.target, i.module_level, i.type_checking) for i in found] == [
        ("mosaic_ray.actors.engines.base", True, False), ("mosaic_ray.driver.cli", True, True)]
    assert [line.split(":")[1] for line in layer_violations(found)] == ["4 (under TYPE_CHECKING)"]
    assert layer("mosaic_ray.cli") == layer("mosaic_ray.driver.cli") == "driver"


def test_a_module_level_cycle_is_reported_and_a_function_level_one_is_not():
    a = imports_of("import mosaic_ray.config\n", "mosaic_ray.evaluation", "mosaic_ray/evaluation.py", KNOWN)
    b = imports_of("from mosaic_ray import evaluation\n", "mosaic_ray.config", "mosaic_ray/config.py", KNOWN)
    expected = ("import cycle: mosaic_ray.config [mosaic_ray/config.py:1] -> "
                "mosaic_ray.evaluation [mosaic_ray/evaluation.py:1] -> mosaic_ray.config")
    assert import_cycles(a + b) == [expected]
    lazy = imports_of("def f():\n    from mosaic_ray import evaluation\n", "mosaic_ray.config",
                      "mosaic_ray/config.py", KNOWN)
    assert import_cycles(a + lazy) == []
