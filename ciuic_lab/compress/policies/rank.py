"""Per-layer rank rules: fixed rank, parameter ratio, spectral energy.

The rule is chosen per model; the rank itself depends on the spectrum of the matrix being
factorised, known only when the layer is compressed, so `rank_for` runs inside the walk.
"""

from __future__ import annotations

import torch

from ciuic_lab.compress.policies import LayerProfile, register


def rank_for(shape: tuple[int, int], singular_values: torch.Tensor, rule: dict) -> int:
    """Rank for an (out, in) matrix with spectrum σ (descending) under a rule.

    ratio:  U·V keeps `ratio` of the dense parameters: r (out + in) <= ratio · out · in.
    energy: smallest r with Σ_{i<r} σ_i² >= energy · Σ σ_i².
    rank:   a fixed rank.
    Always clipped to [1, min(out, in)].
    """
    out, cols = shape
    full = min(out, cols)
    if rule["rule"] == "ratio":
        r = int(rule["ratio"] * out * cols // (out + cols))
    elif rule["rule"] == "energy":
        e = singular_values.double() ** 2
        total = e.sum()
        if total <= 0:
            return 1
        cum = torch.cumsum(e, 0) / total
        r = int(torch.searchsorted(cum, torch.tensor(rule["energy"], dtype=cum.dtype) - 1e-12)) + 1
    else:
        r = int(rule["rank"])
    return max(1, min(full, r))


@register("lowrank", "rank")
class PerLayerRule:
    def allocate(self, profiles: list[LayerProfile], target: dict) -> dict[str, dict]:
        return {p.name: dict(target) for p in profiles}
