"""Write a small synthetic checkpoint in DeepSeek-V3/R1's official FP8 format.

    python tests/fp8_checkpoint.py OUT_DIR [--layers 3] [--block 32] [--shards 3]

The format, as the official checkpoints store it:
- every linear weight of the blocks (attention projections, dense MLP, shared and routed experts)
  is float8_e4m3fn, with a float32 `<name>_scale_inv` of shape (ceil(out/B), ceil(in/B)) such that
  W = fp8 · scale_inv over each B×B block; embeddings, norms, routers (`mlp.gate`, its correction
  bias) and the head stay in 16/32-bit;
- routed experts per expert (`mlp.experts.{j}.gate_proj.weight`, `up_proj`, `down_proj`);
- config.json with `quantization_config: {quant_method: fp8, fmt: e4m3, activation_scheme:
  dynamic, weight_block_size: [B, B]}`;
- shards `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json` (`weight_map`).

`dequantized(model, dir)` returns the same model holding exactly the values the FP8 file encodes,
the "dequantised up front" reference a streamed run must match.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _is_fp8_weight(name: str, t: torch.Tensor) -> bool:
    return (t.dim() == 2 and name.startswith("model.layers.") and name.endswith("proj.weight"))


def quantize_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv (ceil(out/B), ceil(in/B))) with W ≈ fp8 · scale_inv."""
    out, cols = w.shape
    rb, cb = math.ceil(out / block), math.ceil(cols / block)
    padded = torch.zeros(rb * block, cb * block)
    padded[:out, :cols] = w.float()
    tiles = padded.view(rb, block, cb, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(rb * block, cb * block)[:out, :cols].contiguous(), scale.float()


def _per_expert(model, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fused experts tensor -> the official per-expert names (the adapter's layout)."""
    from ciuic_lab.models.adapters import adapter_for

    owner, _, proj = name.rpartition(".")
    state = model.state_dict()
    rows = state[f"{owner}.gate_up_proj"].shape[1]
    return {f"{ckpt}.weight": t[e, sl] for e in range(t.shape[0])
            for ckpt, fused, sl in adapter_for(model).expert_parts(owner, e, rows) if fused == proj}


def write_fp8_checkpoint(model, out: str | Path, block: int = 32, shards: int = 3) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        parts = _per_expert(model, name, t) if t.dim() == 3 and ".experts." in name else {name: t}
        for n, v in parts.items():
            if _is_fp8_weight(n, v):
                tensors[n], tensors[n + "_scale_inv"] = quantize_blocks(v, block)
            else:
                tensors[n] = v.to(torch.bfloat16) if v.is_floating_point() else v
    names = sorted(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[k * per:(k + 1) * per]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
         "weight_map": weight_map}, indent=1))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def dequantized(model, out: str | Path):
    """`model` holding exactly the values the FP8 checkpoint at `out` encodes (in bf16, as the
    streamed run reads them), dequantised up front."""
    from ciuic_lab.models.adapters import adapter_for
    from ciuic_lab.models.source import CheckpointSource

    src = CheckpointSource.from_dir(out)
    ad = adapter_for(model)
    state = ad.checkpoint_tensors(src.tensors("", "cpu", names=src.names("")))
    own = model.state_dict()
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
    return model


def main() -> None:
    from ciuic_lab.models import tiny
    from ciuic_lab.models.loader import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--shards", type=int, default=3)
    args = ap.parse_args()
    tok = load_tokenizer("tiny-random-deepseek-v3")
    model = tiny.build("tiny-random-deepseek-v3", vocab=len(tok), num_layers=args.layers)
    write_fp8_checkpoint(model, args.out, args.block, args.shards)
    tok.save_pretrained(args.out)
    print(f"FP8 checkpoint ({args.layers} layers, {args.block}x{args.block} blocks) -> {args.out}")


if __name__ == "__main__":
    main()
