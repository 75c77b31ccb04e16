"""Write a bundled model's card (README.md) from its training log and the project's own evaluator.

    python -m ciuic_lab.tools.card ciuic_lab/models/bundled/deepseek-v3-tiny

WikiText-2 perplexity is measured here with the DESIGN.md protocol (seqlen 512, every window),
plus the first 64 windows (`ppl_first64`, what the fast test reproduces); the samples are greedy
continuations. Nothing in the card is typed by hand.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["The history of the city", "In 1923 , the army", "The album was released"]


def measure(path: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ciuic_lab.data.wikitext import test_windows
    from ciuic_lab.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    windows = test_windows(tok, 512)
    t0 = time.perf_counter()
    full = perplexity(model, windows, batch_size=8, progress=False)
    first = perplexity(model, windows[:64], batch_size=8, progress=False)
    samples = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=40, do_sample=False, repetition_penalty=1.0)
        samples.append((p, tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    return {"ppl": full, "ppl_first64": first, "windows": int(windows.shape[0]),
            "eval_s": time.perf_counter() - t0, "samples": samples,
            "params": sum(p.numel() for p in model.parameters()), "config": model.config}


def render(path: Path, m: dict, log: dict) -> str:
    c = m["config"]
    arch = ("DeepSeek-V3 (transformers `DeepseekV3ForCausalLM`): multi-head latent attention "
            f"(q LoRA rank {c.q_lora_rank}, kv LoRA rank {c.kv_lora_rank}), first "
            f"{c.first_k_dense_replace} layer dense, then MoE with {c.n_shared_experts} shared and "
            f"{c.n_routed_experts} routed experts (top-{c.num_experts_per_tok}, moe_intermediate "
            f"{c.moe_intermediate_size})" if c.model_type == "deepseek_v3" else
            "DeepSeek-LLM's dense Llama layout (transformers `LlamaForCausalLM`)")
    # one line per sample: WikiText-style text carries blank lines and headings
    samples = "\n".join(f"- **{p}** →{' '.join(s.split())}" for p, s in m["samples"])
    return f"""# {path.name}

A small trained reference model for ciuic_lab's compression tests and benchmarks: real
DeepSeek layout, real (if small-scale) language-model weights, so that compression methods can be
told apart by quality. Not a useful language model by itself.

| | |
| --- | --- |
| architecture | {arch} |
| sizes | hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads, intermediate {c.intermediate_size}, vocab {c.vocab_size}, max positions {c.max_position_embeddings} |
| parameters | {m['params']:,} (bf16 safetensors, {(path / 'model.safetensors').stat().st_size / 2**20:.1f} MiB) |
| tokenizer | byte-level BPE, 8192 tokens, trained on the same corpus (`ciuic_lab/tools/tokenizer_train.py`) |
| training data | 709 English Wikipedia articles (2019 dump sample; CC BY-SA 3.0, see `ciuic_lab/data/bundled/wikipedia-calib/LICENSE.md`), rewritten into WikiText's tokenised style; {log['train_tokens']:,} training tokens, {len(log['val_articles'])} held-out validation articles; no WikiText-2 test article is in the corpus |
| training | `python -m ciuic_lab.tools.pretrain --arch {log['arch']} --corpus <pages or cache> --out <dir> --max-minutes {log['args']['max_minutes']} --device cuda` (seed {log['args']['seed']}, batch {log['args']['batch_size']}×{log['args']['seqlen']}, AdamW lr {log['args']['lr']}, cosine) |
| hardware, time | {log['device_name']}, {log['train_seconds']:.0f} s, {log['steps']:,} steps, {log['tokens_seen']:,} tokens seen ({log['tokens_per_s']:,.0f} tokens/s) |
| kept checkpoint | best validation loss: step {log['saved_step']}, validation loss {log['best_val_loss']:.3f} (final train loss {log['final_train_loss']:.3f}) |
| WikiText-2 perplexity | **{m['ppl']:.2f}** (raw test, seqlen 512, all {m['windows']} windows, fp32 on CPU, this project's evaluator; first 64 windows: {m['ppl_first64']:.3f}) |

The loss curve is `loss_curve.png`; the whole training history is `training_log.json`.

Greedy continuations (40 tokens):

{samples}

Licence: the weights are released with ciuic_lab (Apache-2.0); they were trained on CC BY-SA 3.0
text. Regenerate this card with `python -m ciuic_lab.tools.card {path}`.
"""


def main(paths: list[str]) -> None:
    for p in map(Path, paths):
        log = json.loads((p / "training_log.json").read_text())
        m = measure(p)
        (p / "README.md").write_text(render(p, m, log))
        (p / "card_metrics.json").write_text(json.dumps(
            {"wikitext2_ppl": m["ppl"], "wikitext2_ppl_first64": m["ppl_first64"],
             "seqlen": 512, "windows": m["windows"]}, indent=1))
        print(f"{p.name}: ppl {m['ppl']:.3f} (first 64: {m['ppl_first64']:.3f}), {m['eval_s']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
