"""Rotations and joint refinement on the trained deepseek-v3-tiny, side by side.

    python benchmarks/rotate_refine.py                     # both parts
    python benchmarks/rotate_refine.py --part rotate       # A: methods with / without rotations
    python benchmarks/rotate_refine.py --part refine       # B: one-pass vs refined combinations
    options: --windows 64 --calib 32 --calib-seqlen 256 --iters 2 --only NAME...
             --transforms plain 'fused H' ... --no-dense
    (from a git worktree, prefix PYTHONPATH=. so that the worktree's ciuic_lab is imported)

Part A (issue #13 item 4): each method (RTN / GPTQ at 2, 3, 4 bits g128, SparseGPT 50 %,
SVD-LLM factorize at 60 % of the parameters) on the plain model, after the fused residual
rotation (randomised Hadamard, and a dense Haar-random Q), and after the fused rotation plus
online Hadamards in front of o_proj and every dense / shared down_proj
(`ciuic_lab.compress.rotate`, QuIP# arXiv 2402.04396, QuaRot arXiv 2404.00456). Also: dense
perplexity after each transform (must not move) and the prefill speed cost of the online ones.

Part B (issue #13 item 5): SparseGPT → GPTQ → SVD-LLM residual in one pass (the `ciuic`
composition) vs the same stored budget refined by alternation
(`ciuic_lab.compress.lowrank.alternating`, OATS arXiv 2409.13652 / SLiM arXiv 2410.09615 ideas),
on the plain and the rotated model.

Every row compresses a fresh copy with `compress_model` (the block walk: each block calibrated
on the outputs of the already compressed blocks before it). Perplexity: WikiText-2 test,
`--windows` windows of 512 tokens. For evaluation speed only, each CompressedLinear computes
with its `dequantized_weight()` rebuilt once (`materialized`) — the very tensor its reference
forward rebuilds on every call — so the perplexity is that of the packed model (checked on one
window).
bits/param are read from the packed layers; "+rot" adds the bytes of online rotations.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from ciuic_lab.compress.lowrank.svdllm import SVDLLM
from ciuic_lab.compress.prune.sparsegpt import SparseGPT
from ciuic_lab.compress.quant.gptq import GPTQ
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.rotate.fused import rotate_model
from ciuic_lab.compress.rotate.online import add_online_rotations
from ciuic_lab.compress.store.serve import materialized
from ciuic_lab.compress.walk.pipeline import compress_model
from ciuic_lab.data.calibration import calibration_windows
from ciuic_lab.data.wikitext import test_windows
from ciuic_lab.eval.perplexity import perplexity
from ciuic_lab.eval.speed import tokens_per_second
from ciuic_lab.models.loader import load

MODEL = "deepseek-v3-tiny"

# ---- model transforms (columns of part A) ------------------------------------------------------


def plain(model):
    return {"runtime_bytes": 0}


def fused_hadamard(model):
    return rotate_model(model, seed=0, kind="hadamard")


def fused_random(model):
    return rotate_model(model, seed=0, kind="random")


def fused_online(model):
    info = rotate_model(model, seed=0, kind="hadamard")
    on = add_online_rotations(model, seed=0, sites=("down_proj", "o_proj"))
    return {**info, "runtime_bytes": on["runtime_bytes"], "online": len(on["wrapped"])}


TRANSFORMS = {"plain": plain, "fused H": fused_hadamard, "fused rand": fused_random,
              "fused H+online": fused_online}

ROWS_A = {
    "rtn 4-bit g128": lambda: [RTN(bits=4, group_size=128)],
    "rtn 3-bit g128": lambda: [RTN(bits=3, group_size=128)],
    "rtn 2-bit g128": lambda: [RTN(bits=2, group_size=128)],
    "gptq 4-bit g128": lambda: [GPTQ(bits=4, group_size=128)],
    "gptq 3-bit g128": lambda: [GPTQ(bits=3, group_size=128)],
    "gptq 2-bit g128": lambda: [GPTQ(bits=2, group_size=128)],
    "sparsegpt 50%": lambda: [SparseGPT(sparsity=0.5)],
    "svd-llm factorize 60%": lambda: [SVDLLM(mode="factorize", ratio=0.6)],
}


# ---- helpers -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, windows, check=True) -> float:
    """Perplexity with every packed layer computing with its dequantised weight, rebuilt once
    (`materialized`; evaluation speed only: the same weight its forward rebuilds on every call)."""
    ids = windows[:1, :64]
    before = model(input_ids=ids).logits if check else None
    with materialized(model, torch.float32):
        if check:  # the swap must not change the model's outputs
            after = model(input_ids=ids).logits
            assert torch.allclose(before, after, rtol=1e-5, atol=1e-5), \
                "materializing changed the model"
        return perplexity(model, windows, batch_size=4, progress=False)


def compress_row(base, transform, stages, calib, windows):
    model = copy.deepcopy(base)
    info = transform(model)
    t0 = time.perf_counter()
    report = compress_model(model, calib, stages, batch_size=4, progress=False)
    secs = time.perf_counter() - t0
    tot = report.totals()
    bpp_rot = 8 * (tot["bytes"] + info.get("runtime_bytes", 0)) / tot["params"]
    return evaluate(model, windows), tot["bits_per_param"], bpp_rot, secs


def table(title, cols, rows, cell):
    print(f"\n{title}")
    print(f"{'':28s}" + "".join(f"{c:>18s}" for c in cols))
    for r in rows:
        print(f"{r:28s}" + "".join(f"{cell(r, c):>18s}" for c in cols), flush=True)


def op_cost() -> None:
    """One OnlineRotation vs the linear it precedes (best of 50 runs each, 5 for the big ones)."""
    from ciuic_lab.compress.rotate.online import OnlineRotation

    for n, out in ((768, 256), (256, 256), (7168, 2048), (18432, 7168)):
        x = torch.randn(256 if n > 4096 else 2048, n)
        rot, lin = OnlineRotation(n, 0), nn.Linear(n, out, bias=False)
        t = {"rot": float("inf"), "lin": float("inf")}
        with torch.no_grad():
            for _ in range(50 if n < 4096 else 5):
                for k, f in (("rot", rot), ("lin", lin)):
                    t0 = time.perf_counter()
                    f(x)
                    t[k] = min(t[k], time.perf_counter() - t0)
        print(f"  online rotation n={n} ({rot.kind} p={rot.p}): {1e3 * t['rot']:.2f} ms vs linear "
              f"{n}->{out} {1e3 * t['lin']:.2f} ms per {x.shape[0]} tokens "
              f"({100 * t['rot'] / t['lin']:.0f} %), {rot.nbytes()} bytes", flush=True)


# ---- part A ------------------------------------------------------------------------------------


def dense_and_speed(base, windows):
    """Dense perplexity after each transform (must not move) and the online rotations' cost."""
    dense = {}
    for c, tf in TRANSFORMS.items():
        m = copy.deepcopy(base)
        tf(m)
        dense[c] = evaluate(m, windows, check=False)
    print("dense ppl after each transform (must equal plain): "
          + ", ".join(f"{c} {v:.3f}" for c, v in dense.items()), flush=True)

    # Run-time cost of the online rotations. The development machines are shared, so the
    # models are timed in alternation and the best of several rounds is kept for each.
    speed = {c: 0.0 for c in ("plain", "fused H+online")}
    models = {}
    for c in speed:
        models[c] = copy.deepcopy(base)
        TRANSFORMS[c](models[c])
    for _ in range(5):
        for c, m in models.items():
            speed[c] = max(speed[c], tokens_per_second(m, windows[:4], batch_size=4, max_windows=4))
    print("prefill tokens/s (best of 5, 4 x 512): "
          + ", ".join(f"{c} {v:,.0f}" for c, v in speed.items())
          + f"; online rotations cost {100 * (speed['plain'] / speed['fused H+online'] - 1):.1f} %",
          flush=True)
    del models
    op_cost()


