"""Masks from importance scores: unstructured (exact count per layer) and N:M (per group)."""

from __future__ import annotations

import torch


def mask_from_scores(scores: torch.Tensor, sparsity: float,
                     nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep the highest-scoring weights.

    scores: (out, in); unstructured keeps exactly round((1 − sparsity)·numel) of the layer;
    N:M keeps the top N of every M consecutive inputs (in must be divisible by M).
    Returns a bool mask of the same shape.
    """
    out, cols = scores.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"N:M pattern {n}:{m} needs the input dim divisible by {m}, got {cols}")
        g = scores.reshape(out, cols // m, m)
        keep = g.topk(n, dim=-1).indices
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
        return mask.view(out, cols)
    return topk_mask(scores, round((1.0 - sparsity) * scores.numel()))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shaped like `scores`) of its k highest entries, over all of them."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[scores.reshape(-1).topk(k).indices] = True
    return mask.view_as(scores)
