"""Does it still talk? Greedy continuations of a few prompts, dense next to compressed.

Perplexity and accuracy can look fine while generation has collapsed into repetition; reading a
few continuations side by side catches that.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def _input_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _pad_id(model, tokenizer) -> int | None:
    for src in (tokenizer, getattr(model, "generation_config", None), model.config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(src, attr, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return None


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                         progress: bool = False) -> list[str]:
    """The greedy (do_sample=False) continuation of each prompt, prompt text excluded.

    Prompts run one at a time: there are few of them, and unpadded inputs make each continuation
    independent of the others (no left-padding effects on position ids).
    """
    device = _input_device(model)
    pad_id = _pad_id(model, tokenizer)
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt in tqdm(prompts, desc="generate", disable=not progress):
            enc = tokenizer(prompt, return_tensors="pt")
            ids = enc["input_ids"].to(device)
            mask = enc.get("attention_mask", torch.ones_like(ids)).to(device)
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=0,
                                 pad_token_id=pad_id, num_beams=1,
                                 # greedy: unset sampling knobs a checkpoint's config may carry
                                 temperature=None, top_p=None, top_k=None)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def side_by_side(prompts: list[str], dense: list[str], compressed: list[str]) -> list[dict]:
    """Rows {prompt, dense, compressed}, one per prompt (for result.json and a W&B table)."""
    if not len(prompts) == len(dense) == len(compressed):
        raise ValueError(f"{len(prompts)} prompts but {len(dense)} dense and "
                         f"{len(compressed)} compressed continuations")
    return [{"prompt": p, "dense": d, "compressed": c}
            for p, d, c in zip(prompts, dense, compressed)]
