"""Uniform quantisation grids with per-group scale (and zero) along the input dimension.

Pure tensor maths shared by every quantisation method. A weight (out, in) is split along `in`
into groups of `group_size` columns (-1 = one group per output channel). When `group_size` does
not divide `in` (MLA's 576- or 192-wide inputs with g=128) the last group is simply narrower:
the tail is handled, not rejected.

Symmetric grid: w ≈ s·(q − 2^(k−1)), q ∈ [0, 2^k−1] (zero implicit), "full range": all 2^k
codes are used, s = ±absmax / 2^(k−1), its sign chosen so that code 0 (the level the other side
lacks, −2^(k−1)) lands exactly on the group's largest-magnitude entry. The textbook grid
s = 2·absmax / (2^k − 1) wastes half a level; the full-range one (llama.cpp's k-quants,
AutoRound's `int_sym`) cuts 3-bit g128 weight error by ~23 % on SmolLM2 at the same bits.
Asymmetric grid: w ≈ s·(q − z), s = (max − min) / (2^k − 1), z = round(−min / s) stored per group.
"""

from __future__ import annotations

import math

import torch


def n_groups(cols: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(cols / group_size)


def expand_groups(per_group: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """(out, G) per-group values -> (out, cols), repeating each over its group's columns."""
    if group_size == -1:
        return per_group[:, :1].expand(-1, cols)
    return per_group.repeat_interleave(group_size, dim=1)[:, :cols]


def _group_reduce(x: torch.Tensor, group_size: int, op: str) -> torch.Tensor:
    out, cols = x.shape
    g = cols if group_size == -1 else group_size
    pad = (-cols) % g
    fill = float("-inf") if op == "amax" else float("inf")
    if pad:
        x = torch.cat([x, x.new_full((out, pad), fill)], dim=1)
    x = x.view(out, -1, g)
    return x.amax(-1) if op == "amax" else x.amin(-1)


def fit_grid(w: torch.Tensor, bits: int, group_size: int, sym: bool,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per (row, group) by min/max of the entries that are kept.

    w: (out, in) float; mask: optional (out, in) bool — pruned entries do not widen the range.
    Returns scale (out, G) float32 ≠ 0 (> 0 when asymmetric) and zero (out, G) float32 holding integers in [0, 2^k−1].
    """
    maxq = 2**bits - 1
    w = w.float()
    hi_src = w if mask is None else w.masked_fill(~mask, float("-inf"))
    lo_src = w if mask is None else w.masked_fill(~mask, float("inf"))
    hi = _group_reduce(hi_src, group_size, "amax")
    lo = _group_reduce(lo_src, group_size, "amin")
    empty = torch.isinf(hi)  # a group with nothing kept: any grid will do
    hi = torch.where(empty, torch.zeros_like(hi), hi).clamp(min=0)
    lo = torch.where(empty, torch.zeros_like(lo), lo).clamp(max=0)
    if sym:
        # negative scale when the positive side is the larger: (0 − 2^(k−1))·s = hi then
        scale = torch.where(hi > -lo, -hi, -lo) / 2 ** (bits - 1)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale.clamp(min=1e-12)).clamp(0, maxq)
    # An all-zero group gets scale 1 so that codes stay finite (it dequantises to exact zeros).
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    return stored_scale(scale), zero


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as packed formats store it (fp16, magnitude ≥ 2⁻²⁰, sign kept), in float32:
    codes are fitted to this value so that dequantisation is exact."""
    sign = torch.where(scale < 0, -1.0, 1.0).to(scale.device)
    return (sign * scale.abs().clamp(min=2**-20)).half().float()


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
             group_size: int) -> torch.Tensor:
    """Codes (out, in) int32 in [0, 2^k−1] on the grid (scale, zero)."""
    cols = w.shape[1]
    s = expand_groups(scale, cols, group_size)
    z = expand_groups(zero, cols, group_size)
    return torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """float32 (out, in) weight from codes and the per-group grid."""
    out, cols = codes.shape
    if group_size != -1 and group_size < cols and cols % group_size == 0:
        # Whole groups: broadcast each (row, group) value instead of materialising two
        # repeated (out, in) copies; the same elementwise ops, so the same result.
        c = codes.reshape(out, cols // group_size, group_size).float()
        w = (c - zero.float()[..., None]) * scale.float()[..., None]
        return w.reshape(out, cols)
    s = expand_groups(scale.float(), cols, group_size)
    z = expand_groups(zero.float(), cols, group_size)
    return (codes.float() - z) * s
