"""Speed: prefill tokens/s over evaluation windows, and greedy decode tokens/s with the KV cache."""

from __future__ import annotations

import inspect
import time

import torch

from ciuic_lab.eval.perplexity import model_device


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def tokens_per_second(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1,
                      max_windows: int = 8) -> float:
    """Forward-only tokens/s over the first `max_windows` windows, after one warm-up window.

    The warm-up absorbs one-off costs (kernel selection, allocator growth, lazy init) that would
    otherwise dominate a short measurement.
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty (n, seqlen) tensor, got {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    dev = model_device(model)
    timed = windows[:max(1, max_windows)].to(dev)
    try:
        model(input_ids=timed[:1], use_cache=False)
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(0, timed.shape[0], batch_size):
            model(input_ids=timed[i:i + batch_size], use_cache=False)
        _sync(dev)
        elapsed = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return timed.numel() / max(elapsed, 1e-9)


@torch.no_grad()
def decode_tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor,
                             new_tokens: int = 32) -> float:
    """Greedy decoding with the KV cache, batch 1: tokens/s over `new_tokens` steps after the
    prompt (1-D ids) has been prefilled, one warm-up step first. Each step runs the model on one
    token: the regime where weight bytes, not arithmetic, set the speed."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    ids = prompt.reshape(1, -1).to(dev)
    try:
        # transformers renamed `past_key_values` to `cache` (5.2x); take whichever forward has.
        key = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
        out = model(input_ids=ids, use_cache=True)
        cache, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
        out = model(input_ids=token, use_cache=True, **{key: cache})  # warm-up step
        cache, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{key: cache})
            cache, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
        _sync(dev)
        elapsed = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return new_tokens / max(elapsed, 1e-9)
