"""Depth-linear sparsity: later blocks pruned more, a linear ramp over depth.

Motivated by the observation that deeper LLM layers are more redundant (e.g. Gromov et al.,
"The Unreasonable Ineffectiveness of the Deeper Layers", arXiv 2403.17887). s_i = S + ramp·(d_i − d̄),
d_i = block / (L − 1), shifted so that the parameter-weighted mean is exactly S.
"""

import torch

from ciuic_lab.compress.policies import LayerProfile, register
from ciuic_lab.compress.policies._mean import meet_mean


@register("prune", "depth_linear")
class DepthLinear:
    def allocate(self, profiles: list[LayerProfile], target: float, ramp: float = 0.2, **_) -> dict:
        last = max(p.block for p in profiles) or 1
        depth = torch.tensor([p.block / last for p in profiles])
        w = torch.tensor([float(p.params) for p in profiles])
        s = meet_mean(target + ramp * (depth - 0.5), w, target, 0.0, 0.99)
        return {p.name: float(v) for p, v in zip(profiles, s)}
