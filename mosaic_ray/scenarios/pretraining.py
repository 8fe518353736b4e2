"""Pretraining text for the shipped base model: the training templates, reworded.

With six wordings per frame, the tiny model learned to copy arguments by sentence shape: on a held-out wording
("pull up what A emailed me and pass it along to B") it put the first quoted name into every argument, while
the same frames' training wordings came out right. A pretrained model has read the same request worded a
thousand ways. `reworded` gives the base that variety for the *training* frames only: verb synonyms of each
domain, connectives, polite openers and closers, and the two steps in either order ("..., but first ...").

It is written from the training wordings alone, and a rule keeps it apart from every evaluation text (tested):
no reworded request shares a run of `NGRAM` words with a test template or a held-out phrasing entry; such a
rewording is dropped.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from mosaic_ray.scenarios.frames import FRAMES, Frame
from mosaic_ray.scenarios.tasks import HELDOUT_DOMAINS, Task, Template, make_task

NGRAM = 4
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "bank": {"send": ("transfer", "wire", "pay", "remit"), "pay": ("send", "transfer", "wire", "remit"),
             "wire": ("send", "pay", "transfer"), "transfer": ("send", "wire", "pay"),
             "check": ("view", "review", "look at"), "read": ("view", "review", "open up"),
             "open": ("view", "read", "open up"), "get": ("fetch", "view", "check")},
    "email": {"read": ("open", "view", "go through"), "open": ("read", "view"), "get": ("fetch", "grab"),
              "find": ("look up", "locate", "search for"), "forward": ("relay", "resend"),
              "check": ("view", "read")},
    "files": {"read": ("open", "view", "go through"), "open": ("read", "view"), "check": ("view", "inspect"),
              "delete": ("remove", "erase", "trash"), "remove": ("delete", "erase", "trash"),
              "erase": ("delete", "remove"), "list": ("show", "display"), "show": ("list", "display")},
    "web": {"open": ("visit", "load", "browse to"), "visit": ("open", "load"), "load": ("open", "visit"),
            "submit": ("post", "send in", "file"), "post": ("submit", "send in")},
    "sysadmin": {"read": ("view", "check", "inspect"), "check": ("view", "read", "inspect"),
                 "open": ("view", "read"), "create": ("make", "add", "set up"), "add": ("create", "make"),
                 "list": ("show", "print"), "delete": ("remove", "wipe")},
}
CONNECTIVES = (", then ", ". Then ", " and then ", ", and after that ", "; next, ", " and next ", ". Next, ")
OPENERS = ("", "", "", "I'd like you to ", "Could you ", "Would you ", "I want you to ", "Go ahead and ")
CLOSERS = ("", "", "", ", please", " for me", " when you can", ", thanks a lot")
_SPLIT = re.compile(r"(, then |\. Then |\. After that, | and then |; then |, and then )")


def _words(text: str) -> list[str]:
    """Lower-cased words without the slots (a slot sequence like "to {b} {why}" is the frame's, not a wording's)."""
    return re.findall(r"[a-z0-9']+", re.sub(r"\{\w+\}", " ", text.lower()))


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def evaluation_ngrams() -> set[tuple[str, ...]]:
    """Word n-grams of every test template and every held-out phrasing entry."""
    from mosaic_ray.scenarios.phrasing import phrasing_templates

    out: set[tuple[str, ...]] = set()
    for f in FRAMES:
        for w in f.wordings[f.n_train:]:
            out |= ngrams(w)
    for t in phrasing_templates():
        out |= ngrams(t.wording)
    return out


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless the text opens with a slot, "I" or an acronym."""
    if text[:1] == "{" or text[:2] in ("I ", "I'") or text[1:2].isupper():
        return text
    return text[:1].lower() + text[1:]


def _synonyms(text: str, table: dict[str, tuple[str, ...]], rng: random.Random) -> str:
    def swap(m: re.Match) -> str:
        word = m.group(0)
        options = table.get(word.lower())
        if not options or rng.random() < 0.4:
            return word
        new = rng.choice(options)
        return new[:1].upper() + new[1:] if word[:1].isupper() else new
    return re.sub(r"[A-Za-z]+", swap, text)


def reword(frame: Frame, wording: str, rng: random.Random) -> str:
    """One random rewording of a training wording (slots kept)."""
    text = _synonyms(wording, SYNONYMS.get(frame.domain, {}), rng)
    parts = _SPLIT.split(text)
    if len(parts) == 3 and parts[2].endswith("{why}.") and rng.random() < 0.4:
        first, second = parts[0].removesuffix(" first"), parts[2][:-len(" {why}.")]
        text = f"{second[:1].upper()}{second[1:]} {{why}}, but first {_lower_first(first)}."
    elif len(parts) == 3:
        text = parts[0] + rng.choice(CONNECTIVES) + _lower_first(parts[2])
    opener = rng.choice(OPENERS)
    if opener and not text.startswith(("I ", "I'")):
        text = opener + _lower_first(text)
    closer = rng.choice(CLOSERS)
    if closer and text.endswith("{why}.") and not re.search(r"(:|saying) \{why\}", text):
        text = text[:-1] + closer + "."
    return text


def pretraining_templates(num_per_frame: int, seed: int = 0,
                          heldout_domains: Iterable[str] = HELDOUT_DOMAINS) -> list[Template]:
    """Up to `num_per_frame` distinct rewordings per training-domain frame, each as benign, harmful and (where the
    frame carries injections) injection templates of split "train"; rewordings that share an n-gram with an
    evaluation text are dropped."""
    held = set(heldout_domains)
    banned = evaluation_ngrams()
    out: list[Template] = []
    for frame in FRAMES:
        if frame.domain in held:
            continue
        rng = random.Random(f"{seed}:pretraining:{frame.id}")
        seen: set[str] = set()
        train = frame.wordings[:frame.n_train]
        for _ in range(num_per_frame * 8):
            if len(seen) >= num_per_frame:
                break
            text = reword(frame, rng.choice(train), rng)
            if text in seen or ngrams(text) & banned:
                continue
            seen.add(text)
        cats = ["benign", "harmful"] + (["injection"] if frame.injectable else [])
        for k, text in enumerate(sorted(seen)):
            out += [Template(f"{c}/{frame.id}/r{k}", c, frame.domain, "train", frame, text) for c in cats]
    return out


def pretraining_tasks(size: int, *, num_per_frame: int = 60, seed: int = 0,
                      heldout_domains: Iterable[str] = HELDOUT_DOMAINS) -> list[Task]:
    """`size` tasks over the reworded templates, balanced over categories and round-robin over templates (as
    `load_tasks`), plus privacy tasks from the training privacy templates for the fourth category."""
    from mosaic_ray.scenarios.tasks import templates

    by_cat: dict[str, list[Template]] = {}
    for t in pretraining_templates(num_per_frame, seed, heldout_domains):
        by_cat.setdefault(t.category, []).append(t)
    held = tuple(heldout_domains)
    by_cat["privacy"] = [t for t in templates("train", categories=("privacy",)) if t.domain not in held]
    tasks: list[Task] = []
    for j, ts in enumerate(by_cat.values()):
        n = size // len(by_cat) + (1 if j < size % len(by_cat) else 0)
        tasks += [make_task(ts[i % len(ts)], i // len(ts), seed) for i in range(n)]
    return tasks
