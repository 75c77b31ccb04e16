"""Compressed checkpoints: the packed model as sharded safetensors + a JSON manifest.

    DIR/blocks-00000.safetensors   one shard per decoder block: its packed layers' buffers
    ...                            (codes, masks, scales, factors) and its dense norms / routers
    DIR/rest.safetensors           everything outside the blocks (embeddings, final norm, head)
    DIR/compressed.json            format version, the model's HF config, each packed layer's
                                   spec (its format key first: the loader dispatches on it), the
                                   fused-experts modules, tied-tensor aliases, the run config, and
                                   each shard's sha256 so a corrupted file is rejected before use
    DIR/tokenizer files            when a tokenizer is given

A shard is written as soon as its block is compressed (`CheckpointWriter`), so a model larger
than memory is written block by block, into a temporary directory beside DIR; the manifest is
written last and the directory then swapped in whole, so DIR is always a finished checkpoint (a
killed rerun leaves the previous one). Loading never unpickles: tensors come from safetensors,
structure from JSON; the model is rebuilt from its config, its layers swapped for shells of the
stored formats and shapes, then filled with a strict load (a missing or extra tensor is an error).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Self

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ciuic_lab.atomic import swap_in_dir, temp_dir_beside, write_text_atomic
from ciuic_lab.compress.store.experts import CompressedExperts
from ciuic_lab.compress.store.formats import format_class, is_packed
from ciuic_lab.compress.walk.blocks import (
    in_memory_experts,
    rebuild_non_persistent,
    return_freed_memory,
)
from ciuic_lab.errors import CheckpointError
from ciuic_lab.models.adapters import adapter_for
from ciuic_lab.models.source import check_complete, shard_path

FORMAT = "ciuic_lab.compressed/2"
MANIFEST = "compressed.json"
REST = "rest.safetensors"
_REQUIRED = ("format", "model_config", "dtype", "layers", "experts", "aliases", "shards")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def block_shard(i: int) -> str:
    return f"blocks-{i:05d}.safetensors"


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied tensors (e.g. embeddings shared with the head) stored once; aliases recorded."""
    out, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out, aliases


class CheckpointWriter:
    """Writes a compressed checkpoint shard by shard into a temporary directory beside `path`;
    `finish` writes the manifest last and swaps the directory in whole, so a checkpoint already at
    `path` (a rerun's) survives until the new one is complete. As a context manager it removes
    the temporary directory of a write that failed."""

    def __init__(self, path: str | Path, model_config, dtype: torch.dtype):
        self.path = Path(path)
        self.tmp = temp_dir_beside(self.path)
        self.manifest = {"format": FORMAT, "model_config": model_config.to_dict(),
                         "dtype": str(dtype).removeprefix("torch."), "layers": {}, "experts": {},
                         "aliases": {}, "shards": {}}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # gone already once finish() swapped it in

    def add(self, shard: str, module: nn.Module, prefix: str) -> None:
        """Write `module`'s state (names prefixed with `prefix.`) as one shard, recording the
        packed layers and fused experts found in it."""
        for name, mod in module.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if is_packed(mod):
                self.manifest["layers"][full] = mod.spec()
            elif isinstance(mod, CompressedExperts):
                self.manifest["experts"][full] = mod.num_experts
        self.add_tensors(shard, {f"{prefix}.{k}" if prefix else k: v
                                 for k, v in module.state_dict().items()})

    def add_tensors(self, shard: str, state: dict[str, torch.Tensor]) -> None:
        tensors, aliases = _dedupe(state)
        f = self.tmp / shard
        save_file(tensors, str(f), metadata={"format": FORMAT})
        self.manifest["aliases"].update(aliases)
        self.manifest["shards"][shard] = {"sha256": sha256_file(f), "bytes": f.stat().st_size,
                                          "tensors": sorted(tensors)}

    def finish(self, tokenizer=None, run_config: dict | None = None) -> Path:
        self.manifest["run_config"] = run_config
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.tmp))
        write_text_atomic(self.tmp / MANIFEST, json.dumps(self.manifest, indent=1))
        return swap_in_dir(self.tmp, self.path)


class _Cfg:
    """The model_type of a manifest, shaped like a config for adapter_for."""

    def __init__(self, manifest: dict):
        self.model_type = manifest["model_config"].get("model_type")