def part_rotate(base, calib, windows, only, transforms, measure_dense=True):
    if measure_dense:
        dense_and_speed(base, windows)
    dense = evaluate(copy.deepcopy(base), windows, check=False)
    results = {}
    print(f"\n{'method':28s} {'transform':16s} {'bits/param':>10s} {'+rot':>7s} {'ppl':>9s} "
          f"{'Δ% vs dense':>11s} {'time s':>7s}")
    for r, stages in ROWS_A.items():
        if only and not any(o in r for o in only):
            continue
        for c in transforms:
            ppl, bpp, bpp_rot, secs = compress_row(base, TRANSFORMS[c], stages(), calib, windows)
            results[(r, c)] = ppl
            print(f"{r:28s} {c:16s} {bpp:10.3f} {bpp_rot:7.3f} {ppl:9.3f} "
                  f"{100 * (ppl / dense - 1):11.2f} {secs:7.1f}", flush=True)
    table(f"part A: WikiText-2 ppl (dense {dense:.3f})", transforms,
          [r for r in ROWS_A if (r, transforms[0]) in results],
          lambda r, c: f"{results[(r, c)]:.3f}")


# ---- part B ------------------------------------------------------------------------------------

# (stages before the low-rank one, low-rank knobs): the low-rank stage is SVD-LLM residual
# (one pass) or AlternatingRefine with the same knobs (refined), so the stored budget is equal.
ROWS_B = {
    "sgpt 50% + gptq3 + lr 2% fb8": (lambda: [SparseGPT(sparsity=0.5), GPTQ(bits=3)],
                                     {"ratio": 0.02, "factor_bits": 8}),
    "sgpt 50% + gptq3 + lr 10% fb8": (lambda: [SparseGPT(sparsity=0.5), GPTQ(bits=3)],
                                      {"ratio": 0.10, "factor_bits": 8}),
    "sgpt 60% + lr 10% (OATS-like)": (lambda: [SparseGPT(sparsity=0.6)],
                                      {"ratio": 0.10, "factor_bits": 16}),
    "gptq2 + lr 5% fb8": (lambda: [GPTQ(bits=2)], {"ratio": 0.05, "factor_bits": 8}),
}
# rows also run on the rotated model
ROWS_B_ROTATED = ("sgpt 50% + gptq3 + lr 2% fb8",)


