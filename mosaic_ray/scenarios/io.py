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
0-based) or line (JSONL, 1-based), and the field. Files must be UTF-8; values nest at most `MAX_DEPTH` deep,
numbers are finite and integers fit in 64 bits. A path may be `s3://bucket/key` (read through `RunStorage`'s S3
filesystem, credentials from the standard AWS chain).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mosaic_ray.envs import DOMAINS, TOOLS, validate_world
from mosaic_ray.errors import UserError
from mosaic_ray.scenarios.tasks import SPLITS, Task
from mosaic_ray.types import CATEGORIES, REFUSE_TOOL

SCHEMA_VERSION = 1
_STRINGS = ("task_id", "category", "domain", "template_id", "split", "prompt")
MAX_DEPTH = 32
"""Deepest nesting a record may have (built-in worlds use 5); deeper JSON is refused with its field named."""
_INT_BOUND = 2**63


class TaskFileError(UserError):
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


class _RefusedNumber(str):
    """A JSON number the reader refuses (NaN, ±Infinity, an integer beyond 64 bits), kept as its text so that
    validation can name its field."""


def _parse_int(text: str) -> int | _RefusedNumber:
    if len(text.lstrip("-")) > 19:  # never convert a huge digit string (Python caps int() at 4300 digits)
        return _RefusedNumber(text)
    value = int(text)
    return value if -_INT_BOUND <= value < _INT_BOUND else _RefusedNumber(text)


def _loads(text: str) -> Any:
    """`json.loads` that keeps NaN, ±Infinity and out-of-range integers as `_RefusedNumber`; a document nested
    past the parser's recursion limit raises ValueError."""
    try:
        return json.loads(text, parse_int=_parse_int, parse_constant=_RefusedNumber)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _check_values(record: dict[str, Any]) -> None:
    """Every value of a record is storable: nesting <= MAX_DEPTH, numbers finite and within 64 bits, strings
    valid Unicode. ValueError names the first bad field (`world.bank.balance`, `grading.required[0]`)."""
    stack: list[tuple[Any, str, int]] = [(v, k, 1) for k, v in record.items()]
    while stack:
        value, where, depth = stack.pop()
        shown = where if len(where) <= 80 else where[:80] + "..."
        if depth > MAX_DEPTH:
            raise ValueError(f"field {shown!r}: nested deeper than {MAX_DEPTH} levels")
        if type(value) is _RefusedNumber:
            what = f"a {len(value.lstrip('-'))}-digit integer" if value.lstrip("-").isdigit() else value
            raise ValueError(f"field {shown!r}: {what} is not allowed (numbers must be finite, integers within "
                             f"64 bits)")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"field {shown!r}: not valid Unicode (a lone surrogate)") from None
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"field {shown!r}: {value!r} is not allowed (numbers must be finite)")
        elif isinstance(value, int) and not isinstance(value, bool) and not -_INT_BOUND <= value < _INT_BOUND:
            raise ValueError(f"field {shown!r}: integer outside 64 bits")
        elif isinstance(value, dict):
            stack.extend((v, f"{where}.{k}", depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))


def task_from_dict(d: Any) -> Task:
    """Validate one record (JSONL shape: `world`/`grading` objects) → `Task`; ValueError / TypeError names the field."""
    if not isinstance(d, dict):
        raise TypeError(f"expected an object, got {type(d).__name__}")
    _check_values(d)
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
    validate_world(d["world"], tools)  # the layout the tools read: a bad world fails here, not mid-rollout
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


def _read_bytes(path: str) -> bytes:
    """The file's bytes: a local path, or `s3://bucket/key` through the run storage's S3 filesystem."""
    if path.startswith("s3://"):
        from mosaic_ray.storage import RunStorage

        folder, _, name = path.rpartition("/")
        try:
            return RunStorage(folder).get_bytes(name)
        except FileNotFoundError:
            raise TaskFileError(f"{path}: no such file") from None
        except (OSError, ValueError) as e:
            raise TaskFileError(f"{path}: cannot read ({e})") from None
    if not Path(path).is_file():
        raise TaskFileError(f"{path}: no such file")
    return Path(path).read_bytes()


def _parquet_rows(path: str, data: bytes) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise TaskFileError(f"{path}: not a readable Parquet file ({e})") from None
    out = []
    for i, r in enumerate(rows):
        for f in ("world", "grading"):
            raw = r.pop(f"{f}_json", None)
            if not isinstance(raw, str):
                raise TaskFileError(f"{path}: row {i}: field '{f}_json': missing or not a string")
            try:
                r[f] = _loads(raw)
            except ValueError as e:
                raise TaskFileError(f"{path}: row {i}: field '{f}_json': invalid JSON ({e})") from None
        out.append(r)
    return out


def _jsonl_records(path: str, data: bytes) -> list[tuple[int, Any]]:
    numbered = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskFileError(f"{path}: line {n}: not valid UTF-8 (byte {e.start} of the line)") from None
        if not line.strip():
            continue
        try:
            numbered.append((n, _loads(line)))
        except ValueError as e:
            raise TaskFileError(f"{path}: line {n}: invalid JSON ({e})") from None
    return numbered


def read_tasks(path: str | Path) -> list[Task]:
    """Read and validate a task file (a local path or `s3://bucket/key`); `TaskFileError` names the row/line and
    field of the first problem."""
    path = str(path)
    fmt = _fmt(path)
    data = _read_bytes(path)
    if fmt == "parquet":
        where = "row {}"
        numbered: list[tuple[int, Any]] = list(enumerate(_parquet_rows(path, data)))
    else:
        where = "line {}"
        numbered = _jsonl_records(path, data)
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
