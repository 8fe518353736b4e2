"""Evaluation results on disk: one JSON line per finished case, and a summary written only when all are in.

`CaseStore(out, meta)` keeps `<out>.cases.jsonl` (a header line with `meta`, then one record per case, flushed as
each case finishes) and writes the summary `<out>` atomically (temp file + rename) with `"complete": true` once
every case is in. A rerun with the same `out` and `meta` skips the finished cases; a case cut short by a crash runs
again; a run that fails leaves no summary behind (an old one is removed when the run starts). `progress` is the
progress bar the evaluation commands share.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["CaseStore", "progress"]


class CaseStore:
    """Per-case JSONL + atomic final JSON (see the module docstring). `out=None` keeps everything in memory.

    The first JSONL line is a header with `meta` (suite, policy, split, judge...): a rerun must match it, so
    cases of another policy never mix into a report. A last line cut short by a crash is dropped.
    """

    def __init__(self, out: str | Path | None, meta: dict[str, Any]):
        self.meta = json.loads(json.dumps(meta, default=str))
        self.records: dict[str, dict[str, Any]] = {}
        self.out = None if out is None else Path(out)
        self.cases_path = None if self.out is None else self.out.with_name(self.out.name + ".cases.jsonl")
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.unlink(missing_ok=True)  # a summary from before must not stand for this run until it completes
        lines = self.cases_path.read_text(encoding="utf-8").splitlines() if self.cases_path.exists() else []
        if lines:
            header = json.loads(lines[0])
            if header.get("meta") != self.meta:
                raise ValueError(f"{self.cases_path}: holds cases of another run ({header.get('meta')}); delete it "
                                 f"or choose another --out")
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # the case being written when the last run stopped: it runs again
                self.records[rec["case_id"]] = rec
        self._fh = self.cases_path.open("w", encoding="utf-8")  # rewritten: drops a cut-short last line
        self._write({"meta": self.meta})
        for rec in self.records.values():
            self._write(rec)

    def _write(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
        self._fh.flush()

    def done(self, case_id: str) -> bool:
        return case_id in self.records

    def add(self, record: dict[str, Any]) -> None:
        self.records[record["case_id"]] = record
        if self.out is not None:
            self._write(record)

    def finish(self, report: dict[str, Any]) -> dict[str, Any]:
        """Mark `report` complete and write it atomically to `out` (with the cases file's path)."""
        report = {**report, "complete": True}
        if self.out is not None:
            self._fh.close()
            report["cases_file"] = str(self.cases_path)
            tmp = self.out.with_name(f".{self.out.name}.tmp")
            tmp.write_text(json.dumps(report, indent=2, default=str))
            os.replace(tmp, self.out)
        return report

    def close(self) -> None:
        if self.out is not None and not self._fh.closed:
            self._fh.close()


@contextmanager
def progress(total: int, desc: str) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr; yields `advance()`. Silent when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(desc, total=total)
        yield lambda: bar.advance(task)
