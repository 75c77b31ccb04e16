"""LayerState: one layer's weight, unpacked, while the stages work on it; QuantPart, its codes.

    W ≈ dequant(Q) masked by M  +  U·V        (each part optional)

Stages (prune → lowrank → quant by default) edit a LayerState in float32; a packed format
(`compress/store/formats.py`) then stores it. Pure data and tensor maths: no modules, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ciuic_lab.compress.quant import grid


@dataclass
class QuantPart:
    """k-bit codes of a dense (out, in) matrix on a per-group grid (unpacked, int32)."""

    codes: torch.Tensor  # (out, in) int32
    scale: torch.Tensor  # (out, G) float32 (fp16-representable)
    zero: torch.Tensor  # (out, G) float32 integers
    bits: int
    group_size: int
    sym: bool
    # What the codes rounded: round(origin / scale) + zero = codes before clamping. GPTQ's
    # error feedback moves a column before rounding it, so its origin is not the weight; learned
    # rounding (compress/tune) starts from it so that an untouched offset reproduces the codes.
    # Working memory only, never packed (None: the codes rounded the base part itself).
    origin: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return grid.dequantize(self.codes, self.scale, self.zero, self.group_size)


def rtn_quantize(w, bits: int, group_size: int, sym: bool, mask=None) -> QuantPart:
    """Round-to-nearest onto the min/max grid of each (row, group)."""
    scale, zero = grid.fit_grid(w, bits, group_size, sym, mask)
    codes = grid.quantize(w, scale, zero, bits, group_size)
    return QuantPart(codes, scale, zero, bits, group_size, sym)


@dataclass
class LayerState:
    """One layer's weight while stages work on it (float32, unpacked).

    `base` is the sparse/quantised part (None once a factorize stage replaced it by U·V);
    `mask` marks its kept entries; `quant` holds its codes; `u`, `v` the low-rank part.
    """

    weight: torch.Tensor  # (out, in) the original weight, float32
    bias: torch.Tensor | None = None
    base: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    nm: tuple[int, int] | None = None
    quant: QuantPart | None = None
    u: torch.Tensor | None = None  # (out, r)
    v: torch.Tensor | None = None  # (r, in)
    u_quant: QuantPart | None = None
    v_quant: QuantPart | None = None
    info: dict = field(default_factory=dict)  # what each stage allocated, for the report

    @classmethod
    def from_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    name: str = "layer") -> LayerState:
        w = weight.detach().float().clone()
        # A non-finite weight would only surface later as "codes out of range" at packing.
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(f"{name}: the weight holds {bad} NaN/Inf value(s); the source "
                             "checkpoint is corrupted or was saved from a diverged model")
        return cls(weight=w, bias=None if bias is None else bias.detach().float().clone(),
                   base=w.clone())

    def base_weight(self) -> torch.Tensor:
        """Current value of the base part (zeros where pruned; dequantised if quantised)."""
        if self.base is None:
            return torch.zeros_like(self.weight)
        b = self.quant.dequantize() if self.quant is not None else self.base
        return b if self.mask is None else b * self.mask

    def lowrank_weight(self) -> torch.Tensor | None:
        if self.u is None:
            return None
        u = self.u_quant.dequantize() if self.u_quant is not None else self.u
        v = self.v_quant.dequantize() if self.v_quant is not None else self.v
        return u @ v

    def reconstruct(self) -> torch.Tensor:
        w = self.base_weight()
        lr = self.lowrank_weight()
        return w if lr is None else w + lr
