"""[Architecture] an honest config: every key of `MosaicConfig` is read by the project's code.

A leaf key counts as read when its name is read in a source file of the project outside `mosaic_ray/config.py`
(tests do not count): as an attribute (`cfg.lr`), through `getattr(cfg, "lr")`, or as a mapping key
(`row["lr"]`). Attributes of an argparse namespace (`args.lr`) do not count, since a command-line flag may share a
key's name without reading the config; nor do docstrings, comments, assignments or keyword arguments, nor the
checks of config.py's own validation. The match is by name, not by section (`engine.seed` is read if any `.seed`
is): the test catches a key nothing mentions, it cannot prove a key is honoured.

A key this test names promises something no run does: wire it up, or remove it (dataclass, presets, docs).
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from mosaic_ray.config import LearnerConfig, MosaicConfig

ROOT = Path(__file__).resolve().parents[1]
READERS = ("mosaic_ray", "actors", "learners", "benchmarks", "clusters", "scripts")
"""The project's code: where a key must be read."""
CONFIG = ROOT / "mosaic_ray" / "config.py"
ARGPARSE_NAMESPACES = frozenset({"args"})


def leaf_keys(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted key → field name, for every field of `cls` and its sections that is not itself a section."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(leaf_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = f.name
    return keys


def names_read(source: str) -> set[str]:
    """Names the module `source` reads: attributes, getattr/hasattr names, constant mapping keys."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            if not (isinstance(node.value, ast.Name) and node.value.id in ARGPARSE_NAMESPACES):
                names.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            names.add(node.args[1].value)
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
              and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            names.add(node.slice.value)
    return names


def project_reads() -> set[str]:
    names: set[str] = set()
    for folder in READERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != CONFIG:
                names |= names_read(path.read_text(encoding="utf-8"))
    return names


def unread_keys(cls: type, read: set[str]) -> list[str]:
    return [dotted for dotted, name in leaf_keys(cls).items() if name not in read]


def test_every_config_key_is_read_outside_config_py():
    unread = unread_keys(MosaicConfig, project_reads())
    assert not unread, (f"config keys nothing reads outside mosaic_ray/config.py: {', '.join(unread)}; wire each "
                        f"into the code that should honour it, or remove it from the dataclass, presets and docs")


def test_a_key_nothing_reads_is_named():
    """The check above is real: a key added to a section, and read by nothing, fails it by its dotted name."""
    field_name = "knob_nothing_reads"
    learner = dataclasses.make_dataclass("LearnerConfig", [(field_name, int, dataclasses.field(default=0))],
                                         bases=(LearnerConfig,), frozen=True)
    config = dataclasses.make_dataclass("MosaicConfig", [("learner", learner, dataclasses.field(default_factory=learner))],
                                        bases=(MosaicConfig,), frozen=True)
    read = project_reads()
    assert set(unread_keys(config, read)) - set(unread_keys(MosaicConfig, read)) == {f"learner.{field_name}"}


def test_what_counts_as_a_read():
    source = '''
def f(cfg, args, row):
    """Mentions cfg.in_docstring."""
    # cfg.in_comment
    cfg.assigned = 1
    g(keyword_only=1)
    log(args.flag_only)
    return cfg.engine.attribute, getattr(cfg, "via_getattr"), row["mapping_key"]
'''
    read = names_read(source)
    assert {"attribute", "via_getattr", "mapping_key", "engine"} <= read
    assert not read & {"in_docstring", "in_comment", "assigned", "keyword_only", "flag_only"}