def save(model: nn.Module, path: str | Path, tokenizer=None, run_config: dict | None = None) -> Path:
    """Write an in-memory compressed model: one shard per block, then the rest, then the manifest."""
    ad = adapter_for(model)
    with CheckpointWriter(path, model.config, next(model.parameters()).dtype) as writer:
        for i, block in enumerate(ad.blocks(model)):
            writer.add(block_shard(i), block, ad.block_name(i))
        writer.add_tensors(REST, outside_blocks(model))
        return writer.finish(tokenizer, run_config)


def outside_blocks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state of everything outside the decoder blocks (embeddings, final norm, head)."""
    ad = adapter_for(model)
    prefixes = tuple(f"{ad.block_name(i)}." for i in range(len(ad.blocks(model))))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def read_manifest(path: str | Path) -> dict:
    """The manifest of a finished checkpoint, checked for the keys the loader needs."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{path} is not a finished compressed checkpoint: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}); the checkpoint is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{mpath}: unknown format {got!r}, expected {FORMAT}")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise CheckpointError(f"{mpath} lacks {', '.join(missing)}: the manifest is incomplete")
    for shard, entry in manifest["shards"].items():
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise CheckpointError(f"{mpath}: shard {shard} has no sha256")
    return manifest


def verify(path: str | Path) -> None:
    """Raise CheckpointError unless `path` holds a finished checkpoint whose every listed shard is
    present with the size the manifest recorded (or, for older manifests, the size its header
    needs). Cheap, without hashing: for deciding whether a run's artefacts survived."""
    path = Path(path)
    for shard, entry in read_manifest(path)["shards"].items():
        f = shard_path(path, shard, path / MANIFEST)
        if not f.exists():
            raise CheckpointError(f"{f} is missing (listed in {MANIFEST})")
        if "bytes" not in entry:
            check_complete(f)
        elif f.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{f} has {f.stat().st_size} bytes, {MANIFEST} recorded "
                                  f"{entry['bytes']}: truncated or replaced")


def stored_bytes(path: str | Path) -> int:
    """Bytes of every tensor a finished checkpoint stores (tied tensors once), from the shards'
    headers: what the model holds once loaded."""
    from safetensors import safe_open

    path = Path(path)
    total = 0
    for shard in read_manifest(path)["shards"]:
        file = shard_path(path, shard, path / MANIFEST)
        check_complete(file)  # safetensors' own error would not name the file
        with safe_open(str(file), "pt") as f:
            for k in f.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * torch.empty((), dtype=_dtype(sl.get_dtype())).element_size()
    return total


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
            "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
            "F64": torch.float64, "I16": torch.int16}[name]


def read_shard(path: Path, shard: str, manifest: dict) -> dict[str, torch.Tensor]:
    """A shard's tensors after checking its sha256 against the manifest."""
    f = shard_path(path, shard, path / MANIFEST)
    if not f.exists():
        raise CheckpointError(f"{f} is missing (listed in {MANIFEST})")
    if sha256_file(f) != manifest["shards"][shard]["sha256"]:
        raise CheckpointError(f"{f} does not match the sha256 in {MANIFEST}: the file is "
                              f"truncated, corrupted or from another checkpoint")
    try:
        return load_file(str(f))
    except SafetensorError as e:
        raise CheckpointError(f"{f} cannot be read as safetensors: {e}") from None


def skeleton(manifest: dict, device: str | torch.device = "cpu") -> nn.Module:
    """The dense model of the manifest's config, built with uninitialised weights on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = dict(manifest["model_config"])
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, manifest["dtype"]))


def install_shells(block: nn.Module, prefix: str, manifest: dict,
                   tensors: dict[str, torch.Tensor]) -> None:
    """Swap the block's packed layers for empty shells of their stored format and shapes,
    through the adapter's install (the same path the pipeline uses)."""
    ad = adapter_for(_Cfg(manifest))
    packed = {}
    for layer in ad.layers(block):
        full = f"{prefix}.{layer.name}"
        spec = manifest["layers"].get(full)
        if spec is None:
            owner = full.rsplit(".", 2)[0]
            if layer.expert is not None and owner in manifest["experts"]:
                raise CheckpointError(f"{MANIFEST} has no entry for compressed layer {full}")
            continue  # a layer the run left dense
        packed[layer.name] = (layer, _shell(full, spec, tensors))
    ad.install(block, packed, CompressedExperts)


