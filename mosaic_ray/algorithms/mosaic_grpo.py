"""MOSAIC preference-GRPO: PPO-clip surrogate over policy tokens, advantages from pairwise wins.

The advantage of trajectory i comes from the judge: wins_i = Σ_j pref(i, j) over its group of G samples,
+ format reward − length penalty, normalised within the group (`mosaic_ray/rewards.py`, the one place
advantages are computed). The scalar ablation (`judge.reward_mode: scalar`) puts the rubric grade in place of
the wins and trains with this same loss. This loss only sees the result, one number per trajectory, broadcast
over that trajectory's policy tokens:

    ratio_t         = exp(logp_t − old_logp_t)
    pg_loss1_t      = −A · ratio_t
    pg_loss2_t      = −A · clip(ratio_t, 1 − ε, 1 + ε)
    pg_loss_t       = max(pg_loss1_t, pg_loss2_t)                     (pessimistic bound, Schulman et al. 2017)
    kl_t (k3)       = exp(ref_t − logp_t) − (ref_t − logp_t) − 1      (http://joschu.net/blog/kl-approx.html)
    loss            = agg(pg_loss_t + β_KL · kl_t)                    (token- or sequence-level, see aggregation)

Tool observations and prompt tokens have mask 0 and never contribute.
"""

from __future__ import annotations

import torch

from mosaic_ray.algorithms.aggregation import aggregate, masked_mean
from mosaic_ray.algorithms.registry import register_loss


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π ‖ π_ref): unbiased, always ≥ 0. (B, T) → (B, T)."""
    log_ratio = ref_logp - logp                                         # (B, T)
    return torch.exp(log_ratio) - log_ratio - 1.0


@register_loss("mosaic_grpo")
def mosaic_grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, cfg, *,
                     ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                     norm: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Preference-GRPO: the clipped surrogate with the judge's group advantages.

    logp, old_logp, mask, ref_logp, entropy: (B, T); adv: (B,). cfg needs clip_eps, kl_coef, loss_agg.
    """
    mask = mask.to(logp.dtype)
    adv_t = adv.to(logp.dtype).unsqueeze(-1)                            # (B, 1), broadcast over tokens
    log_ratio = (logp - old_logp) * mask                                # (B, T); 0 off-policy-token
    ratio = torch.exp(log_ratio)                                        # (B, T)
    pg_loss1 = -adv_t * ratio                                           # (B, T)
    pg_loss2 = -adv_t * torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    pg_loss = torch.maximum(pg_loss1, pg_loss2)                         # (B, T)
    per_token = pg_loss
    metrics: dict[str, float] = {}
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp (reference log-probs per token); got None")
        kl = kl_k3(logp, ref_logp)                                      # (B, T)
        per_token = per_token + cfg.kl_coef * kl
        metrics["kl_ref"] = float(masked_mean(kl.detach(), mask))
    loss = aggregate(per_token, mask, cfg.loss_agg, norm)
    with torch.no_grad():
        metrics["pg_loss"] = float(masked_mean(pg_loss, mask))
        metrics["clipfrac"] = float(masked_mean((pg_loss2 > pg_loss1).to(logp.dtype), mask))
        metrics["approx_kl_old"] = float(masked_mean(kl_k3(logp, old_logp), mask))   # k3 of π vs behaviour
        metrics["ratio_mean"] = float(masked_mean(ratio, mask))
        if entropy is not None:
            metrics["entropy"] = float(masked_mean(entropy, mask))
    return loss, metrics
