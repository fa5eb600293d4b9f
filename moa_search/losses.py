"""Response-masked losses: the cross-entropy of the answer tokens only.

The profiler differentiates it (the influence of every attention entry on the model's own
answer), the search's validation scorer and `moa eval` measure it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def response_losses(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked targets of each row.

    logits [B, T, V] predict targets [B, T]; mask [B, T] bool (True = a response token).
    Returns float32 [B].
    """
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         reduction="none").view(targets.shape)
    m = mask.float()
    return (ce * m).sum(-1) / m.sum(-1).clamp_min(1)


def response_loss(model, targets: torch.Tensor, response_start: int, reduction: str = "mean", **inputs):
    """Cross-entropy of ONE sequence's response tokens, computing only the logits that predict them.

    inputs: the model's inputs for the whole sequence (input_ids [1, n] or inputs_embeds [1, n, H],
    plus any model kwargs); targets: int64 [re - rs] = input_ids[rs:re]. Positions rs-1 .. re-2
    predict tokens rs .. re-1. Logits in float32 (float64 if the model computes in float64).
    """
    x = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
    logits = model(**inputs, logits_to_keep=x.shape[1] - response_start + 1).logits[0, : len(targets)]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, targets, reduction=reduction)


__all__ = ["response_losses", "response_loss"]
