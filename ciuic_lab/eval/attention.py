"""Attention in query chunks, for evaluating long windows block by block.

When PyTorch's scaled_dot_product_attention cannot use a fused kernel (on CPU, or whenever the
query and value head widths differ, as in DeepSeek's MLA: 192 vs 128 per head) it runs the math
path, which materialises the whole (batch, heads, L, L) score matrix and a few copies of it. At
L=2048 that is 200 MB per copy with 12 heads and 2 GiB with DeepSeek-V3's 128: in a streamed
evaluation it, not the block's weights, sets the peak. Cutting the queries into chunks of
`CHUNK` rows bounds it to (batch, heads, CHUNK, L). Every query row still sees all its keys in one
softmax, so the output is that of one call up to float rounding (a test checks).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

NAME = "ciuic_chunked_sdpa"
CHUNK = 256


def chunked_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0,
                 scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' SDPA attention (query (b, h, q, d), returns (b, q, h, dv)), `CHUNK` query
    rows at a time. A causal call without a mask gets an explicit one per chunk, offset for a
    key sequence longer than the queries."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len <= CHUNK:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    keys = torch.arange(kv_len, device=query.device)
    outs = []
    for s in range(0, q_len, CHUNK):
        e = min(s + CHUNK, q_len)
        if attention_mask is not None:
            mask = attention_mask if attention_mask.shape[-2] == 1 else attention_mask[..., s:e, :]
        elif causal:  # True = attend: key j is visible to query i when j <= i (+ the offset)
            rows = torch.arange(s, e, device=query.device) + (kv_len - q_len)
            mask = (keys[None, :] <= rows[:, None])[None, None]
        else:
            mask = None
        out, _ = sdpa_attention_forward(module, query[:, :, s:e], key, value, mask,
                                        dropout=dropout, scaling=scaling, is_causal=False, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, chunked_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA takes, built the same way


@contextmanager
def chunked_attention(model: torch.nn.Module):
    """Within the block, a model whose attention is SDPA runs it in query chunks; restored on
    exit. Other implementations (eager, flash) are left alone."""
    config = model.config
    before = config._attn_implementation
    if before != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
