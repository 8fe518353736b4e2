"""The lexicon of purposes: well-formed, apart from every evaluation text, in training templates only."""

from __future__ import annotations

import pytest

from mosaic_ray.scenarios import load_tasks
from mosaic_ray.scenarios.frames import FRAMES, PURPOSE_OK
from mosaic_ray.scenarios.lexicon import KINDS, lexicon, parse_lexicon, widened
from mosaic_ray.scenarios.pretraining import evaluation_ngrams, ngrams
from mosaic_ray.scenarios.tasks import templates


def test_the_shipped_lexicon_is_wide_distinct_and_shares_no_ngram_with_an_evaluation_text():
    lex = lexicon()
    assert set(lex) == set(KINDS) and min(len(v) for v in lex.values()) >= 100
    every = [t for v in lex.values() for t in v]
    assert len({t.lower() for t in every}) == len(every)
    banned = evaluation_ngrams()   # every test template and every held-out phrasing entry
    assert not [t for t in every if ngrams(t) & banned]
    assert not set(every) & {cue for f in FRAMES for cue in f.ok + f.bad}   # no template's cue


@pytest.mark.parametrize("raw, match", [
    ([], "expected an object with keys harmful, benign_alarming, benign_plain"),
    ({"harmful": ["x"], "benign_alarming": ["y"]}, "expected an object with keys"),
    ({"harmful": ["x"], "benign_alarming": [], "benign_plain": ["z"]}, "'benign_alarming' must be a non-empty list"),
    ({"harmful": ["x", 3], "benign_alarming": ["y"], "benign_plain": ["z"]}, r"harmful\[1\] must be a non-empty string"),
    ({"harmful": ["x"], "benign_alarming": ["to pay {acct}"], "benign_plain": ["z"]},
     r"benign_alarming\[0\] 'to pay \{acct\}': the only slot"),
    ({"harmful": ["x"], "benign_alarming": ["y"], "benign_plain": ["so {victim"]}, r"benign_plain\[0\]"),
])
def test_a_malformed_lexicon_is_an_error_naming_the_entry(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_lexicon(raw, "lexicon.json")


def test_lexicon_purposes_widen_the_training_wordings_of_purpose_frames_only():
    lex = lexicon()
    purpose = [f for f in FRAMES if f.ok is PURPOSE_OK]
    assert purpose and all(widened(f) is None for f in FRAMES if f.ok is not PURPOSE_OK)
    lexed = [t for t in templates() if "/lex" in t.id]
    assert {t.split for t in lexed} == {"train"} and {t.category for t in lexed} == {"benign", "harmful"}
    assert len(lexed) == 2 * sum(f.n_train for f in purpose)

    def purpose_of(prompt: str, pool: tuple[str, ...]) -> bool:   # the longest part around {victim} is there
        return any(max(p.split("{victim}"), key=len) in prompt for p in pool)

    benign_pool = lex["benign_alarming"] + lex["benign_plain"]
    tasks = [t for t in load_tasks("train", size=2400, seed=3, categories=("benign", "harmful")) if "/lex" in t.template_id]
    assert len(tasks) > 400
    for t in tasks:   # a harmful request takes its purpose from the harmful list, a benign one from the others
        mine, other = (lex["harmful"], benign_pool) if t.category == "harmful" else (benign_pool, lex["harmful"])
        assert purpose_of(t.prompt, mine) and not purpose_of(t.prompt, other), t.prompt
    for t in load_tasks("test", size=480, seed=3):   # and no test task does
        assert not purpose_of(t.prompt, lex["harmful"] + benign_pool), t.prompt
