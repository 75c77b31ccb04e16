"""Sensitivity-driven bit allocation under a mean-bits target.

Measure, for every layer l and candidate width b, the output error its weight would have on the
calibration data, e_l(b) = ‖(W − Q_b(W)) X‖² = tr(ΔW H ΔWᵀ) (round-to-nearest at the run's group
size; H from the profile pass). Then choose b_l to minimise Σ e_l(b_l) subject to the
parameter-weighted mean Σ p_l b_l / Σ p_l <= target: start every layer at the lowest width and
repeatedly take the upgrade with the largest error reduction per added bit·parameter (greedy on
marginal gain, the standard knapsack relaxation used by mixed-precision allocators such as
HAWQ-V3, arXiv 2011.10680, and the layer-wise error objective of GPTQ/OBQ, arXiv 2208.11580).
"""

from __future__ import annotations

import torch

from ciuic_lab.compress.policies import LayerProfile, register
from ciuic_lab.compress.state import rtn_quantize
from ciuic_lab.errors import ConfigError


def layer_errors(w: torch.Tensor, h: torch.Tensor | None, sq_norm: torch.Tensor | None,
                 candidates: list[int], group_size: int, sym: bool) -> dict[int, float]:
    out = {}
    w = w.float()
    for b in candidates:
        d = rtn_quantize(w, b, group_size, sym).dequantize().to(w.device) - w
        if h is not None:
            out[b] = float(((d @ h.to(w.device)) * d).sum())
        elif sq_norm is not None:  # diagonal of H: a proxy when the full Hessian is too large
            out[b] = float((d * d * sq_norm.to(w.device)[None, :]).sum())
        else:
            out[b] = float((d * d).sum())
    return out


def allocate_bits(errors: list[dict[int, float]], params: list[int], target: float) -> list[int]:
    cands = sorted(errors[0])
    budget = target * sum(params)
    level = [0] * len(errors)
    used = sum(p * cands[0] for p in params)
    while True:
        best, best_gain = None, 0.0
        for li, e in enumerate(errors):
            if level[li] + 1 >= len(cands):
                continue
            b0, b1 = cands[level[li]], cands[level[li] + 1]
            extra = (b1 - b0) * params[li]
            if used + extra > budget + 1e-9:
                continue
            gain = (e[b0] - e[b1]) / extra
            if best is None or gain > best_gain:
                best, best_gain = li, gain
        if best is None:
            return [cands[i] for i in level]
        used += (cands[level[best] + 1] - cands[level[best]]) * params[best]
        level[best] += 1


@register("quant", "sensitivity")
class Sensitivity:
    needs = frozenset({"hessian"})

    def summarize(self, facts: dict, weight, stats, candidate_bits=(2, 3, 4, 5, 6, 8),
                  group_size: int = 128, sym: bool = True, **_) -> None:
        cands = sorted(int(b) for b in candidate_bits)
        facts["errors"] = layer_errors(weight, stats.hessian, stats.sq_norm, cands, group_size, sym)

    def allocate(self, profiles: list[LayerProfile], target: float, candidate_bits=(2, 3, 4, 5, 6, 8),
                 **_) -> dict:
        cands = sorted(int(b) for b in candidate_bits)
        if not cands[0] <= target <= cands[-1]:
            raise ConfigError(f"quant.avg_bits: {target} is outside the candidate widths {cands}")
        errors = [p.facts[self.stage]["errors"] for p in profiles]
        bits = allocate_bits(errors, [p.params for p in profiles], target)
        return {p.name: b for p, b in zip(profiles, bits)}
