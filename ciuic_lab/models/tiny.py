"""Tiny randomly initialised models built from config, for fast tests and smoke runs.

They have the real layouts (DeepSeek-V3 and V2, with and without q LoRA: MLA attention, a dense
first layer, MoE with shared and routed experts; Llama: DeepSeek-LLM's and R1-Distill-Llama's;
Qwen2: R1-Distill-Qwen's; Gemma 3: sliding-window and global layers, four norms per block, a
tied and scaled embedding) at a few hundred thousand parameters.
Random weights measure nothing about quality: use the trained reference models for that.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
)


def _deepseek_v3(vocab: int, layers: int = 3) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)


def _llama(vocab: int, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False)


def _deepseek_v2(vocab: int, layers: int = 3, q_lora_rank: int | None = None) -> DeepseekV2Config:
    return DeepseekV2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=1, topk_group=1, topk_method="greedy", q_lora_rank=q_lora_rank, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=False)


def _deepseek_v2_qlora(vocab: int, layers: int = 3) -> DeepseekV2Config:
    return _deepseek_v2(vocab, layers, q_lora_rank=32)


def _qwen2(vocab: int, layers: int = 2) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False)


def _gemma3(vocab: int, layers: int = 3) -> Gemma3TextConfig:
    # Every second layer global, as Gemma 3's every sixth; a window shorter than the test windows,
    # so that the sliding layers' mask really differs from the global layers'.
    return Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, max_position_embeddings=512, tie_word_embeddings=True,
        layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(layers)])


CONFIGS = {"tiny-random-deepseek-v3": _deepseek_v3, "tiny-random-deepseek-v2": _deepseek_v2,
           "tiny-random-deepseek-v2-qlora": _deepseek_v2_qlora, "tiny-random-llama": _llama,
           "tiny-random-qwen2": _qwen2, "tiny-random-gemma3": _gemma3}


def build(name: str, vocab: int, seed: int = 0, num_layers: int | None = None,
          tied: bool | None = None):
    """A seeded random model of one of CONFIGS (fp32, eval mode). `tied`: the head shares the
    input embedding's tensor, as in SmolLM2 (which the untied reference layouts do not cover);
    None keeps the layout's own (tied for Gemma 3, as the real one)."""
    kwargs = {} if num_layers is None else {"layers": num_layers}
    config = CONFIGS[name](vocab, **kwargs)
    if tied is not None:
        config.tie_word_embeddings = tied
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
