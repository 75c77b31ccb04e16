"""Depth-linear sparsity: later blocks pruned more, a linear ramp over depth.

Motivated by the observation that deeper LLM layers are more redundant (e.g. Gromov et al.,
"The Unreasonable Ineffectiveness of the Deeper Layers", arXiv 2403.17887). s_i = S + ramp·(d_i − d̄),
d_i = block / (L − 1), shifted so that the parameter-weighted mean is exactly S.
"""

from dataclasses import dataclass

import torch

from ciuic_lab.compress.policies import LayerProfile, PolicyBase, is_number, register
from ciuic_lab.compress.policies._mean import meet_mean


@register("prune", "depth_linear")
@dataclass(kw_only=True)
class DepthLinear(PolicyBase):
    ramp: float = 0.2  # last block's sparsity minus the first's (negative: earlier pruned more)

    def __post_init__(self):
        # Sparsities live in [0, 1): a wider ramp would only be clipped away.
        self.check(is_number(self.ramp) and -1.0 <= self.ramp <= 1.0, "ramp",
                   f"must be a number in [-1, 1], got {self.ramp!r}")

    def allocate(self, profiles: list[LayerProfile], target: float) -> dict:
        ramp = self.ramp
        last = max(p.block for p in profiles) or 1
        depth = torch.tensor([p.block / last for p in profiles])
        w = torch.tensor([float(p.params) for p in profiles])
        s = meet_mean(target + ramp * (depth - 0.5), w, target, 0.0, 0.99)
        return {p.name: float(v) for p, v in zip(profiles, s)}
