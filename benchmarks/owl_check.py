"""Does OWL's outlier ratio find the blocks that pruning hurts most? Measured on one model.

    python benchmarks/owl_check.py [--model deepseek-v3-tiny] [--sparsity 0.7] [--max-windows 64]

OWL (arXiv 2310.05175) prunes blocks with more outliers less. This prints, per block: its
outlier ratio D (share of Wanda scores above M x the block mean, from the same profile pass
OWL uses), the sparsity OWL gives it, and the perplexity when *only that block* is pruned at
the target sparsity (every other block dense) - the block's measured sensitivity. Then the
whole-model rows side by side on the same windows: uniform, OWL at several lambda, OWL with its
ordering reversed, and uniform except the most sensitive block (measured above) at S - 0.08.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from ciuic_lab.api import compress
from ciuic_lab.compress.policies import PolicyBase, owl, register
from ciuic_lab.compress.policies._mean import meet_mean
from ciuic_lab.compress.walk.blocks import Resident
from ciuic_lab.compress.walk.pipeline import profile, profile_walk
from ciuic_lab.config import build_methods, compose
from ciuic_lab.data.wikitext import test_windows
from ciuic_lab.eval.perplexity import perplexity
from ciuic_lab.models.loader import load
from ciuic_lab.runner import calibration

PLAIN = ["recipe=none", "lowrank=none", "quant=none", "prune=none"]
_PICK: dict = {"block": None, "delta": 0.0}


@register("prune", "only_block")
@dataclass(kw_only=True)
class OnlyBlock(PolicyBase):
    """Probe: the target sparsity on one block, the others left dense (sparsity 0)."""

    def allocate(self, profiles, target):
        return {p.name: (target if p.block == _PICK["block"] else 0.0) for p in profiles}


@register("prune", "protect_block")
@dataclass(kw_only=True)
class ProtectBlock(PolicyBase):
    """Uniform, but one block at target - delta; the rest shift to keep the weighted mean."""

    def allocate(self, profiles, target):
        d = _PICK["delta"]
        raw = torch.tensor([target - d if p.block == _PICK["block"] else target for p in profiles])
        w = torch.tensor([float(p.params) for p in profiles])
        s = meet_mean(raw, w, target, target - d, target + d)
        return {p.name: float(v) for p, v in zip(profiles, s)}


@register("prune", "owl_reversed")
@dataclass(kw_only=True)
class OWLReversed(owl.OWL):
    """OWL's rule with the outlier ratios negated: blocks with more outliers pruned more."""

    def summarize_block(self, facts_by_layer, weights):
        super().summarize_block(facts_by_layer, weights)
        for facts in facts_by_layer.values():
            facts["block_outlier_ratio"] = -facts["block_outlier_ratio"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deepseek-v3-tiny")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--lambdas", type=float, nargs="*", default=[0.02, 0.04, 0.08])
    a = ap.parse_args()
    torch.manual_seed(0)
    base = [*PLAIN, f"model.name_or_path={a.model}", f"prune={a.method}",
            f"prune.sparsity={a.sparsity}"]
    model, tok = load(a.model, device="cpu")
    windows = test_windows(tok, 512)[: a.max_windows]
    dense = perplexity(model, windows, batch_size=4, progress=False)

    def ppl_of(*overrides: str) -> float:
        m, _ = load(a.model, device="cpu")
        m, _ = compress(m, tok, compose([*base, *overrides]), progress=False)
        return perplexity(m, windows, batch_size=4, progress=False)

    # OWL's own view: outlier ratio per block and the sparsity it allocates
    cfg = compose([*base, "prune.policy=owl"])
    (prune,) = [m for m in build_methods(cfg) if m.stage == "prune"]
    profiles = profile(model)
    profile_walk(Resident(model, torch.device("cpu")), calibration(tok, cfg), [prune], profiles,
                 batch_size=4, progress=False)
    m_owl = float(cfg.prune.owl_m)
    alloc = prune.allocate(profiles)
    blocks = sorted({p.block for p in profiles})
    print(f"model {a.model}, {a.method}, {windows.shape[0]} windows x 512, dense ppl {dense:.3f}")
    print(f"{'block':>5s} {'outlier ratio D (M=' + f'{m_owl:g})':>20s} {'OWL sparsity':>13s} "
          f"{'ppl, only this block pruned':>28s} {'Δppl %':>8s}")
    sens = {}
    for b in blocks:
        ps = [p for p in profiles if p.block == b]
        d = ps[0].facts["prune"]["block_outlier_ratio"]
        w = sum(p.params for p in ps)
        s_owl = sum(alloc[p.name] * p.params for p in ps) / w
        _PICK["block"] = b
        sens[b] = ppl_of("prune.policy=only_block")
        print(f"{b:5d} {100 * d:19.3f}% {s_owl:13.3f} {sens[b]:28.3f} "
              f"{100 * (sens[b] / dense - 1):8.2f}", flush=True)
    del profiles

    print(f"\n{'whole model at ' + f'{a.sparsity:g}':40s} {'ppl':>10s} {'Δppl %':>8s}")
    rows = [("uniform", ["prune.policy=uniform"])]
    rows += [(f"owl lambda {lam:g}", ["prune.policy=owl", f"prune.owl_lambda={lam}"])
             for lam in a.lambdas]
    rows.append(("owl reversed, lambda 0.08", ["prune.policy=owl_reversed"]))
    worst = max(sens, key=sens.get)
    rows.append((f"uniform, block {worst} (most sensitive) -0.08", ["prune.policy=protect_block"]))
    _PICK.update(block=worst, delta=0.08)
    for name, ov in rows:
        p = ppl_of(*ov)
        print(f"{name:40s} {p:10.3f} {100 * (p / dense - 1):8.2f}", flush=True)


if __name__ == "__main__":
    main()
