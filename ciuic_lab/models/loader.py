"""load(name_or_path): a hub id, a local directory, a bundled reference model, or a tiny random one.

Bundled and hub models go through the same `from_pretrained` call, so the code path a user with a
network takes (a DeepSeek hub id) is the one the tests exercise on a local directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ciuic_lab.errors import ModelNotFound
from ciuic_lab.models import BUNDLED_DIR, TOKENIZER_DIR, tiny
from ciuic_lab.models.adapters import check_supported

_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def bundled_names() -> list[str]:
    if not BUNDLED_DIR.exists():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").exists())


def resolve(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str]:
    """('random' | 'local' | 'hub' | 'gguf', what to load). Cheap: reads no weights.

    A fetchable model (models/fetch.py REGISTRY) resolves to its converted directory once
    fetched. With gguf_file: the converted directory once converted, else ('gguf', the file).
    Raises ModelNotFound with the alternatives (or the fetch command) when the name can be neither.
    """
    from ciuic_lab.models import fetch  # lazy: conversion pulls in gguf and pip only when used

    s = str(name_or_path)
    if gguf_file:
        return fetch.resolve_gguf(s, gguf_file)
    if s in tiny.CONFIGS:
        return "random", s
    if s in bundled_names():
        return "local", str(BUNDLED_DIR / s)
    if s in fetch.REGISTRY:
        return "local", str(fetch.require(s))
    p = Path(os.path.expanduser(s))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFound(f"model.name_or_path: {s} is a directory without config.json")
        return "local", str(p)
    looks_like_path = s.startswith(("/", ".", "~")) or os.sep in s and not _HUB_ID.match(s)
    if looks_like_path or not _HUB_ID.match(s):
        raise ModelNotFound(
            f"model.name_or_path: {s!r} is not an existing directory, a hub id (org/name), a bundled "
            f"model ({', '.join(bundled_names()) or 'none'}) or a tiny random model "
            f"({', '.join(tiny.CONFIGS)})")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(s, "config.json"), str):
            raise ModelNotFound(f"model.name_or_path: hub id {s!r} is not in the local cache and "
                                f"HF_HUB_OFFLINE=1 forbids downloading it")
    return "hub", s


def load_config(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None,
                gguf_file: str | None = None):
    """The model's HF config, without its weights (for checks before anything is loaded; a GGUF
    not converted yet is read for its metadata only)."""
    from transformers import AutoConfig

    kind, target = resolve(name_or_path, gguf_file)
    if kind == "random":
        return tiny.CONFIGS[target](vocab=8192)
    if kind == "gguf":
        return AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file, revision=revision)
    return AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code, revision=revision)


def skeleton(name_or_path: str, dtype: torch.dtype, trust_remote_code: bool = False,
             revision: str | None = None):
    """The model's modules on the meta device: names, shapes and dtypes, no weights (a 671B model
    costs nothing to build this way). A streamed run fills it block by block."""
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path, trust_remote_code, revision)
    check_supported(config)
    # An FP8 source is dequantised by the lab's reader as it streams; the skeleton is plain.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


def fingerprint(name_or_path: str, revision: str | None = None) -> list[str]:
    """What identifies the weights a name resolves to, cheaply: for a local directory every file's
    name, size and mtime (a model retrained into the same directory changes it); for a hub id
    the cached snapshot's commit; for a random model its name. Part of cache keys."""
    kind, target = resolve(name_or_path)
    ident = [kind, target, str(revision)]
    if kind == "local":
        ident += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                  for p in sorted(Path(target).iterdir()) if p.is_file()]
    elif kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cfg = try_to_load_from_cache(target, "config.json", revision=revision)
        ident.append(Path(cfg).parent.name if isinstance(cfg, str) else "uncached")
    return ident


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bf16 on GPUs; fp32 on CPU where bf16 matmuls are slow and tests want exactness.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kind, target = resolve(name_or_path)
    src = str(TOKENIZER_DIR) if kind == "random" else target
    return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)


def load(name_or_path: str, dtype: str | torch.dtype = "auto", device: str = "auto",
         trust_remote_code: bool = False, experts_implementation: str | None = None,
         seed: int = 0, revision: str | None = None, gguf_file: str | None = None,
         tokenizer=None):
    """(model, tokenizer), model in eval mode on `device`; `tokenizer`: one already loaded for
    this model, reused.

    gguf_file: a GGUF inside name_or_path (a directory or hub id), converted once into the cache
    (models/fetch.py) and loaded from there like any local directory.
    """
    from transformers import AutoModelForCausalLM

    if gguf_file:
        from ciuic_lab.models.fetch import convert_cached

        name_or_path = str(convert_cached(name_or_path, gguf_file, revision=revision))
        revision = None  # it named the hub GGUF's revision; the converted directory has none
    kind, target = resolve(name_or_path)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tok = tokenizer if tokenizer is not None else load_tokenizer(name_or_path, trust_remote_code)
    if kind == "random":
        model = tiny.build(target, vocab=len(tok), seed=seed).to(dt)
    else:
        kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(
            target, dtype=dt, trust_remote_code=trust_remote_code, revision=revision, **kw)
    check_supported(model.config)
    if experts_implementation and kind == "random" and hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(experts_implementation)
        except ValueError:
            pass  # dense models have no experts to dispatch
    return model.to(dev).eval(), tok
