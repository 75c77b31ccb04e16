"""WikiText-2 perplexity of a model that does not fit the device: block by block.

All windows go through block i, then all of them through block i+1; between blocks their hidden
states wait in an `Activations` store (device, pinned host memory, or a temporary file). Only
one block's weights (and, for a dense MoE block, one chunk of its routed experts) are on the
device at a time. The numbers are those of `perplexity.perplexity` on the same windows and batch
size: the same forward, cut between blocks (a test checks).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ciuic_lab import dist
from ciuic_lab.compress.walk.blocks import capture, dense_forward
from ciuic_lab.eval.attention import chunked_attention
from ciuic_lab.eval.perplexity import shifted_nll_sum


@torch.no_grad()
def streamed_perplexity(provider, windows: torch.Tensor, batch_size: int = 1,
                        expert_chunk: int = 8, progress: bool = True,
                        activations: str = "auto", split: bool = False) -> float:
    """exp(mean next-token NLL) over `windows` (n, seqlen), walking `provider`'s blocks.

    Memory: one block's weights (one chunk of its routed experts), every window's hidden state
    (n, seqlen, H) where `activations` puts them, and one query chunk's attention scores
    (eval/attention.py), whatever the depth. `split` (a distributed run): each rank walks its
    own batches (batch b on rank b mod N, so it holds 1/N of the hidden states) and the
    per-batch sums are added in batch order, as one process adds them."""
    split = split and dist.world().on
    own = dist.batches(windows.shape[0], batch_size) if split \
        else range(-(-windows.shape[0] // batch_size))
    with chunked_attention(provider.model):
        inputs = capture(provider, dist.my_windows(windows, batch_size) if split else windows,
                         batch_size, activations)
        for i in tqdm(range(len(provider)), desc="perplexity (streamed)", unit="block",
                      disable=not progress, leave=False):
            block = provider.load(i)
            inputs.hidden.replace(dense_forward(block, i, provider, inputs.at(i),
                                                      expert_chunk))
            provider.release(i, block)
    total, count = 0.0, 0
    post = provider.post()
    parts = []
    for b, (hidden, _kw) in zip(own, inputs):
        for mod in post:
            hidden = mod(hidden)
        s, c = shifted_nll_sum(hidden, windows[b * batch_size:(b + 1) * batch_size])
        parts.append((b, s, c))
        total += s
        count += c
    if split:
        total, count = dist.sum_in_order(parts)
    mean = total / count
    if math.isnan(mean):
        return float("nan")
    return math.exp(mean) if mean < 709.0 else float("inf")
