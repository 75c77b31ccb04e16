"""WikiText-style perplexity: mean negative log-likelihood over every predicted token.

The protocol papers use (GPTQ, arXiv:2210.17323; SparseGPT, arXiv:2301.00774): non-overlapping
windows, each window predicts its seqlen-1 next tokens with no context carried across windows,
NLL averaged over all predicted tokens of all windows, then exponentiated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ciuic_lab import dist

# Positions per float32 log-softmax: a 2048 x 129k-vocab logit block in float32 is 1 GB, so the
# upcast is done in slices to keep evaluation memory close to the model's own activations.
_LOSS_CHUNK = 512


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless module."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def logits_of(out) -> torch.Tensor:
    """Logits from an HF ModelOutput, a tuple whose first item is the logits, or a bare tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def shifted_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL (float32 maths) over positions 0..L-2 of each row, and their count."""
    n, length, vocab = logits.shape
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for s in range(0, length - 1, _LOSS_CHUNK):
        e = min(s + _LOSS_CHUNK, length - 1)
        chunk = logits[:, s:e].float().reshape(-1, vocab)
        target = input_ids[:, s + 1:e + 1].reshape(-1).to(logits.device)
        total += F.cross_entropy(chunk, target, reduction="sum").double()
    return float(total), n * (length - 1)


@torch.no_grad()
def nll_sum(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1,
            progress: bool = True, split: bool = False) -> tuple[float, int]:
    """(sum of NLL in nats, number of predicted tokens) of `model` over `windows` (n, seqlen).

    `split` (in a distributed run): each rank scores its own batches (batch b on rank b mod N)
    and the per-batch sums are added in batch order on every rank, as one process adds them:
    the same perplexity to the last bit."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, seqlen>=2), got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    dev = model_device(model)
    total, count = 0.0, 0
    split = split and dist.world().on
    starts = ([b * batch_size for b in dist.batches(windows.shape[0], batch_size)] if split
              else range(0, windows.shape[0], batch_size))
    parts = []
    try:
        for i in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
            ids = windows[i:i + batch_size].to(dev)
            logits = logits_of(model(input_ids=ids, use_cache=False))
            s, c = shifted_nll_sum(logits, ids)
            if split:
                parts.append((i // batch_size, s, c))
            total += s
            count += c
            del logits
    finally:
        model.train(was_training)
    if split:
        return dist.sum_in_order(parts)
    return total, count


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1,
               progress: bool = True, split: bool = False) -> float:
    """exp(mean NLL) over all predicted tokens of all windows; inf if the mean overflows.
    `split`: share the windows among the ranks of a distributed run (see `nll_sum`)."""
    total, count = nll_sum(model, windows, batch_size=batch_size, progress=progress,
                           split=split)
    mean = total / count
    if math.isnan(mean):
        return float("nan")
    return math.exp(mean) if mean < 709.0 else float("inf")  # exp overflows a double above ~709.78
