"""Bits per module kind, e.g. attention at 4 bits and MLP/experts at 3 (`quant.kind_bits`).

Kinds not in the map get `quant.bits`. The map is the simplest mixed-precision policy; the mean
bits it lands on are reported, not forced.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from ciuic_lab.compress.policies import LayerProfile, PolicyBase, register


@register("quant", "kind_map")
@dataclass(kw_only=True)
class KindMap(PolicyBase):
    bits: int  # quant.bits (the method's, checked there): kinds the map leaves out
    kind_bits: dict | None = None  # {attn: 4, mlp: 3, shared_expert: 4, expert: 3}

    def __post_init__(self):
        self.check(self.kind_bits is None or isinstance(self.kind_bits, Mapping), "kind_bits",
                   f"must be a mapping {{kind: bits}} or null, got {self.kind_bits!r}")
        for kind, b in (self.kind_bits or {}).items():
            self.check(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8,
                       "kind_bits", f"{kind}: every width must be an integer in 2..8, got {b!r}")

    def allocate(self, profiles: list[LayerProfile], target: float) -> dict:
        kind_bits = dict(self.kind_bits or {})
        return {p.name: int(kind_bits.get(p.kind, self.bits)) for p in profiles}
