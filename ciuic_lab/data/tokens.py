"""Tokenise long texts once per tokenizer, exactly, and cache the ids in memory.

Sweeps evaluate many configurations with the same tokenizer; tokenising WikiText-2 (1.3 MB) each
time would cost seconds per job, so ids are cached under a fingerprint of the tokenizer's content
(not its object identity, so reloading the same tokenizer hits the cache).
"""

from __future__ import annotations

import hashlib
import json
import weakref

import torch

_CACHE: dict[tuple[str, str], torch.Tensor] = {}
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(tokenizer) -> str:
    """Stable id of what a tokenizer does: its name plus a hash of its vocabulary/merges.

    Memoised per tokenizer object (serialising a 100k-token vocabulary costs ~0.1 s) and
    recomputed when its length changes, since added tokens change the tokenisation.
    """
    size = len(tokenizer)
    try:
        memo = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        memo = None
    if memo is not None and memo[0] == size:
        return memo[1]
    fp = _fingerprint(tokenizer)
    try:
        _FINGERPRINTS[tokenizer] = (size, fp)
    except TypeError:
        pass
    return fp


def _fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def encode(tokenizer, text: str) -> list[int]:
    """All ids of `text`, no special tokens, no truncation and no too-long warning."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode"):
        # The fast backend directly: one exact pass, and transformers' max-length check is skipped.
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def cached_ids(tokenizer, key: str, text_fn) -> torch.Tensor:
    """1-D LongTensor of the ids of `text_fn()`; computed once per (tokenizer, key). A copy."""
    k = (fingerprint(tokenizer), key)
    if k not in _CACHE:
        _CACHE[k] = torch.tensor(encode(tokenizer, text_fn()), dtype=torch.long)
    return _CACHE[k].clone()
