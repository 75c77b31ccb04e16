"""Wanda: pruning by weights and activations (Sun et al., arXiv 2306.11695).

The score of a weight is |W_ij| · ‖X_j‖₂, its contribution to the output scaled by how large its
input really is, so that the few outlier features of LLM activations keep their weights. The
paper compares scores within each output row (each output keeps the same number of inputs),
which it finds better than a layer-wide comparison for LLMs (§3, "comparison group"); N:M
compares within each group of M inputs of a row. No weight update, no Hessian: one pass of
column norms is all it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ciuic_lab.compress.base import PruneMethod
from ciuic_lab.compress.prune.masks import mask_from_scores


def wanda_scores(w: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖x_j‖ for w (out, in) and the inputs' column norms act_norm (in,)."""
    return w.abs() * act_norm.to(w)[None, :]


def row_mask_from_scores(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the round((1 − sparsity)·in) highest scores of every row; bool (out, in)."""
    n_keep = round((1.0 - sparsity) * scores.shape[1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_keep:
        mask.scatter_(1, scores.topk(n_keep, dim=1).indices, True)
    return mask


@dataclass
class Wanda(PruneMethod):
    """Wanda (arXiv 2306.11695): per-row unstructured or N:M masks from |W|·‖x‖."""

    needs: ClassVar[frozenset[str]] = frozenset({"act_norm"})

    def scores(self, w, stats):
        if stats is None:
            raise ValueError("Wanda needs calibration statistics (input column norms)")
        if stats.tokens == 0:
            # A layer no calibration token reached (a routed expert never chosen): nothing
            # is known about its inputs, so all inputs count the same and |W| decides.
            return w.abs()
        return wanda_scores(w, stats.act_norm)

    def apply(self, state, stats, budget) -> None:
        w = self.to_prune(state)
        scores = self.scores(w, stats)
        mask = (mask_from_scores(scores, 0.0, self.nm) if self.nm
                else row_mask_from_scores(scores, float(budget)))
        state.base, state.mask, state.nm, state.quant = w, mask, self.nm, None
        state.info["sparsity"] = 1.0 - mask.float().mean().item()
