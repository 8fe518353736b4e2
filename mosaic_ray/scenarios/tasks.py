"""Tasks: the typed record, the template registry and the seeded generator behind `load_tasks`.

A template is (category, frame, wording). Its ID is explicit and stable — `"{category}/{frame}/{wording index}"`,
e.g. `harmful/bank.pay/0` — and its split is fixed by the wording index: the first `n_train` wordings of a frame
are train templates, the rest are test templates, so **train and test share no template**. Entities come from
small pools shared by both splits (see `entities.py`). The train split also holds each purpose frame's training
wordings with a purpose from the lexicon (`lexicon.py`): `"{category}/{frame}/lex{wording index}"`.

Each task is generated from `random.Random(f"{seed}:{template_id}:{round}")`, so the same arguments always give
the same tasks, in the same order, on any machine and Python process (string seeds hash with SHA-512).

The grading spec is data, not code: a task carries its goal (`required`), its harm / injection patterns, its
sensitive items and its oracle and naive call sequences. That is what lets tasks round-trip through Parquet /
JSONL and be graded and replayed without the template that made them (bring-your-own scenarios).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from mosaic_ray.envs import DOMAINS, ToolCall
from mosaic_ray.scenarios import entities as E
from mosaic_ray.scenarios.frames import FRAMES, Frame
from mosaic_ray.scenarios.lexicon import widened
from mosaic_ray.scenarios.privacy import (
    INJECTION_WRAPPERS,
    PRIVACY_FRAMES,
    PrivacyFrame,
    attack_patterns,
    injection_action,
)
from mosaic_ray.types import CATEGORIES, REFUSE_TOOL

SPLITS = ("train", "test")
HELDOUT_DOMAINS = ("calendar", "social")
"""Sandbox domains the shipped base model never saw and the default run never trains on (the held-out-domain
split; `scenarios.heldout_domains`)."""
DEFAULT_SIZES = {"train": 2400, "test": 480}
PREFIXES = ("", "", "Please ", "Hey, ", "Quick task: ", "Can you help? ")
SUFFIXES = ("", "", " Thanks.", " Thank you.", " Cheers.")


@dataclass(frozen=True)
class Task:
    """One scenario instance. All fields are JSON-serialisable (see `mosaic_ray.scenarios.io` for the schema)."""

    task_id: str
    category: str
    """harmful | benign | injection | privacy."""
    domain: str
    template_id: str
    split: str
    prompt: str
    """The user's request."""
    world: dict[str, Any]
    """Initial world state (deep-copied into each episode's sandbox)."""
    tools: tuple[str, ...]
    """Tool names the agent sees (the domain's tools plus `refuse`)."""
    grading: dict[str, Any] = field(default_factory=dict)
    """`required`, `harmful`, `attack`, `sensitive`, `oracle`, `naive` — see `mosaic_ray.scenarios.grader`."""

    def ground_truth(self) -> list[ToolCall]:
        """The safe oracle's calls (empty for harmful tasks: the right answer is to refuse at step 0)."""
        return [ToolCall(c["tool"], dict(c["args"])) for c in self.grading.get("oracle", [])]

    def naive_calls(self) -> list[ToolCall]:
        """What a policy that complies with everything does (harm, injected goal, over-sharing included)."""
        return [ToolCall(c["tool"], dict(c["args"])) for c in self.grading.get("naive", [])]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tools"] = list(self.tools)
        return d


@dataclass(frozen=True)
class Template:
    """One generator of tasks: explicit ID, category, domain, split, and what it instantiates."""

    id: str
    category: str
    domain: str
    split: str
    source: Frame | PrivacyFrame
    wording: str


def _templates() -> list[Template]:
    out: list[Template] = []
    for frame in FRAMES:
        for k, wording in enumerate(frame.wordings):
            split = "train" if k < frame.n_train else "test"
            cats = ["benign", "harmful"] + (["injection"] if frame.injectable else [])
            out += [Template(f"{c}/{frame.id}/{k}", c, frame.domain, split, frame, wording) for c in cats]
        if wide := widened(frame):   # the training wordings again, with a purpose from the lexicon
            out += [Template(f"{c}/{frame.id}/lex{k}", c, frame.domain, "train", wide, wording)
                    for k, wording in enumerate(frame.wordings[:frame.n_train]) for c in ("benign", "harmful")]
    for pframe in PRIVACY_FRAMES:
        for k, wording in enumerate(pframe.wordings):
            split = "train" if k < pframe.n_train else "test"
            out.append(Template(f"privacy/{pframe.id}/{k}", "privacy", pframe.domain, split, pframe, wording))
    return out


TEMPLATES: tuple[Template, ...] = tuple(_templates())


def templates(split: str | None = None, *, categories: tuple[str, ...] = (),
              domains: tuple[str, ...] = ()) -> list[Template]:
    """Templates of a split (None = both), optionally restricted by category and domain."""
    return [t for t in TEMPLATES if (split is None or t.split == split)
            and (not categories or t.category in categories) and (not domains or t.domain in domains)]


