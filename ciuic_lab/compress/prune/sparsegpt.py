"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, arXiv 2301.00774).

Columns are visited left to right. Pruning weight w of column j costs w² / [H_F⁻¹]_jj in output
error (Optimal Brain Surgeon), where H_F⁻¹ is the inverse Hessian of the columns still free;
that diagonal is U_jj² for U the upper Cholesky factor of (XXᵀ + λI)⁻¹, and U's row j is the
optimal update of the free columns that compensates the removal (§3, Algorithm 1). The mask is
chosen adaptively per block of columns on the weights as earlier updates left them: the lowest
scores over the block's rows × columns (unstructured), or the M − N lowest of every M columns
(N:M). Updates to later blocks are applied lazily, one matrix product per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ciuic_lab.compress.base import PruneMethod
from ciuic_lab.compress.prune.masks import topk_mask
from ciuic_lab.compress.quant.gptq import inverse_hessian_cholesky
from ciuic_lab.compress.stats import require_hessian


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune w (out, in) for inputs with Hessian h = Σ x xᵀ (in, in).

    Unstructured: exactly round((1 − sparsity)·numel) weights are kept in all (each block keeps
    its share, rounded cumulatively). N:M: N of every M consecutive inputs per row.
    Returns (updated weights, zeros where pruned; kept-entry mask bool), both (out, in).
    """
    rows, cols = w.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"N:M pattern {n}:{m} needs the input dim divisible by {m}, got {cols}")
        # For N:M the blocksize only batches updates (it cannot change the result), so it is
        # rounded to whole groups of M rather than letting a group straddle two blocks.
        blocksize = max(m, blocksize // m * m)
    W = w.detach().float().clone()
    u, dead = inverse_hessian_cholesky(h.to(W.device), percdamp)
    W[:, dead] = 0  # inputs never active cost nothing to prune: score 0, pruned first
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    kept = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = u[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        err1 = torch.zeros_like(W1)
        if nm is None:
            quota = round((1.0 - sparsity) * rows * i2) - kept
            keep1 = topk_mask(W1.pow(2) / d.pow(2), max(0, min(quota, W1.numel())))
            kept += int(keep1.sum())
        else:
            keep1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % m == 0:
                score = W1[:, i:i + m].pow(2) / d[i:i + m].pow(2)
                keep1[:, i:i + m].scatter_(1, score.topk(n, dim=1).indices, True)
            col = W1[:, i]
            q = col * keep1[:, i]
            e = (col - q) / d[i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q  # exactly zero where pruned, not zero up to rounding
            err1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ u[i1:i2, i2:]
        mask[:, i1:i2] = keep1
    return W, mask


@dataclass
class SparseGPT(PruneMethod):
    """SparseGPT (arXiv 2301.00774): sets the mask and the reconstructed kept weights."""

    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        self._check_hessian_knobs()

    def apply(self, state, stats, budget) -> None:
        h = require_hessian(stats, "SparseGPT")
        w = self.to_prune(state)
        base, mask = sparsegpt_prune(w, h, float(budget), self.nm, self.blocksize, self.percdamp)
        state.base, state.mask, state.nm, state.quant = base, mask, self.nm, None
        state.info["sparsity"] = 1.0 - mask.float().mean().item()
