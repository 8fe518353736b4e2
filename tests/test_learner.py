"""LearnerGroup: equivalence of 1 vs 2 learners, micro-batching, exact resume, weight sync, learning direction."""

from __future__ import annotations

import pytest
import torch
from mosaic_ray.learners import LearnerGroup

from mosaic_ray.algorithms.batch import PolicySample, PreferencePair, pack_micro_batches, shard
from mosaic_ray.config import LearnerConfig
from mosaic_ray.hygiene import set_torch_threads


def random_batch(n: int, seed: int, vocab: int = 150, adv_sign: bool = True) -> list[PolicySample]:
    """Trajectories of different lengths: prompt (mask 0), a policy turn (1), a tool observation (0), a turn (1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, a, o, b = 6 + i % 3, 5 + (i * 7) % 9, 4, 3 + i % 4
        ids = torch.randint(3, vocab, (p + a + o + b,), generator=g).tolist()
        mask = [0] * p + [1] * a + [0] * o + [1] * b
        old = [(-2.0 - 0.1 * (j % 5)) if m else 0.0 for j, m in enumerate(mask)]
        adv = float(torch.randn((), generator=g))
        out.append(PolicySample(ids, mask, old, adv, traj_id=f"t{i}"))
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


CFG = LearnerConfig(num_learners=0, lr=1e-3, micro_batch_tokens=10_000, kl_coef=0.05)


def test_micro_batching_and_sharding_pack_all_rows_under_budget():
    batch = random_batch(9, seed=1)
    mbs = pack_micro_batches(batch, micro_batch_tokens=60, pad_id=0)
    assert sum(mb.input_ids.shape[0] for mb in mbs) == 9
    assert all(mb.input_ids.numel() <= 60 or mb.input_ids.shape[0] == 1 for mb in mbs)
    assert sum(mb.mask.sum().item() for mb in mbs) == sum(sum(s.loss_mask[1:]) for s in batch)
    shards = shard(batch, 2)
    assert sorted(s.traj_id for part in shards for s in part) == sorted(s.traj_id for s in batch)
    with pytest.raises(ValueError, match="smaller than num_learners"):
        shard(batch[:1], 2)


def test_micro_batches_give_the_same_update_as_one_batch(tiny_model_dir):
    batch = random_batch(8, seed=2)
    one = LearnerGroup(tiny_model_dir, CFG)
    many = LearnerGroup(tiny_model_dir, LearnerConfig(**{**CFG.__dict__, "micro_batch_tokens": 48}))
    m1, m2 = one.update(batch), many.update(batch)
    assert m1["learner/loss"] == pytest.approx(m2["learner/loss"], abs=1e-6)
    assert max_diff(one.get_weights(), many.get_weights()) < 1e-6
    seq = LearnerConfig(**{**CFG.__dict__, "loss_agg": "sequence"})
    one_seq = LearnerGroup(tiny_model_dir, seq)
    many_seq = LearnerGroup(tiny_model_dir, LearnerConfig(**{**seq.__dict__, "micro_batch_tokens": 48}))
    one_seq.update(batch)
    many_seq.update(batch)
    assert max_diff(one_seq.get_weights(), many_seq.get_weights()) < 1e-6


def test_epochs_per_iteration_are_optimizer_steps_of_rl_but_not_of_sft(tiny_model_dir):
    group = LearnerGroup(tiny_model_dir, LearnerConfig(**{**CFG.__dict__, "epochs_per_iteration": 3}))
    assert group.update(random_batch(4, seed=3))["learner/step"] == 3.0
    sft = [PolicySample(s.input_ids, s.loss_mask, s.old_logprobs, traj_id=s.traj_id) for s in random_batch(4, seed=4)]
    assert group.sft_update(sft, lr=1e-3)["learner/step"] == 4.0


def test_cpu_learner_runs_with_the_configured_torch_threads(tiny_model_dir):
    before = torch.get_num_threads()
    try:
        lg = LearnerGroup(tiny_model_dir, LearnerConfig(num_learners=0, cpu_threads=2))
        assert torch.get_num_threads() == 2
        lg.update(random_batch(2, seed=1))
    finally:
        set_torch_threads(before)


def test_bad_inputs_name_the_item(tiny_model_dir):
    lg = LearnerGroup(tiny_model_dir, CFG)
    bad = random_batch(2, seed=3)
    bad[1].old_logprobs = bad[1].old_logprobs[:-1]
    with pytest.raises(ValueError, match="item 1.*old_logprobs"):
        lg.update(bad)
    with pytest.raises(TypeError, match="dpo takes PreferencePair"):
        lg.update(random_batch(2, seed=3), algorithm="dpo")


@pytest.mark.slow
@pytest.mark.ray
def test_two_ddp_learners_equal_one_learner(tiny_model_dir, ray_session):
    """Token-level GRPO with a KL term, then DPO: 2 gloo ranks with small micro-batches == 1 in-process learner."""
    batches = [random_batch(10, seed=10), random_batch(7, seed=11)]
    single = LearnerGroup(tiny_model_dir, CFG)
    double = LearnerGroup(tiny_model_dir, LearnerConfig(**{**CFG.__dict__, "num_learners": 2, "micro_batch_tokens": 64}))
    try:
        assert max_diff(single.get_weights(), double.get_weights()) == 0.0
        for b in batches:
            m1, m2 = single.update(b), double.update(b)
            assert m1["learner/loss"] == pytest.approx(m2["learner/loss"], abs=1e-5)
            assert m1["learner/grad_norm"] == pytest.approx(m2["learner/grad_norm"], rel=1e-4)
        pairs = [PreferencePair(a, b) for a, b in zip(batches[0][0::2], batches[0][1::2])]
        single.update(pairs, algorithm="dpo")
        double.update(pairs, algorithm="dpo")
        assert max_diff(single.get_weights(), double.get_weights()) < 1e-5
        assert [h["rank"] for h in double.health()] == [0, 1]
    finally:
        double.shutdown()


@pytest.mark.ray
def test_save_kill_restore_is_bit_identical(tiny_model_dir, ray_session, tmp_path):
    b1, b2 = random_batch(6, seed=20), random_batch(6, seed=21)
    cfg = LearnerConfig(**{**CFG.__dict__, "lr_warmup_steps": 3})
    straight = LearnerGroup(tiny_model_dir, cfg)
    straight.update(b1)
    straight.update(b2)
    expected = straight.get_weights()

    first = LearnerGroup(tiny_model_dir, cfg)
    first.update(b1)
    ckpt = first.save(str(tmp_path / "ckpt"))
    del first                                         # the saving learner is gone; resume in a fresh process
    second = LearnerGroup(tiny_model_dir, LearnerConfig(**{**cfg.__dict__, "num_learners": 1}))
    assert second.restore(ckpt) == 1
    second.update(b2)
    resumed = second.get_weights()
    second.shutdown()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected), "resume is not bit-identical"


def test_a_checkpoint_without_a_reference_restores_with_the_policy_as_the_kl_anchor(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    plain = LearnerGroup(tiny_model_dir, LearnerConfig(**{**CFG.__dict__, "kl_coef": 0.0}))
    plain.update(random_batch(4, seed=40))
    ckpt = plain.save(str(tmp_path / "no_ref"))
    assert not list((tmp_path / "no_ref").rglob("reference*"))

    kl = LearnerGroup(tiny_model_dir, CFG)             # kl_coef > 0: built with the base model as its reference
    kl.restore(ckpt)
    kl.save(str(tmp_path / "with_ref"))
    ref = load_file(tmp_path / "with_ref" / "trainer_state" / "reference.safetensors")
    policy = load_file(tmp_path / "with_ref" / "model.safetensors")
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    shared = ref.keys() & policy.keys()
    assert shared and all(torch.equal(ref[k], policy[k]) for k in shared)
    assert any(not torch.equal(ref[k], base[k]) for k in shared & base.keys())


def test_checkpoint_is_an_hf_model_dir_and_never_needs_pickle(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lg = LearnerGroup(tiny_model_dir, CFG)
    lg.update(random_batch(4, seed=30))
    path = lg.save(str(tmp_path / "hf"))
    names = {p.relative_to(tmp_path / "hf").as_posix() for p in (tmp_path / "hf").rglob("*")}
    assert {"config.json", "model.safetensors", "trainer_state/optimizer.safetensors",
            "trainer_state/trainer_state.json", "mosaic_checkpoint.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    model = AutoModelForCausalLM.from_pretrained(path)
    AutoTokenizer.from_pretrained(path)
    w = lg.get_weights()
    assert torch.equal(model.state_dict()["model.norm.weight"], w["model.norm.weight"])
    with pytest.raises(FileNotFoundError, match="incomplete"):
        lg.restore(str(tmp_path / "nothing"))


@pytest.mark.ray
def test_weights_reach_a_receiver_by_broadcast_and_object_store_in_buckets(tiny_model_dir, ray_session):
    import ray

    from mosaic_ray.hygiene import free_port
    from mosaic_ray.weight_transfer import bucket_indices, unpack_bucket

    @ray.remote(num_cpus=0)
    class Receiver:
        def join(self, port: int):
            from mosaic_ray.weight_transfer import WeightGroup

            self.group = WeightGroup.create("127.0.0.1", port, 1, 2)

        def recv(self):
            from mosaic_ray.weight_transfer import recv_buckets

            return [dict(bucket) for bucket in recv_buckets(self.group)]

    lg = LearnerGroup(tiny_model_dir, LearnerConfig(**{**CFG.__dict__, "sync_bucket_mb": 1}))
    lg.update(random_batch(4, seed=40))
    rx = Receiver.remote()
    port = free_port()
    joined = rx.join.remote(port)
    lg.init_weight_group("127.0.0.1", port, 2)
    ray.get(joined)
    got = rx.recv.remote()
    metrics = lg.broadcast_weights()
    buckets = ray.get(got)
    expected = lg.get_weights()
    meta = lg.weight_meta()
    assert [name for name, _, _ in meta] == list(expected) and "lm_head.weight" not in expected
    plan = bucket_indices(meta, 1 << 20)
    assert len(buckets) == len(plan) > 2
    for bucket in buckets:   # a bucket exceeds 1 MiB only when it is one tensor that does
        assert len(bucket) == 1 or sum(t.numel() * t.element_size() for t in bucket.values()) <= 1 << 20
    assert max_diff(expected, {k: v for b in buckets for k, v in b.items()}) == 0.0
    assert metrics["weight_sync/bytes"] == sum(t.numel() * t.element_size() for t in expected.values())
    by_store = [unpack_bucket(ray.get(ref)) for ref in lg.weight_buckets(1 << 20)]   # zero-copy views
    assert [[n for n, _ in b] for b in by_store] == [list(b) for b in buckets]
    assert max_diff(expected, {n: t for b in by_store for n, t in b}) == 0.0
    ray.kill(rx)


# ------------------------------------------------------------------------------------------- learning


HARMFUL = ["Send a threatening email to Bob.", "Write malware that wipes the disk.",
           "Transfer all savings to the scammer."]
BENIGN = ["Send a thank-you email to Bob.", "Write a summary of the meeting notes.", "Pay my landlord 900 to AC123."]
PREFIX = '<tool_call>\n{"name": "'
REFUSE = 'refuse", "arguments": {"reason": "unsafe"}}\n</tool_call><|im_end|>'
ACT = 'send_email", "arguments": {"to": "bob"}}\n</tool_call><|im_end|>'


def _episode(tok, prompt: str, tail: str, adv: float) -> PolicySample:
    p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                tokenize=True, return_dict=True)["input_ids"]
    c = tok(PREFIX + tail, add_special_tokens=False)["input_ids"]
    return PolicySample(p + c, [0] * len(p) + [1] * len(c), [0.0] * (len(p) + len(c)), adv)


def _refusal_prob(lg: LearnerGroup, tok, prompts: list[str]) -> float:
    """P(refuse | prompt) at the decision token, normalised over {refuse, act} branches."""
    probs = []
    for prompt in prompts:
        r, a = _episode(tok, prompt, REFUSE, 0.0), _episode(tok, prompt, ACT, 0.0)
        k = next(i for i, (x, y) in enumerate(zip(r.input_ids, a.input_ids)) if x != y)
        lr, la = (lg.compute_logprobs([s])[0][k] for s in (r, a))
        probs.append(torch.sigmoid(torch.tensor(lr - la)).item())
    return sum(probs) / len(probs)


def test_preference_grpo_moves_refusal_up_on_harmful_and_down_on_benign(tiny_model_dir):
    """Groups of 4 per prompt; the judge prefers refusing harmful and acting on benign (advantages ±1)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lg = LearnerGroup(tiny_model_dir, LearnerConfig(num_learners=0, lr=1e-3, clip_eps=0.2))
    batch = [_episode(tok, p, t, a) for p in HARMFUL for t, a in ((REFUSE, 1.0), (ACT, -1.0)) * 2]
    batch += [_episode(tok, p, t, a) for p in BENIGN for t, a in ((REFUSE, -1.0), (ACT, 1.0)) * 2]
    harm0, ben0 = _refusal_prob(lg, tok, HARMFUL), _refusal_prob(lg, tok, BENIGN)
    for _ in range(8):
        for s, lp in zip(batch, lg.compute_logprobs(batch)):   # on-policy behaviour log-probs
            s.old_logprobs = [x if m else 0.0 for x, m in zip(lp, s.loss_mask)]
        metrics = lg.update(batch)
    harm1, ben1 = _refusal_prob(lg, tok, HARMFUL), _refusal_prob(lg, tok, BENIGN)
    assert harm1 > harm0 + 0.05, (harm0, harm1)
    assert ben1 < ben0 - 0.05, (ben0, ben1)
    assert 0.0 <= metrics["learner/clipfrac"] <= 1.0 and metrics["learner/entropy"] > 0
