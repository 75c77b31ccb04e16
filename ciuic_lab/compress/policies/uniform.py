"""Uniform allocation: every layer gets the model-wide target (sparsity or bits)."""

import math
from dataclasses import dataclass

from ciuic_lab.compress.policies import LayerProfile, PolicyBase, register


@register("prune", "uniform")
@dataclass(kw_only=True)
class Uniform(PolicyBase):
    def allocate(self, profiles: list[LayerProfile], target: float) -> dict[str, float]:
        return {p.name: target for p in profiles}


@register("quant", "uniform")
@dataclass(kw_only=True)
class UniformBits(PolicyBase):
    """Every layer at `target` bits; a fractional mean (quant.avg_bits=3.5) is met blind to
    sensitivity: layers in walk order take the higher width until the parameter-weighted mean
    would pass the target, the rest the lower one. The baseline that sensitivity allocation must
    beat at equal mean bits."""

    def allocate(self, profiles: list[LayerProfile], target: float) -> dict[str, int]:
        lo, hi = math.floor(target), math.ceil(target)
        if lo == hi:
            return {p.name: int(lo) for p in profiles}
        budget = (target - lo) * sum(p.params for p in profiles)  # bit·params above `lo`
        out = {}
        for p in profiles:
            take = p.params * (hi - lo) <= budget + 1e-9
            budget -= p.params * (hi - lo) if take else 0
            out[p.name] = hi if take else lo
        return out
