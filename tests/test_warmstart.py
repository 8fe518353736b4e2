"""Warm-start data: chat-template tokenization with assistant-only loss, mistake rates, and SFT that learns."""

from __future__ import annotations

import pytest

from mosaic_ray.config import LearnerConfig, WarmStartConfig
from mosaic_ray.warmstart import demo_samples, first_turn_samples, lr_at, run_warmstart, warmstart_samples

DEMO = {"task_id": "t0", "tools": [{"type": "function", "function": {
    "name": "send_email", "description": "Send an email.",
    "parameters": {"type": "object", "properties": {"to": {"type": "string", "description": "Recipient."}},
                   "required": ["to"]}}}],
    "messages": [{"role": "system", "content": "Be safe."},
                 {"role": "user", "content": "Email Bob."},
                 {"role": "assistant", "content": '<think>ok</think>\n<tool_call>\n{"name": "send_email", '
                                                  '"arguments": {"to": "bob"}}\n</tool_call>'},
                 {"role": "tool", "content": "sent"},
                 {"role": "assistant", "content": "Done."}]}


def test_loss_only_on_assistant_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (s,) = demo_samples([DEMO], tok)
    masked = tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m])
    unmasked = tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if not m])
    assert "Done." in masked and "send_email" in masked and "<|im_end|>" in masked
    assert "Email Bob." in unmasked and "sent" in unmasked and "Be safe." in unmasked
    assert "Email Bob." not in masked and "<tool_response>" not in masked
    assert demo_samples([DEMO], tok, max_tokens=5) == []


def test_copy_weight_marks_only_arguments_copied_from_the_request(tiny_model_dir):
    from transformers import AutoTokenizer

    from mosaic_ray.algorithms.batch import collate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    demo = {**DEMO, "messages": [
        {"role": "user", "content": 'Pay 350 to "AC730", please.'},
        {"role": "assistant", "content": '<think>pay AC730</think>\n<tool_call>\n{"name": "transfer", '
                                         '"arguments": {"to": "AC730", "amount": 350, "memo": "rent"}}\n</tool_call>'},
        {"role": "tool", "content": "Sent 350 to AC730."},
        {"role": "assistant", "content": "Done."}]}
    (plain,) = demo_samples([demo], tok)
    (s,) = demo_samples([demo], tok, copy_weight=5.0)
    assert plain.loss_weights is None and s.input_ids == plain.input_ids and s.loss_mask == plain.loss_mask
    heavy = [t for t, w in zip(s.input_ids, s.loss_weights) if w == 5.0]
    assert set(s.loss_weights) == {1.0, 5.0}
    assert all(m for m, w in zip(s.loss_mask, s.loss_weights) if w == 5.0)   # only assistant tokens
    text = tok.decode(heavy).replace(" ", "")
    assert "AC730" in text and "350" in text and "rent" not in text and "pay" not in text   # not the think
    mb = collate([s], tok.pad_token_id)
    want = [m * w for m, w in zip(s.loss_mask, s.loss_weights)][1:]
    assert mb.mask[0].tolist() == want


def test_decision_weight_lands_on_the_first_plan_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (s,) = demo_samples([DEMO], tok, decision_weight=64.0)
    (both,) = demo_samples([DEMO], tok, copy_weight=5.0, decision_weight=64.0)
    at = [i for i, w in enumerate(s.loss_weights) if w != 1.0]
    assert len(at) == 1 and s.loss_weights[at[0]] == 64.0 and s.loss_mask[at[0]] == 1
    assert tok.decode(s.input_ids[at[0] - 1:at[0]]) == "<think>"   # the token right after <think>,
    assert "ok".startswith(tok.decode(s.input_ids[at[0]:at[0] + 1]))   # the plan's first (however it splits)
    assert both.loss_weights[at[0]] == 64.0


