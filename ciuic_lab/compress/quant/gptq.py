"""GPTQ: quantisation with second-order error feedback (Frantar et al., arXiv 2210.17323).

Minimises ‖(W − Ŵ) X‖² one column at a time: each column is rounded onto its grid and the
rounding error is spread over the columns not yet quantised through the inverse Hessian
H⁻¹ = (X Xᵀ + λI)⁻¹, whose upper Cholesky factor gives every step's update row at once (§4,
"Cholesky reformulation"). Updates are applied lazily per block of columns (§4, "lazy batch
updates") so that most of the work is one matrix product per block.

Groups: the grid of a group is fitted when its first column is reached, on the weights as the
error feedback has left them. act_order processes columns by decreasing H_jj (the "desc_act"
heuristic of the authors' code) with static groups: all grids are fitted on the original weights
first, so each group stays a contiguous run of columns and the codes are stored in the original
order.

With a mask (a prune stage ran first) a pruned entry's target is 0: it gets the code of 0, and
the error of moving it there from its current value is passed on like any rounding error. That
is SparseGPT's reconstruction (arXiv 2301.00774) for the given mask, done in the same pass as
the quantisation (the joint mode of that paper), so the kept weights also compensate the pruning
error, whichever method chose the mask. Measured on correlated calibration data, this beats both
quantising the masked weights alone and re-zeroing pruned entries after every update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ciuic_lab.compress.base import QuantMethod
from ciuic_lab.compress.quant import grid
from ciuic_lab.compress.state import LayerState, QuantPart
from ciuic_lab.compress.stats import LayerStats, damped_cholesky, require_hessian
from ciuic_lab.errors import check as _check


def inverse_hessian_cholesky(h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), and the dead inputs.

    h: (in, in) Σ x xᵀ. λ = percdamp · mean(diag H). A dead input (H_jj = 0: never active on the
    calibration tokens) gets H_jj = 1 so the inverse exists; its row of U is then zero off the
    diagonal, so its error reaches no other column. If the factorisation fails (H nearly singular
    in float32) the damping grows tenfold until it succeeds.
    Returns (U float32 (in, in), dead bool (in,)).
    """
    h = h.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0

    def inverse_upper(lower: torch.Tensor) -> torch.Tensor | None:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        return upper if int(info) == 0 else None

    return damped_cholesky(h, percdamp, 1e-4, inverse_upper), dead


def _block_end(i1: int, cols: int, blocksize: int, group_size: int | None) -> int:
    """End of the lazy-update block starting at i1, cut at a group boundary when grids are
    fitted on the fly: a group then always starts at a block start, where every later column
    has received all pending updates, so its grid sees the truly current weights."""
    end = i1 + blocksize
    if group_size:
        cut = end // group_size * group_size
        end = cut if cut > i1 else (i1 // group_size + 1) * group_size
    return min(end, cols)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, sym: bool,
                  mask: torch.Tensor | None = None, blocksize: int = 128, percdamp: float = 0.01,
                  act_order: bool = False) -> QuantPart:
    """GPTQ codes of w (out, in) for inputs with Hessian h = Σ x xᵀ (in, in).

    mask: optional (out, in) bool of kept entries; pruned ones dequantise to exactly 0 and the
    kept ones absorb the error of removing them (pass the unpruned w).
    Returns a QuantPart like `rtn_quantize`: codes (out, in) int32 in the original column order,
    scale/zero (out, G) per contiguous group of `group_size` columns (-1: one per row).
    """
    rows, cols = w.shape
    maxq = 2**bits - 1
    W = w.detach().float().clone()
    n_g = grid.n_groups(cols, group_size)
    scale = torch.ones(rows, n_g, device=W.device)
    zero = torch.zeros(rows, n_g, device=W.device)
    dynamic = group_size != -1 and not act_order
    if not dynamic:  # per-row grid, or static groups: fitted once on the original weights
        scale, zero = grid.fit_grid(W, bits, group_size, sym, mask)

    h = h.to(W.device)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order \
        else torch.arange(cols, device=W.device)
    u, _ = inverse_hessian_cholesky(h[perm][:, perm], percdamp)
    W = W[:, perm].contiguous()
    keep = None if mask is None else mask[:, perm].float()
    # grid column of each processed column
    group_of = [0] * cols if group_size == -1 else (perm // group_size).tolist()
    codes = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)
    origin = torch.zeros(rows, cols, device=W.device)  # each column as the feedback left it

    i1 = 0
    while i1 < cols:
        i2 = _block_end(i1, cols, blocksize, group_size if dynamic else None)
        W1 = W[:, i1:i2].clone()
        U1 = u[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if dynamic and c % group_size == 0:
                # Block ends are cut so that the group lies inside this block (W1 is current)
                # or starts at its start (W is current: all earlier blocks' updates are in).
                g_end = min(c + group_size, cols)
                cur = W[:, c:g_end] if i == 0 else W1[:, i:i + g_end - c]
                gm = None if keep is None else keep[:, c:g_end] > 0
                s, z = grid.fit_grid(cur, bits, -1, sym, gm)
                scale[:, c // group_size], zero[:, c // group_size] = s[:, 0], z[:, 0]
            col = W1[:, i]
            d = U1[i, i]
            s, z = scale[:, group_of[c]], zero[:, group_of[c]]
            q = torch.clamp(torch.round(col / s) + z, 0, maxq)
            if keep is not None:  # pruned: the code of 0, so the packed part rebuilds 0 there
                q = torch.where(keep[:, c] > 0, q, z)
            deq = (q - z) * s
            codes[:, c] = q.to(torch.int32)
            origin[:, c] = col
            e = (col - deq) / d
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ u[i1:i2, i2:]
        i1 = i2

    out, orig = torch.empty_like(codes), torch.empty_like(origin)
    out[:, perm], orig[:, perm] = codes, origin
    return QuantPart(out, scale, zero, bits, group_size, sym, orig)


@dataclass
class GPTQ(QuantMethod):
    """GPTQ (arXiv 2210.17323) on the layer's base part, or on U then V of a factorized layer."""

    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check_hessian_knobs()
        _check(isinstance(self.act_order, bool), "quant.act_order",
               f"must be true or false, got {self.act_order!r}")

    def _run(self, w, mask, h, bits, group_size) -> QuantPart:
        return gptq_quantize(w, h, bits, group_size, self.sym, mask, self.blocksize,
                             self.percdamp, self.act_order)

    def apply(self, state: LayerState, stats: LayerStats | None, budget) -> None:
        if state.base is not None:
            return super().apply(state, stats, budget)
        # Factorized layer, y = U (V x): V sees the layer's inputs (Hessian H); U sees V̂x,
        # whose Hessian is V̂ H V̂ᵀ with V̂ already quantised, so U also absorbs V's error.
        h = self._hessian(stats)
        bits, group = self.format_of(budget)
        state.v_quant = self._run(state.v, None, h, bits, group)
        v_hat = state.v_quant.dequantize()
        state.u_quant = self._run(state.u, None, v_hat @ h.to(v_hat) @ v_hat.T, bits, group)
        state.info["bits"] = bits
        state.info["group_size"] = group

    def quantize(self, w, mask, stats, bits, group_size):
        return self._run(w, mask, self._hessian(stats), bits, group_size)

    @staticmethod
    def _hessian(stats: LayerStats | None) -> torch.Tensor:
        return require_hessian(stats, "GPTQ")
