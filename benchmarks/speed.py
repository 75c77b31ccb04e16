"""Dense vs compressed speed, measured side by side in one run: prefill and decode tokens/s, and the
WikiText-2 evaluation's wall time.

    nice python benchmarks/speed.py [--models deepseek-v3-tiny deepseek-llm-tiny llama-1b
                                     deepseek-v3-1b] [--threads 2] [--windows 8]

For each model: the dense model in bf16 (the dtype the int4/int8 kernels compute in, so the
comparison is like for like), then compressed copies held as they are served (packed layers
prepared for their kernels, compress/store/serve.py):
  - rtn 4-bit g128: every layer on PyTorch's int4 kernel (where N % 16 == 0)
  - the default `ciuic` recipe (calibrated on the model's own activations: on the random 1 B
    shapes the values mean nothing, but speed does not depend on them): mixed widths; layers
    without a kernel run the reference path; low-rank factors held decoded (`prepare`)
  - `ciuic serve`: the recipe with its serving constraints, quant.kernel_widths=true (every
    width on the int4 or int8 kernel) and quant.fuse_siblings=true
  The recipe's quality metrics run materialised, as the default run does.
Columns: prefill tokens/s (eval windows, batch 1), decode tokens/s (greedy, KV cache, batch 1,
128-token prompt), WikiText-2 wall time for --windows windows (the run's quality path: kernels for
rtn-4; for the recipe, weights materialised once from the packed form before kernels are prepared,
as the default run does), stored weight bytes. Ratios are
against the dense model of the same run. `llama-1b` / `deepseek-v3-1b` are random models of about
1B parameters (shape only: speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from ciuic_lab.compress.store.serve import materialized, prepare_for_inference
from ciuic_lab.eval.memory import stored_bytes
from ciuic_lab.eval.perplexity import perplexity
from ciuic_lab.eval.speed import decode_tokens_per_second, tokens_per_second

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ["rtn-4 g128", "ciuic", "ciuic serve"]
SHAPES = {
    "llama-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                     num_attention_heads=16, num_key_value_heads=16,
                                     vocab_size=32000, tie_word_embeddings=False)),
    "deepseek-v3-1b": ("DeepseekV3Config", dict(
        hidden_size=1536, intermediate_size=4096, moe_intermediate_size=512, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, n_routed_experts=32, n_shared_experts=1,
        num_experts_per_tok=4, first_k_dense_replace=1, n_group=1, topk_group=1,
        q_lora_rank=512, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
        v_head_dim=64, vocab_size=32000, tie_word_embeddings=False)),
}


def build(name: str, device: str):
    import transformers

    from ciuic_lab.models.loader import load, load_tokenizer

    if name in SHAPES:
        cls, kw = SHAPES[name]
        config = getattr(transformers, cls)(max_position_embeddings=2048, **kw)
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        return model.eval(), load_tokenizer("deepseek-llm-tiny")
    return load(name, dtype="bfloat16", device=device)


def quality(model, wiki, ctx) -> dict:
    """WikiText-2 perplexity and its wall time, computed within `ctx`."""
    t0 = time.perf_counter()
    with ctx:
        ppl = perplexity(model, wiki, batch_size=1, progress=False)
    return {"ppl": ppl, "wiki_s": time.perf_counter() - t0}


def measure(model, windows) -> dict:
    """Prefill and decode speed, peak memory and stored bytes of the model as it is held."""
    from ciuic_lab.eval.memory import PeakMemory
    from ciuic_lab.eval.perplexity import model_device

    dev = model_device(model)
    with PeakMemory(dev) as pm:
        prefill = tokens_per_second(model, windows, batch_size=1, max_windows=2)
    return {"prefill": prefill, "peak": pm.peak_bytes,
            "decode": decode_tokens_per_second(model, windows[0, :128], new_tokens=16),
            "bytes": stored_bytes(model)}


def compressed(model, tok, overrides: list[str]):
    from ciuic_lab.api import compress
    from ciuic_lab.config import compose

    m = copy.deepcopy(model)
    compress(m, tok, compose(overrides), progress=False)
    return m


def main() -> None:
    from contextlib import nullcontext

    from ciuic_lab.data.wikitext import test_windows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["deepseek-v3-tiny", "deepseek-llm-tiny", "llama-1b", "deepseek-v3-1b"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 512 timed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib", type=int, nargs=2, default=[16, 256],
                    help="recipe calibration: windows, tokens each")
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rtn4 = ["recipe=none", "prune=none", "lowrank=none", "quant=rtn", "quant.bits=4",
            "quant.group_size=128", f"device={args.device}"]
    # the recipe calibrates on the 1 B shapes too: fewer, shorter windows keep that minutes long
    recipe = [f"device={args.device}", f"data.calib_samples={args.calib[0]}",
              f"data.calib_seqlen={args.calib[1]}"]
    serve = [*recipe, "quant.kernel_widths=true", "quant.fuse_siblings=true"]
    print(f"{'model':18s} {'variant':11s} {'prefill t/s':>11s} {'decode t/s':>10s} "
          f"{'wiki s':>7s} {'ppl':>9s} {'MiB':>8s} {'peak MiB':>9s}   ratios vs dense "
          f"(prefill, decode, wiki time)")
    variants = "" if args.variants == VARIANTS else " --variants " + " ".join(
        f'"{v}"' if " " in v else v for v in args.variants)
    table = [f"Written by `python benchmarks/speed.py --models {' '.join(args.models)} --threads "
             f"{args.threads} --calib {args.calib[0]} {args.calib[1]}{variants}` on {args.device} "
             f"({torch.get_num_threads()} threads); batch 1; dense in bf16; decode greedy with "
             "KV cache after a 128-token prompt; `ciuic serve`: the recipe with "
             "quant.kernel_widths=true quant.fuse_siblings=true.", "",
             "| model | variant | prefill tok/s | decode tok/s | wiki s | ppl | MiB stored | "
             "prefill vs dense | decode vs dense | layers on a kernel |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.models:
        model, tok = build(name, args.device)
        windows = test_windows(tok, 512)
        wiki = windows[: args.windows]
        rows = {"dense": {**quality(model, wiki, nullcontext()), **measure(model, windows)}}
        variants = [("rtn-4 g128", rtn4, False), ("ciuic", recipe, True),
                    ("ciuic serve", serve, True)]
        for label, overrides, materialize in variants:
            if label not in args.variants:
                continue
            m = compressed(model, tok, overrides)
            # quality as the run measures it: before kernels, materialised from the packed form
            # (reading a weight back through a kernel would time that, not the evaluation)
            q = quality(m, wiki, materialized(m, torch.bfloat16) if materialize else nullcontext())
            kernels = prepare_for_inference(m, args.device, torch.bfloat16)
            rows[label] = {**q, **measure(m, windows)}
            rows[label]["kernels"] = sum(k != "reference" for k in kernels.values()), len(kernels)
            del m
        d = rows["dense"]
        for label, r in rows.items():
            ratio = "" if label == "dense" else (
                f"   {r['prefill'] / d['prefill']:.2f}x  {r['decode'] / d['decode']:.2f}x  "
                f"{r['wiki_s'] / d['wiki_s']:.2f}x  kernels {r['kernels'][0]}/{r['kernels'][1]}")
            print(f"{name:18s} {label:11s} {r['prefill']:11.1f} {r['decode']:10.2f} "
                  f"{r['wiki_s']:7.1f} {r['ppl']:9.2f} {r['bytes'] / 2**20:8.1f} "
                  f"{r['peak'] / 2**20:9.1f}{ratio}", flush=True)
            table.append(
                f"| {name} | {label} | {r['prefill']:.1f} | {r['decode']:.2f} | "
                f"{r['wiki_s']:.1f} | {r['ppl']:.2f} | {r['bytes'] / 2**20:.1f} | "
                + ("| | |" if label == "dense" else
                   f"{r['prefill'] / d['prefill']:.2f}x | {r['decode'] / d['decode']:.2f}x | "
                   f"{r['kernels'][0]}/{r['kernels'][1]} |"))
        del model
    out = RESULTS / f"speed_{args.device}.md"
    RESULTS.mkdir(exist_ok=True)
    out.write_text(_merged(out, table, args.models))
    print(f"wrote {out}")


def _merged(path: Path, table: list[str], models: list[str]) -> str:
    """This run's table, with the rows of other models kept from the file's earlier runs (each
    run's own line says how it was made: ratios compare rows of one run only)."""
    head, rows = table[:4], table[4:]  # the run's line, a blank, the header and its rule
    if not path.is_file():
        return "\n".join([*table, ""])
    old = path.read_text().splitlines()
    kept = [ln for ln in old if ln.startswith("| ") and not ln.startswith(("| model", "| ---"))
            and ln.split("|")[1].strip() not in models]
    if not kept:
        return "\n".join([*table, ""])
    # an earlier run's line stays while one of its models still has rows here
    named = {ln.split("|")[1].strip() for ln in kept}
    runs = [ln for ln in old if ln.startswith("Written by") and
            named & set(ln.partition("--models ")[2].partition(" --")[0].split())]
    return "\n".join([*runs, head[0], "", *head[2:], *kept, *rows, ""])


if __name__ == "__main__":
    main()
