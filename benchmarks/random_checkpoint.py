"""Write a random checkpoint of a real DeepSeek architecture's shape, one block at a time.

    python benchmarks/random_checkpoint.py OUT --shape deepseek-v2-lite [--layers N] [--fp8]

The model is never built: each block's tensors are drawn (seeded, scaled like an initialised
model) and written to its own shard, in the official per-expert layout, with an index and a
config.json; the tokenizer is the bundled one. So a 30 GB checkpoint costs one block of memory
to write. `--layers N` keeps the first N blocks (the per-block figures then scale to the full
depth). `--fp8` writes DeepSeek-V3's FP8 format (float8_e4m3fn + 128x128 weight_scale_inv).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # deepseek-ai/DeepSeek-V2-Lite's config.json (15.7B parameters: 27 layers, MLA without
    # q LoRA, 64 routed experts of 1408 + 2 shared, top-6, first layer dense)
    "deepseek-v2-lite": ("DeepseekV2Config", dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        n_group=1, topk_group=1, topk_method="greedy", q_lora_rank=None, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096,
        tie_word_embeddings=False, rms_norm_eps=1e-6)),
    # the CPU benchmark's DeepSeek-V3 shape: fewer, wider experts (20 layers ~ 3 GB in bf16)
    "deepseek-v3-bench": ("DeepseekV3Config", dict(
        hidden_size=1536, intermediate_size=4096, moe_intermediate_size=2048,
        num_hidden_layers=20, num_attention_heads=12, num_key_value_heads=12,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=1, topk_group=1, q_lora_rank=512, kv_lora_rank=256, qk_rope_head_dim=32,
        qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=False)),
}


def _config(shape: str, layers: int | None, vocab: int):
    import transformers

    cls, kw = SHAPES[shape]
    kw = dict(kw, vocab_size=vocab)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return getattr(transformers, cls)(**kw)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _random(shape, gen: torch.Generator, name: str) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape)
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape)
    fan_in = shape[-1]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def _fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    out, cols = w.shape
    rb, cb = math.ceil(out / block), math.ceil(cols / block)
    pad = torch.zeros(rb * block, cb * block)
    pad[:out, :cols] = w
    tiles = pad.view(rb, block, cb, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rb * block, cb * block)
    return q[:out, :cols].contiguous(), scale.float()


def write(out: Path, shape: str, layers: int | None = None, fp8: bool = False, seed: int = 0) -> int:
    """Write the checkpoint; returns its bytes on disk."""
    from ciuic_lab.models.adapters import adapter_for
    from ciuic_lab.models.loader import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer("deepseek-v3-tiny")
    config = _config(shape, layers, len(tok))
    model = _meta_model(config)
    ad = adapter_for(model)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0

    def dump(file: str, tensors: dict) -> None:
        nonlocal total
        stored = {}
        for name, t in tensors.items():
            if fp8 and t.dim() == 2 and name.endswith("proj.weight") and ".layers." in name:
                stored[name], stored[name + "_scale_inv"] = _fp8(t)
            else:
                stored[name] = t.to(torch.bfloat16)
        save_file(stored, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(stored, file))
        total += (out / file).stat().st_size

    blocks = ad.blocks(model)
    prefixes = tuple(f"{ad.block_name(i)}." for i in range(len(blocks)))
    dump("model-rest.safetensors", {k: _random(tuple(v.shape), gen, k)
                                    for k, v in model.state_dict().items()
                                    if not k.startswith(prefixes)})
    for i, block in enumerate(blocks):
        prefix = ad.block_name(i)
        tensors = {}
        for name, t in block.state_dict().items():
            full = f"{prefix}.{name}"
            if t.dim() == 3 and name.rpartition(".")[2] in ad.expert_projs:  # per expert
                owner, _, proj = full.rpartition(".")
                rows = dict(block.state_dict())[name.replace(proj, "gate_up_proj")].shape[1]
                for e in range(t.shape[0]):
                    for ckpt, fused, sl in ad.expert_parts(owner, e, rows):
                        if fused == proj:
                            tensors[f"{ckpt}.weight"] = _random(tuple(t[e, sl].shape), gen, ckpt)
            else:
                tensors[full] = _random(tuple(t.shape), gen, full)
        dump(f"model-{i:05d}.safetensors", tensors)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg = config.to_dict()
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                      "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save_pretrained(str(out))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="deepseek-v2-lite")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--fp8", action="store_true")
    args = ap.parse_args()
    size = write(args.out, args.shape, args.layers, args.fp8)
    print(f"{args.shape} ({args.layers or 'all'} layers{', fp8' if args.fp8 else ''}): "
          f"{size / 2**30:.2f} GiB -> {args.out}")


if __name__ == "__main__":
    main()
