"""Method and recipe quality, side by side, on one model: measured bits/param, WikiText-2 ppl, time.

    python benchmarks/quality.py [--model deepseek-v3-tiny] [--max-windows N] [--only NAME ...]

Every row compresses a fresh copy of the model with the run config's stages (CLI-style
overrides, so each row is reproducible as `python -m ciuic_lab.run <overrides>`), then evaluates
perplexity on the same WikiText-2 windows as the dense model. bits/param is read from the packed
layers (masks, scales, indices and factors included).
"""

from __future__ import annotations

import argparse
import time

import torch

from ciuic_lab.api import compress
from ciuic_lab.config import compose
from ciuic_lab.data.wikitext import test_windows
from ciuic_lab.errors import ConfigError
from ciuic_lab.eval.perplexity import perplexity
from ciuic_lab.models.loader import load

PLAIN = ["recipe=none", "lowrank=none", "quant=none", "prune=none"]


def row(*overrides: str) -> list[str]:
    return [*PLAIN, *overrides]


ROWS: dict[str, list[str]] = {
    # pruning at 50% unstructured and 2:4
    "magnitude 50%": row("prune=magnitude", "prune.sparsity=0.5"),
    "wanda 50%": row("prune=wanda", "prune.sparsity=0.5"),
    "sparsegpt 50%": row("prune=sparsegpt", "prune.sparsity=0.5"),
    "magnitude 2:4": row("prune=magnitude", "prune.pattern=2:4"),
    "wanda 2:4": row("prune=wanda", "prune.pattern=2:4"),
    "sparsegpt 2:4": row("prune=sparsegpt", "prune.pattern=2:4"),
    # quantisation, g128
    "rtn 4-bit g128": row("quant=rtn", "quant.bits=4"),
    "gptq 4-bit g128": row("quant=gptq", "quant.bits=4"),
    "rtn 3-bit g128": row("quant=rtn", "quant.bits=3"),
    "gptq 3-bit g128": row("quant=gptq", "quant.bits=3"),
    # the bitsandbytes baselines a user would pick instead (the `bnb` extra)
    "bitsandbytes nf4": row("quant=bnb_nf4"),
    "bitsandbytes int8 (LLM.int8)": row("quant=bnb_int8"),
    "rtn 2-bit per-channel": row("quant=rtn", "quant.bits=2", "quant.group_size=-1"),
    "rtn 8-bit per-channel": row("quant=rtn", "quant.bits=8", "quant.group_size=-1"),
    # low-rank at the same parameter count
    "svd factorize 60% params": row("lowrank=svd", "lowrank.mode=factorize", "lowrank.ratio=0.6"),
    "svd-llm factorize 60% params": row("lowrank=svdllm", "lowrank.mode=factorize",
                                        "lowrank.ratio=0.6"),
    # layerwise sparsity at 70%
    "wanda 70% uniform": row("prune=wanda", "prune.sparsity=0.7"),
    "wanda 70% owl": row("prune=wanda", "prune.sparsity=0.7", "prune.policy=owl"),
    "sparsegpt 70% uniform": row("prune=sparsegpt", "prune.sparsity=0.7"),
    "sparsegpt 70% owl": row("prune=sparsegpt", "prune.sparsity=0.7", "prune.policy=owl"),
    # bit allocation at a 3.5-bit mean (RTN so that only the allocation differs)
    "rtn uniform 3.5 mean (3/4 by order)": row("quant=rtn", "quant.avg_bits=3.5"),
    "rtn by kind (attn 4, rest 3)": row("quant=rtn", "quant.policy=kind_map", "quant.bits=3",
                                        "quant.kind_bits={attn:4}"),
    "rtn sensitivity 3.5 mean": row("quant=rtn", "quant.policy=sensitivity",
                                    "quant.avg_bits=3.5"),
    "gptq uniform 3.5 mean": row("quant=gptq", "quant.avg_bits=3.5"),
    "gptq sensitivity 3.5 mean": row("quant=gptq", "quant.policy=sensitivity",
                                     "quant.avg_bits=3.5"),
    # the recipe next to GPTQ-only at matched measured bits
    "ciuic recipe": [],
    "ciuic recipe, block 0 not pruned": ["prune.layers={layers.0:null}"],
    "gptq sensitivity 3.35 mean (only)": row("quant=gptq", "quant.policy=sensitivity",
                                             "quant.avg_bits=3.35"),
    "gptq 4-bit g128 (only)": row("quant=gptq", "quant.bits=4"),
    "gptq 3-bit g64 (only)": row("quant=gptq", "quant.bits=3", "quant.group_size=64"),
    # below 3 bits, where 2-bit quantisation alone breaks down
    "ciuic recipe, quant.bits=3": ["quant.bits=3"],
    "gptq sensitivity 2.75 mean (only)": row("quant=gptq", "quant.policy=sensitivity",
                                             "quant.avg_bits=2.75"),
    "ciuic recipe, quant.avg_bits=2.5": ["quant.avg_bits=2.5"],
    "gptq sensitivity 2.4 mean (only)": row("quant=gptq", "quant.policy=sensitivity",
                                            "quant.avg_bits=2.4"),
    "gptq sensitivity 2.45 mean (only)": row("quant=gptq", "quant.policy=sensitivity",
                                             "quant.avg_bits=2.45"),
    "gptq 2-bit g32 (only)": row("quant=gptq", "quant.bits=2", "quant.group_size=32"),
    # masks at their entropy limit (compress/store/coding.py): 2:4 above costs log2 C(4,2)/4 = 0.65
    # bit per weight for its index; an 80 % unstructured mask H(0.8) = 0.72 instead of 1
    "sparsegpt 80% (entropy-coded mask)": row("prune=sparsegpt", "prune.sparsity=0.8"),
    "sparsegpt 4:8": row("prune=sparsegpt", "prune.pattern=4:8"),
    # the sensitivity policy's predictor: Fisher-weighted (default) vs layer-local error
    "gptq sensitivity 3.5 mean, local error": row("quant=gptq", "quant.policy=sensitivity",
                                                  "quant.avg_bits=3.5", "quant.sensitivity=local"),
    "gptq sensitivity 3.25 stored, groups 32-128": row(
        "quant=gptq", "quant.policy=sensitivity", "quant.avg_bits=3.25", "quant.budget=stored",
        "quant.candidate_groups=[32,64,128]"),
    # rotations (rotate=hadamard: fused, free at run time; models with tied embeddings refuse)
    "gptq 3-bit g128, rotated": row("quant=gptq", "quant.bits=3", "rotate=hadamard"),
    "gptq 2-bit g128 (only)": row("quant=gptq", "quant.bits=2"),
    "gptq 2-bit g128, rotated": row("quant=gptq", "quant.bits=2", "rotate=hadamard"),
    "gptq 2-bit g128, rotated + online": row("quant=gptq", "quant.bits=2",
                                             "rotate=hadamard_online"),
    "sparsegpt 50%, rotated": row("prune=sparsegpt", "prune.sparsity=0.5", "rotate=hadamard"),
    "svd-llm factorize 60% params, rotated": row("lowrank=svdllm", "lowrank.mode=factorize",
                                                 "lowrank.ratio=0.6", "rotate=hadamard"),
    # joint refinement of base and low-rank parts at the same stored budget
    "ciuic recipe, refined (lowrank=alternating)": ["lowrank=alternating", "lowrank.ratio=0.02",
                                                    "lowrank.factor_bits=8"],
    "ciuic recipe, rotated": ["rotate=hadamard"],
    "ciuic recipe, rotated + refined": ["rotate=hadamard", "lowrank=alternating",
                                        "lowrank.ratio=0.02", "lowrank.factor_bits=8"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deepseek-v3-tiny")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="row names (substring match)")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load(a.model, device="cpu")
    windows = test_windows(tok, a.seqlen)
    if a.max_windows:
        windows = windows[: a.max_windows]
    dense = perplexity(model, windows, batch_size=4, progress=False)
    print(f"model {a.model}, {windows.shape[0]} windows x {a.seqlen}, dense ppl {dense:.3f}")
    print(f"{'method / recipe':38s} {'bits/param':>10s} {'ppl':>10s} {'dense ppl':>10s} "
          f"{'Δppl %':>8s} {'time s':>7s}")
    for name, overrides in ROWS.items():
        if a.only and not any(o in name for o in a.only):
            continue
        model, tok = load(a.model, device="cpu")
        cfg = compose([*overrides, f"model.name_or_path={a.model}"])
        t0 = time.perf_counter()
        try:
            model, report = compress(model, tok, cfg, progress=False)
        except ConfigError as e:  # e.g. rotations on a model with tied embeddings
            print(f"{name:38s} refused: {e}", flush=True)
            continue
        dt = time.perf_counter() - t0
        ppl = perplexity(model, windows, batch_size=4, progress=False)
        bpp = report.totals()["bits_per_param"]
        print(f"{name:38s} {bpp:10.3f} {ppl:10.3f} {dense:10.3f} {100 * (ppl / dense - 1):8.2f} "
              f"{dt:7.1f}", flush=True)


if __name__ == "__main__":
    main()
