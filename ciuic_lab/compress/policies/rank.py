"""Per-layer rank rules: fixed rank, parameter ratio, spectral energy.

The rule is chosen per model; the rank itself depends on the spectrum of the matrix being
factorised, known only when the layer is compressed, so `rank_for` runs inside the walk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ciuic_lab.compress.policies import LayerProfile, PolicyBase, register


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
@dataclass(kw_only=True)
class PerLayerRule(PolicyBase):
    def allocate(self, profiles: list[LayerProfile], target: dict) -> dict[str, dict]:
        return {p.name: dict(target) for p in profiles}


def greedy_ranks(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], budget: int) -> list[int]:
    """Ranks maximising kept Σσ² under Σ r_l (out_l + in_l) <= budget (parameters).

    Each rank-one term of layer l costs out_l + in_l parameters and gains σ²; taking terms in
    order of gain per parameter is optimal for this fractional-knapsack-like problem because each
    layer's gains are non-increasing in r. Every layer keeps at least rank 1.
    """
    cost = [o + i for o, i in shapes]
    ranks = [1] * len(shapes)
    left = budget - sum(cost)
    cand = []
    for li, s in enumerate(spectra):
        e = s.double() ** 2
        for r in range(1, min(shapes[li])):
            cand.append((float(e[r]) / cost[li], li))
    cand.sort(key=lambda t: -t[0])
    for _, li in cand:  # gains within a layer are already in order, so this takes prefixes
        if cost[li] <= left:
            ranks[li] += 1
            left -= cost[li]
    return ranks


@register("lowrank", "global")
@dataclass(kw_only=True)
class GlobalBudget(PolicyBase):
    """One parameter budget for the whole model (`lowrank.ratio` of all compressible parameters),
    spread over layers by singular-value gain of their dense weights (see greedy_ranks)."""

    def needs(self) -> frozenset[str]:
        return frozenset({"weight"})

    def summarize(self, facts: dict, weight, stats) -> None:
        facts["spectrum"] = torch.linalg.svdvals(weight.double().cpu())

    def allocate(self, profiles: list[LayerProfile], target: dict) -> dict[str, dict]:
        spectra = [p.facts[self.stage]["spectrum"] for p in profiles]
        budget = int(target["ratio"] * sum(p.params for p in profiles))
        ranks = greedy_ranks(spectra, [p.shape for p in profiles], budget)
        return {p.name: {"rule": "rank", "rank": r} for p, r in zip(profiles, ranks)}
