"""Held-out phrasing set: hand-written requests whose intent is stated in words no template or cue pool uses.

Built-in tasks carry their intent in a `{why}` cue from small shared pools (`frames.PURPOSE_BAD`: "to blackmail
Kim", "without Kim knowing"), so a model can score well by keying its refusals on those words. This set tests
whether refusal follows the intent instead:

- **harmful**: the harm in new words ("so Kim never learns her pension went into my pocket");
- **benign**: a legitimate request in words that sound alarming ("to kill off this debt", "nuke that old draft").

`phrasing.json` is a list of entries, one per wording: `frame` (the ID of a frame of a training domain),
`category` (harmful | benign), `wording` (a full sentence in new words with the slots of the frame's wordings and
one `{why}`) and `why` (the intent; for frames whose `{why}` is a message, the text the calls send). Both may use
the frame's slots (`Built.slots`, plus `{victim}`: a name other than the task's). An entry becomes the template
`phrasing/{category}/{frame}/{k}` (k counts that frame's entries of that category, in file order) over a copy of
the frame whose cue pool is the entry's `why` alone, so `tasks.make_task` builds world, calls and grading exactly
as for a built-in task. Calendar and social are held-out domains (the `domains` split) and have no entries.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
from collections import Counter
from importlib import resources
from typing import Any

from mosaic_ray.envs import DOMAINS
from mosaic_ray.scenarios.frames import FRAMES, Frame
from mosaic_ray.scenarios.tasks import HELDOUT_DOMAINS, Task, Template, make_task

PHRASING_FILE = "phrasing.json"
SPLIT = "phrasing"
DOMAINS_COVERED = tuple(d for d in DOMAINS if d not in HELDOUT_DOMAINS)
"""The training domains; the held-out domains are measured by the `domains` split instead."""
CATEGORIES = ("harmful", "benign")
_KEYS = ("frame", "category", "wording", "why")
_FRAMES = {f.id: f for f in FRAMES}


def _fields(text: str, where: str) -> list[str]:
    """The `{name}` fields of a format string (`{}` and `{0}` come back as "" and "0": unknown slots)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as e:
        raise ValueError(f"{where}: malformed format string {text!r} ({e})") from None


def _slots(frame: Frame) -> set[str]:
    """Slots a frame's task fills: its `Built.slots` (the same names for every build) and `victim`."""
    return set(frame.build(random.Random(0)).slots) | {"victim"}


def _parse(raw: Any, i: int) -> tuple[Frame, str, str, str]:
    """(frame, category, wording, why) of entry `i`; a malformed entry raises ValueError (TypeError if it is not
    an object) naming the entry and what is wrong."""
    where = f"{PHRASING_FILE} entry {i}"
    if not isinstance(raw, dict):
        raise TypeError(f"{where}: expected an object with keys {', '.join(_KEYS)}, got {type(raw).__name__}")
    if isinstance(raw.get("frame"), str):
        where += f" ({raw['frame']} {raw.get('category', '?')})"
    missing = [k for k in _KEYS if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing {missing[0]!r}")
    extra = sorted(set(raw) - set(_KEYS))
    if extra:
        raise ValueError(f"{where}: unknown key {extra[0]!r} (keys: {', '.join(_KEYS)})")
    bad = [k for k in _KEYS if not isinstance(raw[k], str) or not raw[k].strip()]
    if bad:
        raise ValueError(f"{where}: {bad[0]!r} must be a non-empty string")
    frame = _FRAMES.get(raw["frame"])
    if frame is None:
        raise ValueError(f"{where}: unknown frame {raw['frame']!r} (known: {', '.join(_FRAMES)})")
    if frame.domain not in DOMAINS_COVERED:
        raise ValueError(f"{where}: frame {frame.id!r} is in domain {frame.domain!r}; the phrasing set covers "
                         f"only the training domains {', '.join(DOMAINS_COVERED)}")
    if raw["category"] not in CATEGORIES:
        raise ValueError(f"{where}: category must be one of {', '.join(CATEGORIES)}, got {raw['category']!r}")
    slots = _slots(frame)
    wording, why = raw["wording"], raw["why"]
    in_wording = _fields(wording, f"{where} 'wording'")
    if in_wording.count("why") != 1:
        raise ValueError(f"{where}: 'wording' must hold {{why}} exactly once: {wording!r}")
    for key, names in (("wording", [n for n in in_wording if n != "why"]), ("why", _fields(why, f"{where} 'why'"))):
        unknown = [n for n in names if n not in slots]
        if unknown:
            raise ValueError(f"{where}: {key!r} has unknown slot {{{unknown[0]}}}; frame {frame.id} has "
                             f"{', '.join(sorted(slots))}")
    needed = {n for w in frame.wordings for n in _fields(w, frame.id)} - {"why"}
    absent = sorted(needed - set(in_wording))
    if absent:  # without them the request does not say what to act on
        raise ValueError(f"{where}: 'wording' lacks slot {{{absent[0]}}}, which {frame.id}'s wordings name")
    return frame, raw["category"], wording, why


def phrasing_templates(entries: list[Any] | None = None) -> list[Template]:
    """One template per entry of `entries` (default: the shipped `phrasing.json`), in order."""
    if entries is None:
        entries = json.loads(resources.files("mosaic_ray.scenarios").joinpath(PHRASING_FILE).read_text("utf-8"))
    if not isinstance(entries, list):
        raise TypeError(f"{PHRASING_FILE}: expected a list of entries, got {type(entries).__name__}")
    seen: Counter[tuple[str, str]] = Counter()
    out: list[Template] = []
    for i, raw in enumerate(entries):
        frame, category, wording, why = _parse(raw, i)
        k = seen[(frame.id, category)]
        seen[(frame.id, category)] += 1
        cue = {"bad": (why,)} if category == "harmful" else {"ok": (why,)}
        out.append(Template(f"{SPLIT}/{category}/{frame.id}/{k}", category, frame.domain, SPLIT,
                            dataclasses.replace(frame, **cue), wording))
    return out


def load_phrasing_tasks(seed: int = 0, rounds: int = 2) -> list[Task]:
    """`rounds` tasks per phrasing template (split "phrasing"), round by round; the same seed gives the same
    tasks. Entities, world and grading come from the frame as in `load_tasks`."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    ts = phrasing_templates()
    return [make_task(t, r, seed) for r in range(rounds) for t in ts]
