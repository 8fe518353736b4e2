"""Each loss against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mosaic_ray.algorithms import LOSSES, get_loss, loss_norm
from mosaic_ray.algorithms.aggregation import aggregate
from mosaic_ray.algorithms.logprobs import chunked_logprobs, reference_logprobs
from mosaic_ray.algorithms.mosaic_grpo import kl_k3
from mosaic_ray.config import LearnerConfig

CFG = LearnerConfig(clip_eps=0.2, kl_coef=0.0, loss_agg="token")


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_registry_names_and_unknown():
    assert {"mosaic_grpo", "dpo", "sft"} <= set(LOSSES)
    with pytest.raises(KeyError, match="registered losses"):
        get_loss("ppo_typo")


def test_grpo_unclipped_token_level_with_mask():
    # ratio = 1 everywhere: loss = −Σ mask·A / Σ mask = −(2·1 + 1·(−0.5)) / 3 = −0.5
    logp = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    mask = t([[1, 1, 0], [0, 1, 0]])
    adv = t([1.0, -0.5])
    loss, m = get_loss("mosaic_grpo")(logp, logp.clone(), adv, mask, CFG)
    assert loss.item() == pytest.approx(-0.5)
    assert m["clipfrac"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0)


def test_grpo_clips_upper_side_for_positive_advantage():
    # ratio = e^0.5 ≈ 1.6487 > 1.2, A = +2: loss1 = −3.2974, loss2 = −2·1.2 = −2.4 → max = −2.4 (clipped)
    logp, old = t([[0.0]]), t([[-0.5]])
    loss, m = get_loss("mosaic_grpo")(logp, old, t([2.0]), t([[1]]), CFG)
    assert loss.item() == pytest.approx(-2.4)
    assert m["clipfrac"] == 1.0


def test_grpo_clips_lower_side_for_negative_advantage_and_no_gradient_when_clipped():
    # ratio = e^−0.5 ≈ 0.6065 < 0.8, A = −1: loss1 = 0.6065, loss2 = 0.8 → max = 0.8 (clipped, zero gradient)
    logp = t([[-1.0]]).requires_grad_()
    loss, m = get_loss("mosaic_grpo")(logp, t([[-0.5]]), t([-1.0]), t([[1]]), CFG)
    assert loss.item() == pytest.approx(0.8)
    assert m["clipfrac"] == 1.0
    loss.backward()
    assert logp.grad.abs().sum().item() == 0.0


def test_grpo_not_clipped_on_the_pessimistic_side():
    # ratio = e^−0.5 < 0.8 but A = +1: loss1 = −0.6065 > loss2 = −0.8 → unclipped −0.6065, gradient flows
    logp = t([[-1.0]]).requires_grad_()
    loss, m = get_loss("mosaic_grpo")(logp, t([[-0.5]]), t([1.0]), t([[1]]), CFG)
    assert loss.item() == pytest.approx(-math.exp(-0.5), abs=1e-6)
    assert m["clipfrac"] == 0.0
    loss.backward()
    assert logp.grad.item() == pytest.approx(-math.exp(-0.5), abs=1e-6)   # d(−A·e^{logp−old})/dlogp


def test_k3_kl_value_and_term():
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -2.0]])
    # k3 at log r = ref − logp = −0.5: e^−0.5 + 0.5 − 1 = 0.10653; at 0: 0
    assert kl_k3(logp, ref)[0, 0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, abs=1e-6)
    assert kl_k3(logp, ref)[0, 1].item() == 0.0
    cfg = LearnerConfig(kl_coef=0.5, loss_agg="token")
    loss, m = get_loss("mosaic_grpo")(logp, logp.clone(), t([0.0]), t([[1, 1]]), cfg, ref_logp=ref)
    assert loss.item() == pytest.approx(0.5 * (math.exp(-0.5) + 0.5 - 1) / 2, abs=1e-6)
    assert m["kl_ref"] == pytest.approx((math.exp(-0.5) + 0.5 - 1) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        get_loss("mosaic_grpo")(logp, logp, t([0.0]), t([[1, 1]]), cfg)


def test_token_vs_sequence_aggregation():
    per_token = t([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    assert aggregate(per_token, mask, "token").item() == pytest.approx(7 / 4)          # (3 + 4) / 4 tokens
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx((1 + 4) / 2)  # mean of per-seq means
    assert aggregate(per_token, mask, "token", norm=14).item() == pytest.approx(0.5)   # global denominator
    assert aggregate(per_token, torch.zeros_like(mask), "token").item() == 0.0
    seq_cfg = LearnerConfig(kl_coef=0.0, loss_agg="sequence")
    logp = torch.zeros(2, 3)
    loss, _ = get_loss("mosaic_grpo")(logp, logp, t([1.0, -3.0]), mask, seq_cfg)
    assert loss.item() == pytest.approx((-1 + 3) / 2)
    assert loss_norm("mosaic_grpo", mask, seq_cfg) == 2 and loss_norm("mosaic_grpo", mask, CFG) == 4


def test_dpo_hand_computed():
    cfg = LearnerConfig(dpo_beta=0.5)
    # rows: chosen, rejected. Σ mask·(logp − ref): chosen = (−1+2) + 0 = 1 (last token masked), rejected = −1
    logp = t([[-1.0, -3.0], [-2.0, -1.0]])
    ref = t([[-2.0, -9.0], [-1.0, -1.0]])
    mask = t([[1, 0], [1, 1]])
    loss, m = get_loss("dpo")(logp, logp, t([1.0, 1.0]), mask, cfg, ref_logp=ref)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * 2))), abs=1e-6)
    assert m["reward_accuracy"] == 1.0 and m["reward_margin"] == pytest.approx(2.0)
    weighted, _ = get_loss("dpo")(logp, logp, t([0.5, 0.5]), mask, cfg, ref_logp=ref)
    assert weighted.item() == pytest.approx(0.5 * loss.item(), abs=1e-6)


def test_sft_masks_non_assistant_tokens():
    logp = t([[-9.0, -1.0, -3.0]])
    loss, m = get_loss("sft")(logp, logp, t([0.0]), t([[0, 1, 1]]), CFG)
    assert loss.item() == pytest.approx(2.0)
    assert m["nll"] == pytest.approx(2.0)


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_logprobs_match_log_softmax_and_gradients(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    targets = torch.randint(0, 11, (2, 7))
    logp, ent = chunked_logprobs(hidden, head, targets, chunk)
    ref = reference_logprobs(head(hidden), targets)
    assert torch.allclose(logp, ref, atol=1e-6)
    probs = torch.softmax(head(hidden), -1)
    assert torch.allclose(ent, -(probs * probs.log()).sum(-1), atol=1e-5)
    (g1,) = torch.autograd.grad(logp.sum(), hidden)
    (g2,) = torch.autograd.grad(ref.sum(), hidden)
    assert torch.allclose(g1, g2, atol=1e-6)