def part_refine(base, calib, windows, only, iters: int = 2):
    from ciuic_lab.compress.lowrank.alternating import AlternatingRefine

    dense = evaluate(copy.deepcopy(base), windows, check=False)
    print(f"\npart B: one pass (SVD-LLM residual) vs AlternatingRefine(iters={iters}, "
          f"start=both) at the same stored budget; dense ppl {dense:.3f}")
    print(f"{'combination':32s} {'transform':9s} {'low-rank':9s} {'bits/param':>10s} "
          f"{'ppl':>9s} {'mean rel_err':>12s} {'time s':>7s}")
    results = {}
    for r, (before, lr) in ROWS_B.items():
        if only and not any(o in r for o in only):
            continue
        for c in ("plain", "fused H") if r in ROWS_B_ROTATED else ("plain",):
            for lname, make in (("one pass", lambda lr=lr: SVDLLM(mode="residual", **lr)),
                                ("refined", lambda lr=lr: AlternatingRefine(iters=iters, **lr))):
                model = copy.deepcopy(base)
                TRANSFORMS[c](model)
                t0 = time.perf_counter()
                report = compress_model(model, calib, [*before(), make()], batch_size=4,
                                        progress=False)
                secs = time.perf_counter() - t0
                rel = sum(x["rel_error"] for x in report.layers) / len(report.layers)
                ppl = evaluate(model, windows)
                results[(r, c, lname)] = ppl
                print(f"{r:32s} {c:9s} {lname:9s} {report.totals()['bits_per_param']:10.3f} "
                      f"{ppl:9.3f} {rel:12.4f} {secs:7.1f}", flush=True)
    cols = [(c, ln) for c in ("plain", "fused H") for ln in ("one pass", "refined")]
    table("part B: WikiText-2 ppl", [f"{c}, {ln}" for c, ln in cols],
          [r for r in ROWS_B if (r, "plain", "one pass") in results],
          lambda r, c: (f"{results[(r, *c.split(', '))]:.3f}"
                        if (r, *c.split(", ")) in results else "-"))


# ---- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["rotate", "refine", "all"], default="all")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--only", nargs="*", default=None, help="row names (substring match)")
    ap.add_argument("--iters", type=int, default=2, help="part B: alternations per chain")
    ap.add_argument("--transforms", nargs="*", default=list(TRANSFORMS), choices=list(TRANSFORMS),
                    help="part A: model transforms (columns)")
    ap.add_argument("--no-dense", action="store_true",
                    help="part A: skip the dense-ppl-per-transform and speed measurements")
    a = ap.parse_args()
    torch.manual_seed(0)
    base, tok = load(MODEL, device="cpu")
    windows = test_windows(tok, 512)[: a.windows]
    calib = calibration_windows(tok, a.calib, a.calib_seqlen, 0)
    print(f"{MODEL}: {windows.shape[0]} test windows x 512, calibration {a.calib} x "
          f"{a.calib_seqlen}, torch threads {torch.get_num_threads()}", flush=True)
    if a.part in ("rotate", "all"):
        part_rotate(base, calib, windows, a.only, a.transforms, not a.no_dense)
    if a.part in ("refine", "all"):
        part_refine(base, calib, windows, a.only, a.iters)


if __name__ == "__main__":
    main()
