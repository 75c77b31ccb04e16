"""Uniform allocation: every layer gets the model-wide target (sparsity or bits)."""

from ciuic_lab.compress.policies import LayerProfile, register


@register("prune", "uniform")
@register("quant", "uniform")
class Uniform:
    def allocate(self, profiles: list[LayerProfile], target: float, **_) -> dict[str, float]:
        return {p.name: target for p in profiles}
