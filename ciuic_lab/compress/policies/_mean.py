"""Shift per-layer values so their parameter-weighted mean meets a target exactly, within bounds."""

from __future__ import annotations

import torch


def meet_mean(raw: torch.Tensor, weights: torch.Tensor, target: float, lo: float, hi: float,
              iters: int = 100) -> torch.Tensor:
    """clip(raw + c, lo, hi) with c found by bisection so that Σ w·v / Σ w == target.

    Clipping alone would move the mean; the shift c restores it (monotone in c, so bisection).
    """
    raw, w = raw.double(), weights.double()
    target = min(max(target, lo), hi)

    def mean(c):
        return float((torch.clamp(raw + c, lo, hi) * w).sum() / w.sum())

    a, b = lo - float(raw.max()), hi - float(raw.min())
    for _ in range(iters):
        mid = (a + b) / 2
        if mean(mid) < target:
            a = mid
        else:
            b = mid
    return torch.clamp(raw + (a + b) / 2, lo, hi)
