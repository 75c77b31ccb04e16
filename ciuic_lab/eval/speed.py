"""Prefill throughput: tokens per second of forward passes over evaluation windows."""

from __future__ import annotations

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
