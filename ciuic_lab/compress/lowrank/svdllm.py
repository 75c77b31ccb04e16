"""SVD-LLM: truncation-aware data whitening (Wang et al., arXiv 2403.07378).

Plain SVD truncates the directions of W with the least weight energy, whatever the inputs. What
matters is the output error ‖(W − W')X‖_F. With S the Cholesky factor of XXᵀ (S Sᵀ = XXᵀ) that
error is ‖(W − W')S‖_F, so the best rank-r W' is the truncated SVD of W·S mapped back by S⁻¹:

    W S = U Σ Vᵀ,   U' = U_r √Σ_r,   V' = √Σ_r V_rᵀ S⁻¹,   error² = Σ_{i>r} σ_i²

and every truncated singular value is exactly the output error it costs (§3.1). XXᵀ is dampened
by λ = percdamp · mean(diag) to make it positive definite; this also puts a small ‖W − W'‖²
term in the objective for inputs the calibration set never exercised.

In residual mode the fitted target is W − base: the low-rank part corrects, in the activation
norm, the error the other stages left, which is LQER's idea (arXiv 2402.02446).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ciuic_lab.compress.base import LowRankMethod
from ciuic_lab.compress.policies.rank import rank_for
from ciuic_lab.compress.stats import damped_cholesky, require_hessian


def whitening(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Lower Cholesky factor S (in, in) float64 of H + λI, with h = Σ x xᵀ (in, in)."""
    # percdamp=0 on a rank-deficient XXᵀ: damp a little (floor 1e-8), enough to factorise.
    return damped_cholesky(h.double(), percdamp, 1e-8)


def whitened_svd(w: torch.Tensor, s: torch.Tensor):
    """SVD of W·S: (U, σ, Vᵀ) in float64; σ² are the output errors of truncating each."""
    return torch.linalg.svd(w.double() @ s, full_matrices=False)


def svdllm_factors(u: torch.Tensor, sv: torch.Tensor, vh: torch.Tensor, s: torch.Tensor,
                   rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U' (out, r), V' (r, in) float32 from the SVD of W·S, with V' = √Σ_r V_rᵀ S⁻¹."""
    root = sv[:rank].sqrt()
    v = torch.linalg.solve_triangular(s, root[:, None] * vh[:rank], upper=False, left=False)
    return (u[:, :rank] * root).float(), v.float()


@dataclass
class SVDLLM(LowRankMethod):
    """Activation-aware truncated SVD (arXiv 2403.07378); ranks from the spectrum of W·S."""

    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})
    percdamp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        self._check_hessian_knobs()

    def apply(self, state, stats, budget) -> None:
        h = require_hessian(stats, "SVD-LLM")
        target = self.to_fit(state)
        s = whitening(h.to(target.device), self.percdamp)
        u, sv, vh = whitened_svd(target, s)
        r = rank_for(tuple(target.shape), sv, budget)
        self.finish(state, *svdllm_factors(u, sv, vh, s, r))
