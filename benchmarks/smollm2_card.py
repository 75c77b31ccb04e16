"""The measured numbers in ciuic_lab/models/cards/smollm2-135m.md (fetch the model first).

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/smollm2_card.py grid
    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/smollm2_card.py rtn
    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/smollm2_card.py ppl
    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/smollm2_card.py lm_eval --limit 200
    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/smollm2_card.py samples

Each prints its numbers and writes them to --out (JSON, one file per part). fp32 on CPU.

grid: does every group of 32 consecutive weights along a row (the input dim, which is how GGUF's
Q4_1 groups them) lie on a 16-level affine grid, i.e. are its values min + k*(max-min)/15 for
integers k in 0..15? The same test on groups shifted by 16 (straddling two GGUF groups) is the
control: it must fail there, or the test proves nothing. The embedding (Q8_0) is tested against
a symmetric 255-level grid (k*max|w|/127). Also: how many values survive a cast to bf16 / fp16
(why the conversion keeps float32).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ciuic_lab.models.loader import load

TASKS = ["arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "lambada_openai"]
PROMPTS = ["The history of the city", "In 1923 , the army", "The album was released"]
CHAT = "What is the capital of France?"


def on_affine_grid(w: torch.Tensor, group: int = 32, levels: int = 16, offset: int = 0,
                   tol: float = 1e-3) -> tuple[int, int, int]:
    """(groups, groups on a `levels`-level affine grid, groups with <= levels distinct values)."""
    cols = (w.shape[1] - offset) // group * group
    g = w[:, offset:offset + cols].reshape(-1, group).double()
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    step = (hi - lo) / (levels - 1)
    r = torch.where(step > 0, (g - lo) / torch.where(step > 0, step, 1), 0)
    on = ((r - r.round()).abs() <= tol).all(1)
    distinct = (g.sort(1).values.diff(1) != 0).sum(1) + 1
    return g.shape[0], int(on.sum()), int((distinct <= levels).sum())


def on_symmetric_grid(w: torch.Tensor, group: int = 32, qmax: int = 127, offset: int = 0,
                      tol: float = 1e-3) -> tuple[int, int]:
    cols = (w.shape[1] - offset) // group * group
    g = w[:, offset:offset + cols].reshape(-1, group).double()
    step = g.abs().max(1, keepdim=True).values / qmax
    r = torch.where(step > 0, g / torch.where(step > 0, step, 1), 0)
    return g.shape[0], int(((r - r.round()).abs() <= tol).all(1).sum())


def grid(model) -> dict:
    kinds: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            w = mod.weight.detach()
            n, on, few = on_affine_grid(w)
            n_c, on_c, few_c = on_affine_grid(w, offset=16)
            k = kinds.setdefault(name.rsplit(".", 1)[-1], [0] * 6)
            for i, v in enumerate((n, on, few, n_c, on_c, few_c)):
                k[i] += v
    out = {"linear": {k: {"groups": v[0], "on_grid": v[1] / v[0], "le16_distinct": v[2] / v[0],
                          "control_offset16_on_grid": v[4] / v[3],
                          "control_offset16_le16_distinct": v[5] / v[3]}
                      for k, v in kinds.items()}}
    tot = [sum(v[i] for v in kinds.values()) for i in range(6)]
    out["linear_all"] = {"groups": tot[0], "on_grid": tot[1] / tot[0],
                         "le16_distinct": tot[2] / tot[0],
                         "control_offset16_on_grid": tot[4] / tot[3],
                         "control_offset16_le16_distinct": tot[5] / tot[3]}
    emb = model.get_input_embeddings().weight.detach()
    n, on = on_symmetric_grid(emb)
    n_c, on_c = on_symmetric_grid(emb, offset=16)
    out["embedding_q8_0"] = {"groups": n, "on_grid": on / n, "control_offset16_on_grid": on_c / n_c}
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    out["exact_in"] = {dt: sum(int((p.detach().to(getattr(torch, dt)).float() == p.detach()).sum())
                               for p in params.values()) / total
                       for dt in ("bfloat16", "float16")}
    return out


def rtn(model) -> dict:
    """Relative weight error (Frobenius, over all linear layers) of re-quantising the weights.

    Groups aligned with the GGUF's (columns 0-31, 32-63, ...) against the same weights with every
    row rolled by 16 columns, so each group straddles two GGUF groups: same values, same
    quantiser, only the alignment differs. Quantisers: this project's grid (ciuic_lab.compress.
    quant.grid: fp16 scale, integer zero point, range stretched to include 0) and gguf's own Q4_1.
    """
    import gguf

    from ciuic_lab.compress.quant.grid import dequantize, fit_grid, quantize

    def ours(w, bits, g, sym):
        scale, zero = fit_grid(w, bits, g, sym)
        return dequantize(quantize(w, scale, zero, bits, g), scale, zero, g)

    def q4_1(w, *_):
        t = gguf.GGMLQuantizationType.Q4_1
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), t), t))

    configs = {f"ours_{b}bit_g{g}_{'sym' if sym else 'asym'}": (ours, b, g, sym)
               for b in (3, 4) for g in (32, 128) for sym in (False, True)}
    configs["gguf_q4_1"] = (q4_1, 4, 32, False)
    err = {k: [0.0, 0.0] for k in configs}
    norm = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or "lm_head" in name:
            continue
        w = mod.weight.detach().float()
        norm += float(w.pow(2).sum())
        for k, (fn, b, g, sym) in configs.items():
            for i, x in enumerate((w, w.roll(16, dims=1))):
                err[k][i] += float((fn(x, b, g, sym) - x).pow(2).sum())
    return {"rel_error": {k: {"aligned": math.sqrt(a / norm), "offset16": math.sqrt(o / norm)}
                          for k, (a, o) in err.items()}}


def ppl(model, tok) -> dict:
    from ciuic_lab.data.wikitext import test_windows
    from ciuic_lab.eval.perplexity import nll_sum

    windows = test_windows(tok, 2048)
    t0 = time.perf_counter()
    # One pass: the first 8 windows and the rest, so both figures come from the same forward runs
    # (perplexity() is exp(nll_sum / count)).
    s8, c8 = nll_sum(model, windows[:8], progress=False)
    t8 = time.perf_counter() - t0
    sr, cr = nll_sum(model, windows[8:], progress=True)
    return {"seqlen": 2048, "windows": int(windows.shape[0]), "tokens": int(windows.numel()),
            "ppl_first8": math.exp(s8 / c8), "ppl_all": math.exp((s8 + sr) / (c8 + cr)),
            "seconds_first8": round(t8, 1), "seconds_all": round(time.perf_counter() - t0, 1)}


def lm_eval(model, tok, limit: int | None) -> dict:
    from ciuic_lab.eval.lm_eval_bridge import evaluate_tasks

    t0 = time.perf_counter()
    res = evaluate_tasks(model, tok, TASKS, limit=limit, progress=False)
    return {"limit": limit, "metrics": res, "seconds": round(time.perf_counter() - t0, 1)}


def samples(model, tok) -> dict:
    from ciuic_lab.eval.generate import greedy_continuations

    chat = tok.apply_chat_template([{"role": "user", "content": CHAT}], tokenize=False,
                                   add_generation_prompt=True)
    prompts = [*PROMPTS, chat]
    outs = greedy_continuations(model, tok, prompts, max_new_tokens=40)
    return {"max_new_tokens": 40, "samples": [{"prompt": p, "continuation": o}
                                              for p, o in zip([*PROMPTS, CHAT], outs)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["grid", "rtn", "ppl", "lm_eval", "samples"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", default="200", help="lm_eval: docs per task, or 'none' for all")
    ap.add_argument("--out", default=None, help="JSON file (default: smollm2_<part>.json)")
    args = ap.parse_args()
    model, tok = load(args.model, dtype="float32", device="cpu")
    if args.part == "grid":
        res = grid(model)
    elif args.part == "rtn":
        res = rtn(model)
    elif args.part == "ppl":
        res = ppl(model, tok)
    elif args.part == "lm_eval":
        res = lm_eval(model, tok, None if args.limit == "none" else int(args.limit))
    else:
        res = samples(model, tok)
    res = {"part": args.part, "model": args.model, "torch_threads": torch.get_num_threads(), **res}
    text = json.dumps(res, indent=2, default=str)
    print(text)
    Path(args.out or f"smollm2_{args.part}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
