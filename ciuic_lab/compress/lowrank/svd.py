"""Truncated SVD low-rank factorisation (Eckart–Young: the best rank-r Frobenius approximation).

As used for LLM compression by e.g. ASVD (arXiv 2312.05821) and SVD-LLM (arXiv 2403.07378) as the
plain baseline. The singular values are split evenly between the factors (U√Σ, √ΣVᵀ) so both have
similar ranges, which matters when they are quantised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ciuic_lab.compress.base import LowRankMethod
from ciuic_lab.compress.policies.rank import rank_for


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) ≈ U (out, r) @ V (r, in)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


@dataclass
class SVD(LowRankMethod):
    def apply(self, state, stats, budget) -> None:
        target = self.to_fit(state)
        sv = torch.linalg.svdvals(target.double())
        r = rank_for(tuple(target.shape), sv, budget)
        u, v = svd_factors(target, r)
        self.finish(state, u, v)
