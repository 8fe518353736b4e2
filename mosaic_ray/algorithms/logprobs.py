"""Token log-probs as gather − logsumexp, chunked over positions.

The naive `log_softmax(logits).gather(...)` holds the (B, T, V) logits AND the (B, T, V) log-softmax — with a
152k vocabulary that is the largest tensor of the step, twice. Here the LM head is applied to chunks of
positions; each chunk's logits live only inside the chunk. When there is more than one chunk and gradients are
needed, each chunk runs under activation checkpointing, so backward recomputes the chunk's logits instead of
keeping all of them alive (the memory of one chunk, for the price of one extra LM-head matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, C, V), targets (B, C) → (token log-prob (B, C), entropy (B, C), detached). fp32 math."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)                                          # (B, C)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse              # (B, C)
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)                                      # (B, C, V), transient
        entropy = lse - (probs * logits).sum(-1)                                   # (B, C)
    return logp, entropy


def _chunk(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logprobs_from_logits(head(hidden), targets)


def chunked_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                     chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, T, H) from the model body, head = LM head, targets (B, T) → (logp (B, T), entropy (B, T))."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 (learner.logprob_chunk_size), got {chunk_size}")
    T = hidden.shape[1]
    if T <= chunk_size:
        return _chunk(hidden, head, targets)
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    logps, ents = [], []
    for start in range(0, T, chunk_size):
        h, y = hidden[:, start:start + chunk_size], targets[:, start:start + chunk_size]
        lp, ent = checkpoint(_chunk, h, head, y, use_reentrant=False) if recompute else _chunk(h, head, y)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps, dim=1), torch.cat(ents, dim=1)


def reference_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The textbook version (log_softmax + gather); tests check the chunked path against it."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
