"""Bits per module kind, e.g. attention at 4 bits and MLP/experts at 3 (`quant.kind_bits`).

Kinds not in the map get `quant.bits`. The map is the simplest mixed-precision policy; the mean
bits it lands on are reported, not forced.
"""

from ciuic_lab.compress.policies import LayerProfile, register


@register("quant", "kind_map")
class KindMap:
    def allocate(self, profiles: list[LayerProfile], target: float, kind_bits=None, bits=None,
                 **_) -> dict:
        kind_bits = dict(kind_bits or {})
        default = int(bits if bits is not None else round(target))
        return {p.name: int(kind_bits.get(p.kind, default)) for p in profiles}
