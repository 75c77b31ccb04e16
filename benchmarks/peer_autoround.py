"""The lab's `tune=block` beside AutoRound (arXiv 2309.05516, the `auto-round` package), side by
side on one model, the same calibration windows and the same perplexity windows.

    pip install auto-round==0.16.1     # the peer (not a dependency of the lab)
    OMP_NUM_THREADS=2 nice python benchmarks/peer_autoround.py --model smollm2-135m --bits 4 3

Per width (symmetric grid, groups of --group, so every row stores the same bits/param):
    gptq, rtn              the lab's one-shot GPTQ / round-to-nearest (tune=none)
    gptq + tune=block      the lab's learned rounding on top (`--iters` steps, lr `--lr`),
                           starting from GPTQ's codes (tune.start=stage)
    gptq + tune=block@rtn  GPTQ's model, tuning started from round-to-nearest (tune.start=rtn);
                           kept per block only where it beats GPTQ's codes
    rtn + tune=block       tuning on round-to-nearest codes (as AutoRound does)
    rtn + tune=full@rtn    tune=block, then tune=e2e: scales, factors and norm gains distilled
                           on the dense model's next-token distribution (its own defaults)
    recipe, recipe+full@rtn  the default `ciuic` recipe (50 % OWL SparseGPT, GPTQ widths by
                           sensitivity averaging 4 bits per kept value, 2 % residual rank) at its
                           own budget (about 3.3 bits/param: its bits column reads "mix"), then
                           with the same tuning; set beside the 3-bit rows it should beat
    recipe-serve           the recipe with quant.kernel_widths=true quant.fuse_siblings=true:
                           what serving constraints cost it (recipe-kw: kernel widths alone)
    ROW/hadamard           any lab row with `rotate=hadamard` (fused randomised Hadamard rotations;
                           SmolLM2's tied embeddings are untied, the extra head counted apart)
    autoround              AutoRound with the same steps and lr ("light": 50 and 5e-3), fed the
                           lab's calibration windows as its dataset
Both are scored in memory with the lab's perplexity function on WikiText-2 (`--windows` windows
of `--seqlen`). AutoRound writes each block's quantise-dequantised weights into the model's own
Linear layers as it goes; the row checks that every group of a quantised row really holds at
most 2^bits values before scoring it, so an unquantised model cannot pass for a quantised one.

SmolLM2's linear weights come from a Q4_1 GGUF (4-bit codes in groups of 32 with a minimum):
an asymmetric 4-bit grid of group 32 holds them exactly, so compare at groups 64/128 and at 3
bits; the 4-bit rows at g128 are still optimistic.

Writes benchmarks/results/peer_autoround_<model>.md (the table) and prints it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ciuic_lab.api import compress
from ciuic_lab.config import compose
from ciuic_lab.data.calibration import calibration_windows
from ciuic_lab.data.wikitext import test_windows
from ciuic_lab.eval.perplexity import perplexity
from ciuic_lab.models.loader import load

RESULTS = Path(__file__).resolve().parent / "results"


def lab_row(model_name: str, bits: int, group: int, tune: bool | str, iters: int, lr: float,
            calib: tuple[int, int], quant: str = "gptq", extra: tuple[str, ...] = (),
            rotate: str = ""):
    model, tok = load(model_name, device="cpu")
    overrides = [f"model.name_or_path={model_name}", f"data.calib_samples={calib[0]}",
                 f"data.calib_seqlen={calib[1]}"] + ([f"rotate={rotate}"] if rotate else [])
    if quant == "recipe-serve":  # the recipe under the serving constraints (quant.* knobs)
        overrides += ["quant.kernel_widths=true", "quant.fuse_siblings=true"]
    elif quant == "recipe-kw":  # kernel widths alone
        overrides += ["quant.kernel_widths=true"]
    elif quant != "recipe":  # the recipe row keeps the default `ciuic` recipe's own budget
        overrides += ["recipe=none", "prune=none", "lowrank=none", f"quant={quant}",
                      f"quant.bits={bits}", f"quant.group_size={group}", "quant.sym=true"]
    tune_extra = [e for e in extra if e.startswith("tune.")]
    overrides += [e for e in extra if not e.startswith("tune.")]
    if tune == "full":  # block tuning, then distillation of scales and norms (tune=e2e)
        overrides += ["tune=full", f"tune.block.iters={iters}", f"tune.block.lr={lr}",
                      *(e if e.startswith(("tune.block.", "tune.e2e.")) else
                        e.replace("tune.", "tune.block.", 1) for e in tune_extra)]
    elif tune:
        overrides += ["tune=block", f"tune.iters={iters}", f"tune.lr={lr}", *tune_extra]
    t0 = time.perf_counter()
    model, report = compress(model, tok, compose(overrides), progress=False)
    return model, tok, report.totals()["bits_per_param"], time.perf_counter() - t0


def autoround_row(model_name: str, bits: int, group: int, iters: int, lr: float,
                  windows: torch.Tensor):
    from auto_round import AutoRound

    model, tok = load(model_name, device="cpu")
    t0 = time.perf_counter()
    ar = AutoRound(model, tok, bits=bits, group_size=group, sym=True, iters=iters, lr=lr,
                   nsamples=windows.shape[0], seqlen=windows.shape[1], batch_size=8,
                   dataset=[w[None] for w in windows], device_map="cpu",
                   enable_torch_compile=False)
    ar.quantize()
    seconds = time.perf_counter() - t0
    _check_quantised(model, bits, group)
    return model, tok, _grid_bits(model, bits, group), seconds


def _grid_bits(model: torch.nn.Module, bits: int, group: int) -> float:
    """Bits/param of the block Linears on a symmetric k-bit grid with one fp16 scale per
    (row, group), a narrower tail group counted as a whole one (576-wide inputs at g128 have
    five): what the lab's packed format stores for the same grid."""
    total = params = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            out, cols = mod.weight.shape
            total += bits * out * cols + 16 * out * -(-cols // group)
            params += out * cols
    return total / params


def _check_quantised(model: torch.nn.Module, bits: int, group: int) -> None:
    """Every block Linear's groups hold <= 2^bits distinct values (else the weights were not
    written back, and the row would score the dense model)."""
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w = mod.weight.detach().float()
            g = w[:8, :group * (w.shape[1] // group)].reshape(8, -1, group)
            distinct = max(len(torch.unique(g[r, k])) for r in range(8) for k in range(g.shape[1]))
            if distinct > 2 ** bits:
                raise RuntimeError(f"{name}: a group holds {distinct} values, more than a "
                                   f"{bits}-bit grid: AutoRound did not write its weights back")
            checked += 1
    if not checked:
        raise RuntimeError("no quantised Linear found in the model's blocks")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib", type=int, nargs=2, default=[32, 256], help="windows, seqlen")
    ap.add_argument("--rows", nargs="+",
                    default=["gptq", "rtn", "gptq+tune", "gptq+tune@rtn", "rtn+tune", "autoround"])
    ap.add_argument("--tune", nargs="*", default=[],
                    help="more overrides of the tuned lab rows, e.g. tune.keep=last or "
                         "tune.e2e.iters=600 (a bare tune.KEY of a tune=full row is its block "
                         "stage's); named in the row's method")
    ap.add_argument("--set", nargs="*", default=[],
                    help="more overrides of every lab row, e.g. prune.sparsity=0.3 quant.bits=3 "
                         "(a recipe row at another budget split); named in the row's method")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load(a.model, device="cpu")
    windows = test_windows(tok, a.seqlen)[: a.windows]
    cfg = compose([f"model.name_or_path={a.model}"])
    calib = calibration_windows(tok, a.calib[0], a.calib[1], int(cfg.data.calib_seed),
                                source=str(cfg.data.calib_source))
    dense = perplexity(model, windows, batch_size=1, progress=False)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    del model
    head = (f"{a.model}: WikiText-2, {windows.shape[0]} windows x {a.seqlen}, dense ppl "
            f"{dense:.2f}; calibration: the lab's {a.calib[0]} windows x {a.calib[1]} "
            f"({cfg.data.calib_source}, seed {cfg.data.calib_seed}); symmetric grids, g{a.group}; "
            f"{a.iters} steps, lr {a.lr}; fp32 on CPU; full-range symmetric grid (code 0 on "
            f"each group's largest magnitude, AutoRound's `int_sym`)")
    rows: list[str] = []
    print(head, flush=True)
    for bits in a.bits:
        for name in a.rows:
            if name == "autoround":
                m, _, bpp, secs = autoround_row(a.model, bits, a.group, a.iters, a.lr, calib)
            else:
                row, _, rotate = name.partition("/")
                quant, _, tune = row.partition("+")
                tune, _, start = tune.partition("@")
                extra = (*a.set, *a.tune, f"tune.start={start or 'stage'}")
                kind = {"": False, "tune": True, "full": "full"}[tune]
                m, _, bpp, secs = lab_row(a.model, bits, a.group, kind, a.iters,
                                          a.lr, tuple(a.calib), quant, extra, rotate)
            ppl = perplexity(m, windows, batch_size=1, progress=False)
            label = {"gptq": "lab gptq", "rtn": "lab rtn", "gptq+tune": "lab gptq + tune=block",
                     "gptq+tune@rtn": "lab gptq + tune=block from rtn",
                     "rtn+tune": "lab rtn + tune=block",
                     "rtn+full@rtn": "lab rtn + tune=full (block, then e2e distillation)",
                     "gptq+full@rtn": "lab gptq + tune=full from rtn",
                     "recipe": "lab recipe ciuic",
                     "recipe+full@rtn": "lab recipe ciuic + tune=full",
                     "recipe-serve": "lab recipe ciuic, kernel widths + fused siblings",
                     "recipe-kw": "lab recipe ciuic, kernel widths",
                     "recipe-serve+full@rtn": "lab recipe ciuic, kernel widths + fused "
                                              "siblings + tune=full",
                     "autoround": "AutoRound 0.16.1"}[name.partition("/")[0]] + (
                         f", rotate={name.partition('/')[2]}" if "/" in name else "")
            if name != "autoround":  # overrides are part of what the row measured
                label += "".join(f", {o}" for o in (*a.set, *(a.tune if tune else ())))
            if "/" in name and tied:  # a rotation unties tied embeddings: what the head adds
                out_w, in_w = m.get_output_embeddings().weight, m.get_input_embeddings().weight
                if out_w.data_ptr() != in_w.data_ptr():
                    label += (f" (+ untied head, {out_w.numel() * out_w.element_size() / 2**20:.1f}"
                              " MiB, not in bits/param)")
            shown = "mix" if name.startswith("recipe") else bits
            line = (f"| {label} | {shown} | {bpp:.3f} | {ppl:.2f} | {100 * (ppl / dense - 1):+.1f} %"
                    f" | {secs:.0f} | {time.strftime('%Y-%m-%d')} |")
            rows.append(line)
            print(line, flush=True)
            del m
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"peer_autoround_{a.model}.md"
    command = (f"python benchmarks/peer_autoround.py --model {a.model} --bits "
               f"{' '.join(map(str, a.bits))} --group {a.group} --iters {a.iters} --lr {a.lr} "
               f"--rows {' '.join(a.rows)}" + (f" --tune {' '.join(a.tune)}" if a.tune else "")
               + (f" --set {' '.join(a.set)}" if a.set else ""))
    merge_table(out, head, command, rows)
    print(f"wrote {out}")


TABLE = ["| method | bits | bits/param | ppl | Δppl vs dense | time s | measured |",
         "| --- | --- | --- | --- | --- | --- | --- |"]


def merge_table(path: Path, head: str, command: str, rows: list[str]) -> None:
    """Write `rows` into the table at `path`, replacing rows of the same method and width and
    keeping the others, when the file was written under the same settings (`head`: model,
    windows, calibration, grid, steps); otherwise start a new table. Several runs (one row
    each, hours apart) thus build one side-by-side table; each command is listed."""
    old_rows, commands = [], []
    if path.is_file():
        text = path.read_text().splitlines()
        if head in text:
            commands = [ln for ln in text if ln.startswith("- `python benchmarks/")]
            old_rows = [ln for ln in text if ln.startswith("| ") and ln not in TABLE]

    def key(line: str) -> tuple[str, str]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        return cells[0], cells[1]

    new_keys = {key(r) for r in rows}
    kept = [r for r in old_rows if key(r) not in new_keys]
    def width(line: str) -> float:  # the recipe's "mix" (about 3.3) sorts between 4 and 3
        return float(key(line)[1]) if key(line)[1].isdigit() else 3.5

    table = sorted(kept + rows, key=lambda r: (-width(r), key(r)[0]))
    cmd = f"- `{command}`"
    commands = [c for c in commands if c != cmd] + [cmd]
    path.write_text("\n".join(["Written by (each run replaces its own rows):", *commands, "",
                               head, "", *TABLE, *table, ""]))


if __name__ == "__main__":
    main()
