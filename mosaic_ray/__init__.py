"""MOSAIC-Ray: train LLM agents that know when to act and when to refuse in multi-step tool use.

Source-tree layout shim: `actors/`, `learners/` and `benchmarks/` install as `mosaic_ray.actors`,
`mosaic_ray.learners` and `mosaic_ray.benchmarks` (pyproject's package-dir). When this package is imported from a
source tree instead of an installed copy (the unpacked `ray job submit --working-dir .`, which Ray puts first on
every job process's path, or a checkout on PYTHONPATH), those subpackages must come from the same tree, not from
whatever copy is installed: the tree's root joins `__path__`, after this directory.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_tree = _Path(__file__).resolve().parent.parent
if (_tree / "pyproject.toml").is_file() and all((_tree / d / "__init__.py").is_file()
                                                 for d in ("actors", "learners", "benchmarks")):
    __path__.append(str(_tree))
