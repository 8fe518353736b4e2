"""Scenario suites: harmful / benign / injection / privacy tasks over the sandboxed tool worlds.

`load_tasks(split, size=, seed=, domains=, categories=)` generates built-in tasks; `read_tasks` / `write_tasks`
import and export them (Parquet, JSONL; schema in `mosaic_ray.scenarios.io`); `grade` scores an episode.
"""

from mosaic_ray.scenarios.grader import Executed, Trace, grade, matches
from mosaic_ray.scenarios.io import SCHEMA_VERSION, TaskFileError, read_tasks, task_from_dict, write_tasks
from mosaic_ray.scenarios.phrasing import load_phrasing_tasks
from mosaic_ray.scenarios.tasks import (
           DEFAULT_SIZES,
           SPLITS,
           TEMPLATES,
           Task,
           Template,
           load_tasks,
           make_task,
           templates,
)

__all__ = [
           "DEFAULT_SIZES",
           "SCHEMA_VERSION",
           "SPLITS",
           "TEMPLATES",
           "Executed",
           "Task",
           "TaskFileError",
           "Template",
           "Trace",
           "grade",
           "load_phrasing_tasks",
           "load_tasks",
           "make_task",
           "matches",
           "read_tasks",
           "task_from_dict",
           "templates",
           "write_tasks",
]
