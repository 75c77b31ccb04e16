"""Statistics that forward hooks accumulate over calibration tokens, per linear layer.

hessian:  H = Σ x xᵀ over tokens (in, in), float32 — for OBS-style methods and exact
          output-error measurement ‖ΔW X‖² = tr(ΔW H ΔWᵀ).
act_norm: Σ x_j² per input column (in,) — Wanda's ‖x_j‖², and a diagonal error proxy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LayerStats:
    def __init__(self, in_features: int, hessian: bool, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.hessian = (torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
                        if hessian else None)

    def add_batch(self, x: torch.Tensor) -> None:
        """x: (..., in) inputs of the layer."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sq_norm += (x * x).sum(0)
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)

    @property
    def act_norm(self) -> torch.Tensor:
        return self.sq_norm.sqrt()


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, stats: LayerStats | None) -> float:
    """‖(W − Ŵ) X‖_F / ‖W X‖_F on the calibration inputs.

    Exact with a Hessian; with only column norms it uses the diagonal of H (a proxy); with no
    statistics it is the plain weight-space Frobenius ratio.
    """
    d = (w - w_hat).float()
    w = w.float()
    if stats is not None and stats.hessian is not None:
        h = stats.hessian
        num, den = ((d @ h) * d).sum(), ((w @ h) * w).sum()
    elif stats is not None and stats.tokens:
        col = stats.sq_norm
        num, den = (d * d * col).sum(), (w * w * col).sum()
    else:
        num, den = (d * d).sum(), (w * w).sum()
    return float((num.clamp(min=0) / den.clamp(min=1e-30)).sqrt())


def require_hessian(stats: LayerStats | None, method: str) -> torch.Tensor:
    """The layer's Hessian, or a clear error: the pipeline collects it for methods whose
    `needs` include "hessian"."""
    if stats is None or stats.hessian is None:
        raise ValueError(f"{method} needs the layer's Hessian XᵀX (calibration statistics with "
                         f"hessian=True); the pipeline collects it from the method's `needs`")
    return stats.hessian


def damped_cholesky(h: torch.Tensor, percdamp: float, floor: float,
                    then: Callable[[torch.Tensor], torch.Tensor | None] = lambda lower: lower,
                    attempts: int = 8) -> torch.Tensor:
    """then(L) for L the lower Cholesky factor of H + λI, λ = frac · mean(diag H).

    frac starts at `percdamp` and grows tenfold (to at least `floor`) until the factorisation
    succeeds and `then` returns a finite result (None from `then` means it failed too): XᵀX of
    calibration inputs is often singular in float32, and a small damping is the usual remedy
    (GPTQ, arXiv 2210.17323, §4). Computed in h's dtype.
    """
    diag = torch.diagonal(h)
    mean = diag.mean() if bool((diag > 0).any()) else torch.ones((), dtype=h.dtype, device=h.device)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    frac = float(percdamp)
    for _ in range(attempts):
        lower, info = torch.linalg.cholesky_ex(h + frac * mean * eye)
        if int(info) == 0:
            out = then(lower)
            if out is not None and bool(torch.isfinite(out).all()):
                return out
        frac = max(frac * 10, floor)
    raise RuntimeError("XᵀX is not positive definite even with heavy damping")


def stats_of(x: torch.Tensor, hessian: bool, rows: int = 4096) -> LayerStats:
    """Statistics of the rows of x (tokens, in), accumulated a bounded slice at a time."""
    st = LayerStats(x.shape[-1], hessian, x.device)
    for start in range(0, x.shape[0], rows):  # bounded temporaries for large token counts
        st.add_batch(x[start:start + rows])
    return st
