"""Compressed checkpoints: the packed model as safetensors + a JSON manifest.

    DIR/model.safetensors   every tensor the compressed model stores (packed codes, masks,
                            scales, factors; dense embeddings, norms, routers, head)
    DIR/compressed.json     format version, the model's HF config, each compressed layer's
                            format (CompressedLinear.meta), the run config, and the weights'
                            sha256 so that a corrupted file is rejected before it is used
    DIR/tokenizer files     when a tokenizer is given

Loading never unpickles: tensors come from safetensors, structure from JSON, and the model is
rebuilt from its config, its targets swapped for CompressedLinear shells of the stored shapes,
then filled with a strict load (a missing or extra tensor is an error).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ciuic_lab.compress.experts import CompressedExperts
from ciuic_lab.compress.linear import CompressedLinear
from ciuic_lab.compress.pipeline import _set_submodule

FORMAT = "ciuic_lab.compressed/1"
WEIGHTS = "model.safetensors"
MANIFEST = "compressed.json"


class CheckpointError(ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model: nn.Module, path: str | Path, tokenizer=None, run_config: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers, experts = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, CompressedLinear):
            layers[name] = {"in": mod.in_features, "out": mod.out_features, "meta": mod.meta}
        elif isinstance(mod, CompressedExperts):
            experts[name] = mod.num_experts
    # Tied tensors (e.g. embeddings shared with the head) are stored once; aliases recorded.
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(path / WEIGHTS), metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "model_config": model.config.to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "layers": layers,
        "experts": experts,
        "aliases": aliases,
        "run_config": run_config,
        "sha256": _sha256(path / WEIGHTS),
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The compressed model stored at `path`, without recompressing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    mpath, wpath = path / MANIFEST, path / WEIGHTS
    if not mpath.exists() or not wpath.exists():
        raise CheckpointError(f"{path} is not a compressed checkpoint: needs {MANIFEST} and {WEIGHTS}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}); the checkpoint is corrupted") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    if _sha256(wpath) != manifest["sha256"]:
        raise CheckpointError(f"{wpath} does not match the sha256 in {MANIFEST}: the file is "
                              f"truncated, corrupted or from another checkpoint")
    try:
        tensors = load_file(str(wpath))
    except SafetensorError as e:
        raise CheckpointError(f"{wpath} cannot be read as safetensors: {e}") from None

    cfg_dict = dict(manifest["model_config"])
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    dtype = getattr(torch, manifest["dtype"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for owner, n in manifest["experts"].items():
        orig = model.get_submodule(owner)
        shells = {}
        for e in range(n):
            for proj in ("gate_up_proj", "down_proj"):
                shells[(e, proj)] = _shell(f"{owner}.{e}.{proj}", manifest, tensors)
        _set_submodule(model, owner, CompressedExperts(
            [shells[(e, "gate_up_proj")] for e in range(n)],
            [shells[(e, "down_proj")] for e in range(n)], orig.act_fn))
    for name in manifest["layers"]:
        if ".experts." in name and name.rsplit(".", 2)[0] in manifest["experts"]:
            continue
        _set_submodule(model, name, _shell(name, manifest, tensors))
    for alias, target in manifest["aliases"].items():
        tensors[alias] = tensors[target]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # Non-persistent buffers (rotary caches) are not in state_dict; anything else must match.
    if missing or unexpected:
        raise CheckpointError(f"{wpath} does not match the model in {MANIFEST}: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval()


def _shell(name: str, manifest: dict, tensors: dict) -> CompressedLinear:
    spec = manifest["layers"].get(name)
    if spec is None:
        raise CheckpointError(f"{MANIFEST} has no entry for compressed layer {name}")
    prefix = name + "."
    shapes = {k[len(prefix):]: (tuple(t.shape), t.dtype) for k, t in tensors.items()
              if k.startswith(prefix) and "." not in k[len(prefix):]}
    if not shapes:
        raise CheckpointError(f"{WEIGHTS} holds no tensors for compressed layer {name}")
    return CompressedLinear.empty_like_meta(spec["in"], spec["out"], spec["meta"], shapes)
