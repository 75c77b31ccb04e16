"""Dense vs compressed on one CUDA device: weight bytes, peak memory, prefill tokens/s.

    python benchmarks/gpu_memory_speed.py [--reference DIR] [--big] [--recipe magnitude50-rtn4]

Models: the bundled reference model (or any HF directory) and, with --big, a randomly initialised
DeepSeek-V3-shaped model of a few hundred million parameters (random weights are fine for memory
and speed). Compression runs layer by layer (model on CPU, one block at a time on the GPU), so
its peak GPU memory is reported too. Everything is measured in this one process, side by side.
Needs only torch + transformers + this package (no Hydra, W&B or lm-eval).
"""

from __future__ import annotations

import argparse
import time

import torch

from ciuic_lab.compress.lowrank.svd import SVD
from ciuic_lab.compress.pipeline import compress_model
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.eval.memory import PeakMemory, stored_bytes

RECIPES = {
    "magnitude50-rtn4": lambda: [Magnitude(0.5), RTN(4, 128)],
    "rtn4": lambda: [RTN(4, 128)],
    "magnitude50-svd-rtn4": lambda: [Magnitude(0.5), SVD(ratio=0.05), RTN(4, 128)],
}


def big_deepseek_v3():
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704,
        num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
        topk_group=1, q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32,
        qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=2048)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval(), None


def reference(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(),
            AutoTokenizer.from_pretrained(path))


@torch.no_grad()
def forward_stats(model, windows) -> tuple[int, float]:
    """(peak allocated bytes over the forwards, prefill tokens/s)."""
    model(windows[:1].cuda())  # warm-up
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    with PeakMemory("cuda") as pm:
        t0 = time.perf_counter()
        for w in windows:
            model(w[None].cuda())
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return pm.peak_bytes, windows.numel() / dt


def measure(name, loader, recipe, seqlen=512, n=8):
    model, tok = loader()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    if tok is not None:
        from ciuic_lab.data.wikitext import test_windows
        windows = test_windows(tok, seqlen)[:n]
    else:
        windows = torch.randint(0, vocab, (n, seqlen), generator=g)
    if tok is None:
        calib = torch.randint(0, vocab, (16, seqlen), generator=g)
    else:  # calibration from the bundled Wikipedia slice, never the test windows
        from ciuic_lab.data.calibration import calibration_windows
        calib = calibration_windows(tok, 16, seqlen, 0)
    params = sum(p.numel() for p in model.parameters())
    dense_bytes = stored_bytes(model)
    model.cuda()
    d_peak, d_tps = forward_stats(model, windows)
    model.cpu()
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    with PeakMemory("cuda") as cpm:
        report = compress_model(model, calib, RECIPES[recipe](), batch_size=4, progress=False,
                                device="cuda")
    c_time = time.perf_counter() - t0
    comp_bytes = stored_bytes(model)
    model.cuda()
    c_peak, c_tps = forward_stats(model, windows)
    del model
    torch.cuda.empty_cache()
    mib = 2**20
    return [
        (f"{name}: parameters", f"{params / 1e6:.1f} M"),
        ("  compressed layers bits/param", f"{report.totals()['bits_per_param']:.3f}"),
        ("  weight MiB dense | compressed | ratio",
         f"{dense_bytes / mib:.1f} | {comp_bytes / mib:.1f} | {dense_bytes / comp_bytes:.2f}x"),
        ("  peak GPU MiB in prefill dense | compressed | ratio",
         f"{d_peak / mib:.1f} | {c_peak / mib:.1f} | {d_peak / c_peak:.2f}x"),
        ("  prefill tokens/s dense | compressed | ratio",
         f"{d_tps:,.0f} | {c_tps:,.0f} | {c_tps / d_tps:.2f}x"),
        ("  layer-by-layer compression: s | peak GPU MiB",
         f"{c_time:.1f} | {cpm.peak_bytes / mib:.1f}"),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", default=None)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--recipe", default="magnitude50-rtn4", choices=sorted(RECIPES))
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, recipe {a.recipe}")
    rows = []
    if a.reference:
        rows += measure(f"reference {a.reference}", lambda: reference(a.reference), a.recipe)
    if a.big:
        rows += measure("random DeepSeek-V3-shaped", big_deepseek_v3, a.recipe)
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
