"""Trajectory DPO on the pair dataset (offline baseline, Rafailov et al. 2023).

Rows come in pairs: row 2k is the chosen trajectory, row 2k+1 the rejected one. A trajectory's log-prob is the
sum over its policy tokens only (tool observations masked), so multi-turn trajectories compare what the policy
itself wrote:

    s_c = Σ_t mask·(logp − ref_logp) on chosen,  s_r = the same on rejected
    logits_k = β · (s_c − s_r)
    loss = Σ_k w_k · −log σ(logits_k) / N_pairs

`adv` carries the pair weight w_k on both rows of pair k (1 by default; the judge may give ties less weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mosaic_ray.algorithms.registry import register_loss


@register_loss("dpo")
def dpo_loss(logp, old_logp, adv, mask, cfg, *, ref_logp=None, entropy=None, norm=None):
    """logp, ref_logp, mask: (2P, T) with chosen/rejected interleaved; adv: (2P,) pair weights. old_logp unused."""
    if ref_logp is None:
        raise ValueError("dpo needs ref_logp (reference log-probs of both trajectories); got None")
    if logp.shape[0] % 2:
        raise ValueError(f"dpo expects an even number of rows (chosen, rejected pairs), got {logp.shape[0]}")
    mask = mask.to(logp.dtype)
    seq_logratio = ((logp - ref_logp) * mask).sum(-1)                   # (2P,)
    chosen, rejected = seq_logratio[0::2], seq_logratio[1::2]          # (P,), (P,)
    weight = adv[0::2].to(logp.dtype)                                   # (P,)
    logits = cfg.dpo_beta * (chosen - rejected)                         # (P,)
    per_pair = -F.logsigmoid(logits) * weight                           # (P,)
    denom = float(norm) if norm is not None else float(per_pair.shape[0])
    loss = per_pair.sum() / max(denom, 1.0)
    with torch.no_grad():
        metrics = {
            "dpo_loss": float(per_pair.mean()) if per_pair.numel() else 0.0,
            "reward_accuracy": float((logits > 0).float().mean()) if logits.numel() else 0.0,
            "reward_margin": float(logits.mean() / cfg.dpo_beta) if logits.numel() else 0.0,
        }
        if entropy is not None:
            metrics["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1.0))
    return loss, metrics
