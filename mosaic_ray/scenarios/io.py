"""Import / export tasks as Parquet or JSONL ("bring your own scenarios").

Schema (version 1). One row / line per task:

| field | Parquet type | JSONL type | meaning |
|---|---|---|---|
| `schema_version` | int32 | int | 1 |
| `task_id` | string | string | unique within the file |
| `category` | string | string | harmful, benign, injection or privacy |
| `domain` | string | string | email, files, bank, web, calendar, social or sysadmin |
| `template_id` | string | string | template that generated it (free text for hand-written tasks) |
| `split` | string | string | train or test |
| `prompt` | string | string | the user's request, non-empty |
| `world_json` / `world` | string (JSON) | object | initial world state (layout in `mosaic_ray.envs.domains`) |
| `tools` | list<string> | list of strings | tool names shown to the agent: registered tools and/or `refuse` |
| `grading_json` / `grading` | string (JSON) | object | grading spec (`mosaic_ray.scenarios.grader`): `required`, `harmful`, `attack`: lists of `{"tool", "args"?, "contains"?, "not"?, "not_contains"?}`; `sensitive`: list of strings; `injection_marker`: optional string; `oracle`, `naive`: lists of `{"tool", "args"}` |

Parquet stores the two nested objects as JSON strings (`world_json`, `grading_json`) because worlds differ in
shape per domain; JSONL stores them as objects (`world`, `grading`). The format follows the file suffix
(`.parquet`, `.jsonl`). Reading validates every row and raises `TaskFileError` naming the file, the row (Parquet,
0-based) or line (JSONL, 1-based), and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mosaic_ray.envs import DOMAINS, TOOLS
from mosaic_ray.scenarios.tasks import SPLITS, Task
from mosaic_ray.types import CATEGORIES, REFUSE_TOOL

SCHEMA_VERSION = 1
_STRINGS = ("task_id", "category", "domain", "template_id", "split", "prompt")


class TaskFileError(ValueError):
    """A task file is unreadable or a row is invalid; the message names file, row/line and field."""


def _fmt(path: str | Path) -> str:
    suffix = Path(str(path)).suffix.lower()
    if suffix not in (".parquet", ".jsonl"):
        raise TaskFileError(f"{path}: unknown task file type {suffix!r} (use .parquet or .jsonl)")
    return suffix[1:]


def _check_patterns(value: Any, field: str, *, calls: bool) -> None:
    if not isinstance(value, list):
        raise TypeError(f"field 'grading.{field}': expected a list, got {type(value).__name__}")
    for i, p in enumerate(value):
        where = f"field 'grading.{field}[{i}]'"
        if not isinstance(p, dict) or not isinstance(p.get("tool"), str):
            raise TypeError(f"{where}: expected an object with a string 'tool'")
        if p["tool"] not in TOOLS:
            raise ValueError(f"{where}: unknown tool {p['tool']!r}")
        keys = ("args",) if calls else ("args", "contains", "not", "not_contains")
        for k in keys:
            if k in p and not isinstance(p[k], dict):
                raise TypeError(f"{where}.{k}: expected an object")


def task_from_dict(d: Any) -> Task:
    """Validate one record (JSONL shape: `world`/`grading` objects) → `Task`; ValueError / TypeError names the field."""
    if not isinstance(d, dict):
        raise TypeError(f"expected an object, got {type(d).__name__}")
    version = d.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ValueError(f"field 'schema_version': expected {SCHEMA_VERSION}, got {version!r}")
    for f in _STRINGS:
        if not isinstance(d.get(f), str) or not d[f].strip():
            raise ValueError(f"field {f!r}: expected a non-empty string, got {d.get(f)!r:.80}")
    checks = (("category", CATEGORIES), ("domain", tuple(DOMAINS)), ("split", SPLITS))
    for f, allowed in checks:
        if d[f] not in allowed:
            raise ValueError(f"field {f!r}: {d[f]!r} is not one of {', '.join(allowed)}")
    if not isinstance(d.get("world"), dict):
        raise TypeError(f"field 'world': expected an object, got {type(d.get('world')).__name__}")
    tools = d.get("tools")
    if not isinstance(tools, list) or not tools or not all(isinstance(t, str) for t in tools):
        raise ValueError("field 'tools': expected a non-empty list of strings")
    unknown = [t for t in tools if t not in TOOLS and t != REFUSE_TOOL]
    if unknown:
        raise ValueError(f"field 'tools': unknown tool {unknown[0]!r}")
    grading = d.get("grading")
    if not isinstance(grading, dict):
        raise TypeError(f"field 'grading': expected an object, got {type(grading).__name__}")
    for f in ("required", "harmful", "attack"):
        _check_patterns(grading.get(f, []), f, calls=False)
    for f in ("oracle", "naive"):
        _check_patterns(grading.get(f, []), f, calls=True)
    marker = grading.get("injection_marker")
    if marker is not None and (not isinstance(marker, str) or not marker.strip()):
        raise ValueError(f"field 'grading.injection_marker': expected a non-empty string, got {marker!r:.80}")
    sens = grading.get("sensitive", [])
    if not isinstance(sens, list) or not all(isinstance(s, str) and s for s in sens):
        raise ValueError("field 'grading.sensitive': expected a list of non-empty strings")
    return Task(task_id=d["task_id"], category=d["category"], domain=d["domain"], template_id=d["template_id"],
                split=d["split"], prompt=d["prompt"], world=d["world"], tools=tuple(tools), grading=grading)


def _record(t: Task) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, **t.to_dict()}


def write_tasks(tasks: list[Task], path: str | Path) -> Path:
    """Write tasks to `path` (.parquet or .jsonl); returns the path."""
    fmt, path = _fmt(path), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with path.open("w", encoding="utf-8") as fh:
            for t in tasks:
                fh.write(json.dumps(_record(t), ensure_ascii=False) + "\n")
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_record(t) for t in tasks]
    table = pa.table({
        "schema_version": pa.array([r["schema_version"] for r in rows], pa.int32()),
        **{f: pa.array([r[f] for r in rows], pa.string()) for f in _STRINGS},
        "world_json": pa.array([json.dumps(r["world"], ensure_ascii=False) for r in rows], pa.string()),
        "tools": pa.array([r["tools"] for r in rows], pa.list_(pa.string())),
        "grading_json": pa.array([json.dumps(r["grading"], ensure_ascii=False) for r in rows], pa.string()),
    })
    pq.write_table(table, path)
    return path


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise TaskFileError(f"{path}: not a readable Parquet file ({e})") from None
    out = []
    for i, r in enumerate(rows):
        for f in ("world", "grading"):
            raw = r.pop(f"{f}_json", None)
            if not isinstance(raw, str):
                raise TaskFileError(f"{path}: row {i}: field '{f}_json': missing or not a string")
            try:
                r[f] = json.loads(raw)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{path}: row {i}: field '{f}_json': invalid JSON ({e})") from None
        out.append(r)
    return out


def read_tasks(path: str | Path) -> list[Task]:
    """Read and validate a task file; `TaskFileError` names the row/line and field of the first problem."""
    fmt, path = _fmt(path), Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such file")
    where = "row {}"
    if fmt == "parquet":
        records: list[Any] = _parquet_rows(path)
        numbered = list(enumerate(records))
    else:
        where = "line {}"
        numbered = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{path}: line {n}: invalid JSON ({e})") from None
    tasks, seen = [], set()
    for n, rec in numbered:
        try:
            task = task_from_dict(rec)
        except (ValueError, TypeError) as e:
            raise TaskFileError(f"{path}: {where.format(n)}: {e}") from None
        if task.task_id in seen:
            raise TaskFileError(f"{path}: {where.format(n)}: field 'task_id': duplicate {task.task_id!r}")
        seen.add(task.task_id)
        tasks.append(task)
    return tasks
