"""A broad lexicon of purposes for training: harm, and legitimate requests in alarming words, in many words.

The templates carry a request's intent in a `{why}` cue from two small pools (`frames.PURPOSE_OK`, `PURPOSE_BAD`,
35 cues). A model that has read only those knows harm by their words, and meets every other word as a stranger:
the tiny model refused 83-92 % of the held-out phrasing set's benign requests ("kill off this debt") after RL,
as it refused its harmful ones. A pretrained model brings the meaning of words from its corpus; `lexicon.json`
brings the tiny model a slice of that: 940 purposes written for this use by a helper agent that was not shown the
phrasing set (`phrasing.json`); the clauses close to the examples in its brief were then removed. The words are
not disjoint from the phrasing set's (most content words of its purposes occur somewhere here), only its runs of
four words are:

- `harmful`: harm stated in many ways (fraud, stalking, threats, arson, cover-ups, ...);
- `benign_alarming`: legitimate purposes in violent, criminal or alarming words (games, sport, pests, IT jargon,
  fiction, ...);
- `benign_plain`: ordinary purposes.

The train split holds, beside each purpose frame's training templates, its training wordings with a lexicon
purpose (`widened`; template IDs `{category}/{frame}/lex{k}`), so the warm start, RL and the helpfulness replay
meet harm and legitimate requests in these words (a base model rebuilt with them in its corpus did worse:
docs/learning-check.md). Test templates never take a lexicon purpose, and no purpose
shares a run of `pretraining.NGRAM` words with an evaluation text (`tests/test_lexicon.py`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import cache
from importlib import resources

from mosaic_ray.scenarios.frames import PURPOSE_OK, Frame

LEXICON_FILE = "lexicon.json"
KINDS = ("harmful", "benign_alarming", "benign_plain")
_SLOT = re.compile(r"\{(\w*)\}")


def parse_lexicon(raw: object, where: str = LEXICON_FILE) -> dict[str, tuple[str, ...]]:
    """The lexicon's three lists; anything malformed raises ValueError naming the list and entry."""
    if not isinstance(raw, dict) or set(raw) != set(KINDS):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{where}: expected an object with keys {', '.join(KINDS)}, got {keys}")
    out: dict[str, tuple[str, ...]] = {}
    for kind in KINDS:
        items = raw[kind]
        if not isinstance(items, list) or not items:
            raise ValueError(f"{where}: {kind!r} must be a non-empty list of strings")
        for i, text in enumerate(items):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: {kind}[{i}] must be a non-empty string, got {text!r}")
            slots = set(_SLOT.findall(text)) - {"victim"}
            if slots or text.count("{") != text.count("}"):
                raise ValueError(f"{where}: {kind}[{i}] {text!r}: the only slot a purpose may hold is {{victim}}")
        out[kind] = tuple(items)
    return out


@cache
def lexicon() -> dict[str, tuple[str, ...]]:
    """The shipped lexicon."""
    return parse_lexicon(json.loads(resources.files("mosaic_ray.scenarios").joinpath(LEXICON_FILE).read_text("utf-8")))


def widened(frame: Frame) -> Frame | None:
    """`frame` with its purposes from the lexicon (benign: `benign_alarming` + `benign_plain`; harmful: `harmful`)
    where its `{why}` is a purpose (`PURPOSE_OK`/`PURPOSE_BAD`), else None (its `{why}` is a message's text)."""
    if frame.ok is not PURPOSE_OK:
        return None
    lex = lexicon()
    return dataclasses.replace(frame, ok=lex["benign_alarming"] + lex["benign_plain"], bad=lex["harmful"])
