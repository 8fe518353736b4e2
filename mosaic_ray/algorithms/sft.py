"""SFT for the warm start: cross-entropy on assistant tokens only.

    loss = Σ_{b,t} mask·(−logp) / N_tokens

The mask comes from the chat template's generation markers (`return_assistant_tokens_mask`), so system,
user and tool-response tokens never contribute. Always token-level: every demonstrated token weighs the same.
"""

from __future__ import annotations

import torch

from mosaic_ray.algorithms.aggregation import aggregate, masked_mean
from mosaic_ray.algorithms.registry import register_loss


@register_loss("sft")
def sft_loss(logp, old_logp, adv, mask, cfg, *, ref_logp=None, entropy=None, norm=None):
    """logp, mask: (B, T). old_logp, adv and ref_logp are unused."""
    nll = -logp                                                          # (B, T)
    loss = aggregate(nll, mask, "token", norm)
    with torch.no_grad():
        metrics = {"nll": float(masked_mean(nll, mask))}
        if entropy is not None:
            metrics["entropy"] = float(masked_mean(entropy, mask))
    return loss, metrics