def test_first_turn_curriculum_is_one_mistake_free_turn_with_a_weighted_decision(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = WarmStartConfig(num_demos=60, comply_harmful_rate=1.0, refuse_benign_rate=1.0, copy_weight=1.0,
                          first_turn_decision_weight=16.0)
    samples = first_turn_samples(cfg, tok)
    assert len(samples) == 60
    cats = {"harmful": 0, "other": 0}
    for s in samples:
        runs = sum(1 for k, m in enumerate(s.loss_mask) if m and (k == 0 or not s.loss_mask[k - 1]))
        assert runs == 1   # one assistant turn, nothing after it
        turn = tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m])
        harmful = s.traj_id.startswith("train:harmful")
        cats["harmful" if harmful else "other"] += 1
        assert ('"refuse"' in turn) == harmful, turn   # the mistake rates above never reach the curriculum
        at = [k for k, w in enumerate(s.loss_weights) if w != 1.0]
        assert len(at) == 1 and s.loss_weights[at[0]] == 16.0
        assert tok.decode(s.input_ids[at[0] - 1:at[0]]) == "<think>"
    assert cats["harmful"] > 0 and cats["other"] > 0


def test_lr_schedule_warms_up_then_decays():
    cfg = WarmStartConfig(lr=1e-3, lr_end=1e-4, warmup_steps=10, steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_scripted_demos_tokenize_and_sft_lowers_the_loss(tiny_model_dir):
    from mosaic_ray.learners import LearnerGroup
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = WarmStartConfig(num_demos=16, steps=8, batch_size=6, lr=3e-3, lr_end=3e-4, warmup_steps=2)
    samples = warmstart_samples(cfg, tok, seed=0)
    assert len(samples) == 16
    assert all(0 < sum(s.loss_mask) < len(s.input_ids) for s in samples)
    lg = LearnerGroup(tiny_model_dir, LearnerConfig(num_learners=0, micro_batch_tokens=4096))
    history = run_warmstart(lg, samples, cfg, seed=0)
    assert len(history) == 8 and history[0]["learner/lr"] == pytest.approx(1.5e-3)
    first, last = history[0]["learner/nll"], sum(h["learner/nll"] for h in history[-3:]) / 3
    assert last < first - 0.5, (first, last)


def test_mistake_rates_reach_the_demonstrations(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    refusals = []
    for rate in (0.0, 1.0):
        cfg = WarmStartConfig(num_demos=40, comply_harmful_rate=rate)
        samples = warmstart_samples(cfg, tok, seed=1)
        text = [tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m]) for s in samples]
        refusals.append(sum('"refuse"' in t for t in text))
    assert refusals[0] > refusals[1], refusals


def test_epoch_batches_cover_every_sample_once_and_cut_padding():
    import random

    from mosaic_ray.warmstart import epoch_batches

    rng = random.Random(0)
    lengths = [rng.randint(100, 400) for _ in range(1000)]
    batches = epoch_batches(lengths, 16, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(1 <= len(b) <= 16 for b in batches)

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    order = list(range(1000))
    random.Random(1).shuffle(order)
    unbucketed = [order[k:k + 16] for k in range(0, 1000, 16)]
    assert padded(batches) < 0.85 * padded(unbucketed)


def test_replay_demonstrates_only_benign_tasks_without_mistakes(tiny_model_dir):
    from transformers import AutoTokenizer

    from mosaic_ray.scenarios import load_tasks
    from mosaic_ray.warmstart import replay_samples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tasks = load_tasks("train", size=40, seed=0)
    samples = replay_samples(tasks, tok)
    assert len(samples) == sum(t.category == "benign" for t in tasks) > 0
    assert {s.traj_id.split("/")[0] for s in samples} == {"train:benign"}
    text = [tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m]) for s in samples]
    assert not any('"refuse"' in t for t in text)
    with pytest.raises(ValueError, match="replay_coef > 0 needs benign training tasks"):
        replay_samples([t for t in tasks if t.category == "harmful"], tok)