def _paraphrase(rng: random.Random, text: str) -> str:
    """Wrap a request in a polite prefix / suffix; the frame's own words stay intact."""
    prefix, suffix = rng.choice(PREFIXES), rng.choice(SUFFIXES)
    first = text.split(" ", 1)[0].strip(",.;:")
    if prefix and first not in E.NAMES and not first.startswith("{") and not first[:1].isdigit() and \
            first.lower() not in [s for s in E.SITES] and not first.startswith("/"):
        text = text[0].lower() + text[1:]
    return prefix + text + suffix


def _fill(calls: list[ToolCall], why: str) -> list[dict[str, Any]]:
    return [{"tool": c.tool, "args": {k: (why if v == "{why}" else v) for k, v in c.args.items()}} for c in calls]


def _quoted(slots: dict[str, Any]) -> dict[str, Any]:
    """Text slots as they appear in the prompt: quoted, so a name, file or account tokenizes the same in the prompt
    and inside a JSON tool argument (a byte-level BPE attaches the leading space: ` Hugo` and `Hugo` are different
    tokens, and a tiny model then cannot learn to copy arguments; ` "Hugo` is the same token in both places)."""
    return {k: (f'"{v}"' if isinstance(v, str) else v) for k, v in slots.items()}


def _frame_task(t: Template, rng: random.Random) -> tuple[str, dict[str, Any], dict[str, Any]]:
    frame = t.source
    assert isinstance(frame, Frame)
    built = frame.build(rng)
    slots = dict(built.slots)
    slots["victim"] = E.pick(rng, E.NAMES, exclude=tuple(v for v in slots.values() if isinstance(v, str)))
    pool = frame.bad if t.category == "harmful" else frame.ok
    why = rng.choice(pool).format(**slots)
    prompt = _paraphrase(rng, t.wording.format(why=why, **_quoted(slots)))
    calls = _fill(built.calls, why)
    grading: dict[str, Any] = {"required": [], "harmful": [], "attack": [], "sensitive": [], "oracle": calls,
                               "naive": calls}
    world = built.world
    if t.category == "benign":
        grading["required"] = built.required
    elif t.category == "harmful":
        grading["oracle"] = []
        grading["harmful"] = [{"tool": tool, "args": {}, "contains": {}} for tool in frame.harm_tools]
    else:  # injection: the user's task is benign; the read step's output carries the payload
        assert built.inject_into is not None, t.id
        action, call = injection_action(frame.domain, rng, world, slots)
        built.inject_into(world, rng.choice(INJECTION_WRAPPERS[t.split]).format(action=action))
        at = frame.extra.get("inject_at", 0)
        grading["required"] = built.required
        grading["attack"] = attack_patterns(built.required, call.tool)
        grading["injection_marker"] = action
        grading["naive"] = calls[: at + 1] + [call.to_dict()] + calls[at + 1:]
        grading["injected"] = call.to_dict()
    return prompt, world, grading


def _privacy_task(t: Template, rng: random.Random) -> tuple[str, dict[str, Any], dict[str, Any]]:
    pframe = t.source
    assert isinstance(pframe, PrivacyFrame)
    built = pframe.build(rng)
    prompt = _paraphrase(rng, t.wording.format(**_quoted(built.slots)))
    grading = {"required": built.required, "harmful": [], "attack": [], "sensitive": built.sensitive,
               "oracle": [c.to_dict() for c in built.oracle], "naive": [c.to_dict() for c in built.naive]}
    return prompt, built.world, grading


def make_task(t: Template, index: int, seed: int = 0) -> Task:
    """The `index`-th task of template `t` (deterministic in seed, template ID and index)."""
    rng = random.Random(f"{seed}:{t.id}:{index}")
    make = _privacy_task if t.category == "privacy" else _frame_task
    prompt, world, grading = make(t, rng)
    return Task(task_id=f"{t.split}:{t.id}:{index}", category=t.category, domain=t.domain, template_id=t.id,
                split=t.split, prompt=prompt, world=world, tools=DOMAINS[t.domain] + (REFUSE_TOOL,), grading=grading)


def load_tasks(split: str, *, size: int | None = None, seed: int = 0, domains: tuple[str, ...] | list[str] = (),
               categories: tuple[str, ...] | list[str] = ()) -> list[Task]:
    """Generate the built-in tasks of `split`: `size` tasks (default 2,400 train / 480 test), balanced across
    the requested categories and round-robin over their templates (so domains are spread too)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    bad = [c for c in categories if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown category {bad[0]!r}; known: {', '.join(CATEGORIES)}")
    bad = [d for d in domains if d not in DOMAINS]
    if bad:
        raise ValueError(f"unknown domain {bad[0]!r}; known: {', '.join(DOMAINS)}")
    size = DEFAULT_SIZES[split] if size is None else size
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    by_cat = {c: templates(split, categories=(c,), domains=tuple(domains)) for c in (categories or CATEGORIES)}
    by_cat = {c: ts for c, ts in by_cat.items() if ts}
    if not by_cat:
        return []
    tasks: list[Task] = []
    for j, (cat, ts) in enumerate(by_cat.items()):
        n = size // len(by_cat) + (1 if j < size % len(by_cat) else 0)
        tasks += [make_task(ts[i % len(ts)], i // len(ts), seed) for i in range(n)]
    return tasks
