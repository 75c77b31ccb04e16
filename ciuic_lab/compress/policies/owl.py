"""OWL: outlier-weighted layerwise sparsity (Yin et al., arXiv 2310.05175).

Per block, the layerwise outlier distribution D = share of Wanda scores |W_ij|·‖x_j‖ above
M × their block mean (M = `owl_m`, 5 in the paper). Blocks with more outliers are pruned less:
s_l = S − λ·(2·D̃_l − 1) with D̃ the min-max normalised D (so s ∈ [S−λ, S+λ], λ = `owl_lambda`),
then shifted (within the same bounds) so that the parameter-weighted mean is exactly S. Needs the profile pass's
activation norms (`needs()`: act_norm).
"""

from dataclasses import dataclass

import torch

from ciuic_lab.compress.policies import LayerProfile, PolicyBase, is_number, register
from ciuic_lab.compress.policies._mean import meet_mean


def outlier_ratio(pairs, m: float) -> float:
    """Share of a block's Wanda scores |W_ij|·a_j above m × the block's mean score.

    `pairs()` yields (weight, input RMS) for each of the block's layers; it is called twice (the
    mean first, then the count), so no more than one layer's scores exist at a time.
    """
    total, count = 0.0, 0
    for w, a in pairs():
        total += float((w.float().abs() * a.to(w.device).float()[None, :]).sum())
        count += w.numel()
    threshold = m * total / max(count, 1)
    above = sum(int((w.float().abs() * a.to(w.device).float()[None, :] > threshold).sum())
                for w, a in pairs())
    return above / max(count, 1)


@register("prune", "owl")
@dataclass(kw_only=True)
class OWL(PolicyBase):
    owl_lambda: float = 0.08  # layer sparsities within the goal ± lambda
    owl_m: float = 5.0  # an outlier is a score above M × its block's mean (the paper's M)

    def __post_init__(self):
        self.check(is_number(self.owl_lambda) and 0.0 <= self.owl_lambda < 1.0, "owl_lambda",
                   f"must be in [0, 1), got {self.owl_lambda!r}")
        # M <= 0 would count every score as an outlier, in every block alike.
        self.check(is_number(self.owl_m) and self.owl_m > 0, "owl_m",
                   f"must be a positive number, got {self.owl_m!r}")

    def needs(self) -> frozenset[str]:
        return frozenset({"act_norm"})

    def summarize(self, facts: dict, weight, stats) -> None:
        # RMS over the layer's own tokens, not the L2 norm: routed experts see only their share
        # of the tokens, and a smaller sum must not read as fewer outliers. (With every layer
        # seeing all tokens, as in the paper, the two differ by one constant.)
        facts["rms"] = (stats.sq_norm / max(stats.tokens, 1)).sqrt().cpu()

    def summarize_block(self, facts_by_layer: dict, weights) -> None:
        ratio = outlier_ratio(lambda: ((w, facts_by_layer[n]["rms"]) for n, w in weights()),
                              self.owl_m)
        for facts in facts_by_layer.values():
            facts["block_outlier_ratio"] = ratio

    def allocate(self, profiles: list[LayerProfile], target: float) -> dict:
        owl_lambda = self.owl_lambda
        blocks = sorted({p.block for p in profiles})
        ratio = {p.block: p.facts[self.stage]["block_outlier_ratio"] for p in profiles}
        d = torch.tensor([ratio[b] for b in blocks])
        span = float(d.max() - d.min())
        dn = (d - d.min()) / span if span > 0 else torch.full_like(d, 0.5)
        per_block = dict(zip(blocks, (target - owl_lambda * (2 * dn - 1)).tolist()))
        raw = torch.tensor([per_block[p.block] for p in profiles])
        w = torch.tensor([float(p.params) for p in profiles])
        # The shift that restores the mean stays inside [S − λ, S + λ], as the paper constrains.
        s = meet_mean(raw, w, target, max(0.0, target - owl_lambda), min(0.99, target + owl_lambda))
        return {p.name: float(v) for p, v in zip(profiles, s)}
