"""Reduce per-token losses to one scalar: token-level or sequence-level, with a global denominator.

- `token`    : Σ_{b,t} mask·x / N_tokens       (DAPO / TRL `dapo`: every policy token weighs the same,
                                                 so long refusal/tool chains are not down-weighted)
- `sequence` : Σ_b (Σ_t mask·x / n_b) / N_seqs  (original GRPO: every trajectory weighs the same)

`norm` is N_tokens or N_seqs of the WHOLE update (all micro-batches and ranks). When it is None the local
count is used (unit tests, single micro-batch). Denominators are clamped at 1 so an all-masked batch gives 0.
"""

from __future__ import annotations

from typing import Literal

import torch

AggMode = Literal["token", "sequence"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over mask-1 entries (x, mask: same shape); 0 when the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: AggMode, norm: float | None = None) -> torch.Tensor:
    """per_token, mask: (B, T) → scalar loss under `mode`, divided by the global `norm`."""
    mask = mask.to(per_token.dtype)
    if mode == "token":
        total = (per_token * mask).sum()                                   # ()
        denom = mask.sum() if norm is None else torch.tensor(float(norm))
    elif mode == "sequence":
        seq_tokens = mask.sum(dim=-1)                                      # (B,)
        seq_mean = (per_token * mask).sum(dim=-1) / seq_tokens.clamp(min=1.0)   # (B,)
        total = seq_mean.sum()
        denom = (seq_tokens > 0).sum() if norm is None else torch.tensor(float(norm))
    else:
        raise ValueError(f"loss aggregation {mode!r}: expected 'token' or 'sequence' (learner.loss_agg)")
    return total / denom.to(total.dtype).clamp(min=1.0)


def local_norm(mask: torch.Tensor, mode: AggMode) -> float:
    """The denominator `aggregate` would use for this mask alone (summed across micro-batches / ranks)."""
    if mode == "token":
        return float(mask.sum())
    return float((mask.sum(dim=-1) > 0).sum())