def _shell(name: str, spec: dict, tensors: dict) -> nn.Module:
    prefix = name + "."
    shapes = {k[len(prefix):]: (tuple(t.shape), t.dtype) for k, t in tensors.items()
              if k.startswith(prefix) and "." not in k[len(prefix):]}
    if not shapes:
        raise CheckpointError(f"the checkpoint holds no tensors for compressed layer {name}")
    try:
        cls = format_class(spec["format"])
    except KeyError as e:
        raise CheckpointError(f"{name}: {e.args[0]}") from None
    return cls.shell(spec, shapes)


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The compressed model stored at `path`, without recompressing."""
    path = Path(path)
    manifest = read_manifest(path)
    tensors: dict[str, torch.Tensor] = {}
    for shard in manifest["shards"]:
        tensors.update(read_shard(path, shard, manifest))
    # A meta skeleton adopting the read tensors: one built on the CPU would hold the dense
    # model's weights while loading, and serving memory would peak at the dense size.
    model = skeleton(manifest, "meta")
    ad = adapter_for(model)
    for i, block in enumerate(ad.blocks(model)):
        install_shells(block, ad.block_name(i), manifest, tensors)
    for alias, target in manifest["aliases"].items():
        tensors[alias] = tensors[target]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    # Non-persistent buffers (rotary caches) are not in state_dict; anything else must match.
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model in {MANIFEST}: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    rebuild_non_persistent(model, torch.device("cpu"), ad)
    return model.to(device).eval()


class Stored:
    """The blocks of a compressed checkpoint, one at a time, for evaluating a compressed model
    that does not fit the device (a block-walk provider, see compress/walk/blocks.py)."""

    def __init__(self, path: str | Path, device: str | torch.device):
        return_freed_memory(fix_threshold=True)
        self.path, self.device = Path(path), torch.device(device)
        self.manifest = read_manifest(self.path)
        self.model = skeleton(self.manifest, "meta").eval()
        self.adapter = adapter_for(self.model)
        rest = read_shard(self.path, REST, self.manifest)
        for alias, target in self.manifest["aliases"].items():
            if target in rest:
                rest[alias] = rest[target]
        rest = {k: v.to(self.device) for k, v in rest.items()}
        self.model.load_state_dict(rest, strict=False, assign=True)
        for _, mod in [*self.adapter.pre_blocks(self.model), *self.adapter.post_blocks(self.model)]:
            rebuild_non_persistent(mod, self.device, self.adapter)

    def __len__(self) -> int:
        return len(self.adapter.blocks(self.model))

    def load(self, i: int) -> nn.Module:
        prefix = self.adapter.block_name(i)
        tensors = read_shard(self.path, block_shard(i), self.manifest)
        block = self.adapter.blocks(self.model)[i]
        install_shells(block, prefix, self.manifest, tensors)
        local = {k[len(prefix) + 1:]: v.to(self.device) for k, v in tensors.items()}
        block.load_state_dict(local, strict=True, assign=True)
        return block

    def release(self, i: int, block: nn.Module) -> None:
        self.adapter.blocks(self.model)[i] = block.to("meta")
        return_freed_memory()

    def experts(self, i: int, owner: str, module: nn.Module):
        return in_memory_experts(module, self.device, self.adapter)  # left dense: stored fused

    def rewrite(self, edit_block, edit_post) -> Path:
        """A new checkpoint: `edit_block(i, block)` on each block as it is read, `edit_post(post
        modules)` on the ends, written beside this one block by block and swapped in whole
        (CheckpointWriter), so a failure leaves this checkpoint as it was. The tokenizer and any
        other file beside the shards are carried over; the run config is kept."""
        old = self.manifest
        dtype = getattr(torch, old["dtype"])
        with CheckpointWriter(self.path, self.model.config, dtype) as writer:
            for i in range(len(self)):
                block = self.load(i)
                edit_block(i, block)
                writer.add(block_shard(i), block, self.adapter.block_name(i))
                self.release(i, block)
            edit_post(self.post())
            writer.add_tensors(REST, outside_blocks(self.model))
            for f in self.path.iterdir():
                if f.is_file() and f.name not in old["shards"] and f.name != MANIFEST:
                    shutil.copy2(f, writer.tmp / f.name)
            out = writer.finish(None, old.get("run_config"))
        self.manifest = read_manifest(self.path)
        return out

    def pre_on_device(self):
        return nullcontext()

    def post(self) -> list[nn.Module]:
        return [m for _, m in self.adapter.post_blocks(self.model)]
