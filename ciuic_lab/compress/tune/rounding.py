"""Learned rounding and clipping inside a packed layer's format: the maths of `tune=block`.

SignRound (Cheng et al., arXiv 2309.05516) learns, per quantised weight, an offset V ∈ [−½, ½]
added before rounding, and per group a clip factor α on the grid's scale, by signed gradient
descent on a block's output error; OmniQuant's learnable weight clipping (arXiv 2308.13137) is
the same idea for α. Here the same is done on every part a stage left in a LayerState:

    base, quantised   W = M ⊙ s·α·(clamp(⌊o/(s·α) + V⌉ + z, 0, 2^k−1) − z)      (V, α learned)
    base, 16-bit      W = M ⊙ B                                                   (B learned)
    low-rank          + U·V  (k-bit factors: fake-quantised on a per-row grid)    (U, V learned)

`o` is what the stage rounded (`QuantPart.origin`: GPTQ's error-compensated columns), so V = 0
and α = 1 reproduce the stage's codes exactly: tuning starts from the stage's solution
(`tune.start=stage`). `tune.start=rtn` instead starts from round-to-nearest of the unrounded base
on a grid refitted to it, as SignRound does: GPTQ's error feedback solves a layer-wise problem
whose compensated columns can sit far from what the block-output objective wants (measured on
SmolLM2 3-bit: tuned from GPTQ 46.9, tuned from RTN 36.9). ⌊·⌉ passes gradients straight through (the STE of both papers). The mask M,
the width k, the group size and the rank are never touched, so the packed bytes do not change.

Memory: per tuned layer the origin, V and their gradients, float32 (out, in) each: one block's
worth (DeepSeek-V3 attention: ~190 M weights → ~3 GB), or one routed expert's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ciuic_lab.compress.quant import grid
from ciuic_lab.compress.state import LayerState, QuantPart, rtn_quantize

CLIP = (0.5, 1.25)  # range of the learned scale factor α: clip up to half, widen a quarter


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """x on the grid a re-quantisation at this width would give it now, refitted to x's current
    range (tuned factors move); rounding passes gradients. `grid.fit_grid` already rounds the
    scale to its stored fp16 value, so this is what packing the factors would store."""
    with torch.no_grad():
        scale, zero = grid.fit_grid(x, bits, group_size, sym)
    s = grid.expand_groups(scale, x.shape[1], group_size)
    z = grid.expand_groups(zero, x.shape[1], group_size)
    return (torch.clamp(round_ste(x / s) + z, 0, 2**bits - 1) - z) * s


def _fake(x: torch.Tensor, q: QuantPart | None) -> torch.Tensor:
    return x if q is None else fake_quant(x, q.bits, q.group_size, q.sym)


class TunableLinear(nn.Module):
    """Stands in for one packed layer while its block is tuned: the same weight as the packed
    layer at the start (V = 0, α = 1), differentiable in what tuning may change.

    `rounding` / `clip` are updated by signed gradient descent (SignRound), `continuous` (16-bit
    kept values, low-rank factors) by Adam; see `compress/tune/block.py`.
    """

    def __init__(self, state: LayerState, start: str = "stage"):
        super().__init__()
        self.state = state
        self.rounding = nn.ParameterList()  # V, one (out, in)
        self.clip = nn.ParameterList()  # α, one (out, G)
        self.continuous = nn.ParameterList()
        q = state.quant
        if state.base is not None and q is not None:
            if start == "rtn":  # the unrounded base on a grid fitted to it (as SignRound starts)
                fresh = rtn_quantize(state.base, q.bits, q.group_size, q.sym, state.mask)
                origin, scale, zero = state.base, fresh.scale, fresh.zero
            else:  # the stage's own rounding problem: V = 0 gives back its codes
                origin = q.origin if q.origin is not None else state.base
                scale, zero = q.scale, q.zero
            self.register_buffer("origin", origin.float(), persistent=False)
            self.register_buffer("scale0", scale.float(), persistent=False)
            self.register_buffer("zero0", zero.float(), persistent=False)
            self.v = nn.Parameter(torch.zeros_like(self.origin))
            self.alpha = nn.Parameter(torch.ones_like(self.scale0))
            self.rounding.append(self.v)
            self.clip.append(self.alpha)
        elif state.base is not None:
            self.values = nn.Parameter(state.base.float().clone())
            self.continuous.append(self.values)
        if state.u is not None:
            self.u = nn.Parameter(state.u.float().clone())
            self.vf = nn.Parameter(state.v.float().clone())
            self.continuous.extend([self.u, self.vf])

    # ---- the weight ----------------------------------------------------------------------
    def _scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.state.quant
        cols = self.origin.shape[1]
        s = grid.expand_groups(self.scale0 * self.alpha, cols, q.group_size)
        return s, grid.expand_groups(self.zero0, cols, q.group_size)

    def base_weight(self) -> torch.Tensor | None:
        st = self.state
        if st.base is None:
            return None
        if st.quant is not None:
            s, z = self._scale_zero()
            codes = torch.clamp(round_ste(self.origin / s + self.v) + z, 0, 2**st.quant.bits - 1)
            w = (codes - z) * s
        else:
            w = self.values
        return w if st.mask is None else w * st.mask

    def lowrank_weight(self) -> torch.Tensor | None:
        st = self.state
        if st.u is None:
            return None
        u = _fake(self.u, st.u_quant)
        v = _fake(self.vf, st.v_quant)
        return u @ v

    def weight(self) -> torch.Tensor:
        parts = [w for w in (self.base_weight(), self.lowrank_weight()) if w is not None]
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.state.bias is None else self.state.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), b)

    # ---- after tuning --------------------------------------------------------------------
    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep V and α inside their ranges after a step."""
        for v in self.rounding:
            v.clamp_(-0.5, 0.5)
        for a in self.clip:
            a.clamp_(*CLIP)

    @torch.no_grad()
    def tuned_state(self) -> LayerState:
        """A new LayerState holding the tuned parts in the stage's formats (same mask, width,
        group size, rank): what `CompressedLinear.pack` stores."""
        st = self.state
        new = LayerState(weight=st.weight, bias=st.bias, base=st.base, mask=st.mask, nm=st.nm,
                         quant=st.quant, u=st.u, v=st.v, u_quant=st.u_quant,
                         v_quant=st.v_quant, info=dict(st.info))
        q = st.quant
        if st.base is not None and q is not None:
            # the scale is stored in fp16: round it first, then fit the codes to the stored value
            scale = grid.stored_scale(self.scale0 * self.alpha)
            s = grid.expand_groups(scale, q.codes.shape[1], q.group_size)
            z = grid.expand_groups(self.zero0, q.codes.shape[1], q.group_size)
            codes = torch.clamp(torch.round(self.origin / s + self.v) + z, 0, 2**q.bits - 1)
            if st.mask is not None:  # pruned entries keep the code of 0, as the stages leave it
                codes = torch.where(st.mask, codes, z)
            new.quant = QuantPart(codes.to(torch.int32), scale, self.zero0.clone(), q.bits,
                                  q.group_size, q.sym)
        elif st.base is not None:
            new.base = self.values.detach().clone()
        if st.u is not None:
            new.u, new.v = self.u.detach().clone(), self.vf.detach().clone()
            if st.u_quant is not None:
                new.u_quant = rtn_quantize(new.u, st.u_quant.bits, st.u_quant.group_size,
                                           st.u_quant.sym)
            if st.v_quant is not None:
                new.v_quant = rtn_quantize(new.v, st.v_quant.bits, st.v_quant.group_size,
                                           st.v_quant.sym)
        return new
