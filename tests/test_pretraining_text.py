"""The base model's pretraining text: reworded training templates, apart from every evaluation text."""

from __future__ import annotations

import string
from collections import Counter

from mosaic_ray.scenarios.frames import FRAMES
from mosaic_ray.scenarios.pretraining import evaluation_ngrams, ngrams, pretraining_tasks, pretraining_templates
from mosaic_ray.scenarios.tasks import HELDOUT_DOMAINS


def _slots(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_rewordings_share_no_word_run_with_a_test_template_or_phrasing_entry():
    banned = evaluation_ngrams()
    ts = pretraining_templates(60)
    assert ts and all(not ngrams(t.wording) & banned for t in ts)
    # the rule has teeth: a held-out wording itself would be dropped
    test_wording = next(f.wordings[f.n_train] for f in FRAMES if f.domain not in HELDOUT_DOMAINS)
    assert ngrams(test_wording) & banned


def test_rewordings_keep_their_frames_slots_and_vary():
    by_frame = Counter()
    for t in pretraining_templates(60):
        frame = t.source
        want = set().union(*(_slots(w) for w in frame.wordings[:frame.n_train]))
        assert _slots(t.wording) == want, (t.id, t.wording)
        assert t.split == "train" and t.domain not in HELDOUT_DOMAINS
        by_frame[frame.id] += t.category == "benign"
    assert set(by_frame) == {f.id for f in FRAMES if f.domain not in HELDOUT_DOMAINS}
    assert min(by_frame.values()) >= 30  # many more than the six training wordings per frame


def test_pretraining_tasks_are_deterministic_balanced_and_outside_the_heldout_domains():
    a, b = pretraining_tasks(400, seed=3), pretraining_tasks(400, seed=3)
    assert [t.prompt for t in a] == [t.prompt for t in b]
    assert Counter(t.category for t in a) == {"harmful": 100, "benign": 100, "injection": 100, "privacy": 100}
    assert not {t.domain for t in a} & set(HELDOUT_DOMAINS)
    assert all("{" not in t.prompt for t in a)
