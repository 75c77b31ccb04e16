"""Weights read from a safetensors checkpoint on disk, tensor by tensor, when the walk needs them.

    src = CheckpointSource.open("deepseek-ai/DeepSeek-V3")   # or a local directory
    src.tensors("model.layers.7.", device="cuda")             # one block, dequantised on `device`

A checkpoint is one `model.safetensors` or shards listed by `model.safetensors.index.json`
(`weight_map`: tensor name -> shard file). Opening checks every shard before any work: its name
stays inside the directory, the file exists, its safetensors header parses, and the file is as
long as the header says (a truncated download fails here, naming the file, not an hour into the
walk).

FP8 sources (DeepSeek-V3/R1's official format: `quantization_config.quant_method == "fp8"`):
weights are float8_e4m3fn with a float32 `<name>_scale_inv` per block of
`quantization_config.weight_block_size` (128×128) elements, W = fp8 · scale_inv broadcast over
its block. They are dequantised as they load, on the device they load to, so host memory never
holds a dequantised copy. Memory: a call holds only the tensors it returns.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ciuic_lab.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _header_end(path: Path) -> int:
    """Bytes a safetensors file must have: its 8-byte length, its JSON header, the largest data
    offset in it. Raises CheckpointError naming the file if the header is unreadable."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > os.path.getsize(path) - 8:
                raise ValueError(f"its header claims {n} bytes, more than the file holds")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def check_complete(path: Path) -> None:
    """Raise CheckpointError naming `path` unless it is a safetensors file as long as its header
    says: safetensors' own error for a truncated file ("incomplete metadata") names no file."""
    need, have = _header_end(path), os.path.getsize(path)
    if have < need:
        raise CheckpointError(f"{path} is truncated: {have} bytes, its header needs {need}")


def shard_path(directory: str | Path, name: str, manifest: str | Path) -> Path:
    """Where the file a manifest (or safetensors index) lists as `name` lives in `directory`.

    A manifest is data that travels with downloaded checkpoints: a name that is absolute or
    climbs out (`../../x`) would make the loader read, and hash, files anywhere, so it is refused.
    The check is on the name, not the resolved path, so symlinked shards (the HF cache) still load.
    """
    first = Path(os.path.normpath(name)).parts[0]  # normpath("") is "."
    if Path(name).is_absolute() or first in ("..", "."):
        raise CheckpointError(f"{manifest}: shard name {name!r} is not a file inside {directory}")
    return Path(directory) / name


@dataclass
class FP8:
    block: tuple[int, int]  # (rows, cols) of one scale block


def fp8_dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) float8 · scale_inv (ceil(out/br), ceil(in/bc)) broadcast over its blocks."""
    br, bc = block
    s = scale_inv.float().repeat_interleave(br, 0)[: w.shape[0]].repeat_interleave(bc, 1)[:, : w.shape[1]]
    return (w.float() * s).to(dtype)


class CheckpointSource:
    """Tensor names -> shard files of one checkpoint; reads what is asked, nothing else."""

    def __init__(self, directory: str | Path, weight_map: dict[str, str], fp8: FP8 | None):
        self.dir = Path(directory)
        self.weight_map = weight_map
        self.fp8 = fp8

    @classmethod
    def open(cls, name_or_path: str, revision: str | None = None) -> CheckpointSource:
        """A local directory, a bundled model or a hub id (its snapshot in the HF cache)."""
        from ciuic_lab.models.loader import resolve

        kind, target = resolve(name_or_path)
        if kind == "random":
            raise CheckpointError(f"{name_or_path} is built in memory, it has no checkpoint to "
                                  "stream: save it with save_pretrained and stream that directory")
        if kind == "hub":
            from huggingface_hub import snapshot_download

            target = snapshot_download(target, revision=revision,
                                       allow_patterns=["*.json", "*.safetensors", "*.model",
                                                       "*.txt", "*.py"])
        return cls.from_dir(target)

    @classmethod
    def from_dir(cls, directory: str | Path) -> CheckpointSource:
        d = Path(directory)
        if (d / INDEX).exists():
            try:
                weight_map = json.loads((d / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{d / INDEX}: not a safetensors index ({e!r})") from None
        else:
            files = [d / SINGLE] if (d / SINGLE).exists() else sorted(d.glob("*.safetensors"))
            if len(files) != 1:
                raise CheckpointError(f"{d}: no {INDEX} and not exactly one .safetensors file "
                                      f"({len(files)} found)")
            check_complete(files[0])  # before safe_open, whose error would not name the file
            with safe_open(str(files[0]), "pt") as f:
                weight_map = dict.fromkeys(f.keys(), files[0].name)
        source = cls(d, weight_map, _fp8_config(d))
        for shard in sorted(set(weight_map.values())):
            path = source._path(shard)
            if not path.exists():
                raise CheckpointError(f"{path} is missing (listed in {INDEX})")
            check_complete(path)
        return source

    def _path(self, shard: str) -> Path:
        return shard_path(self.dir, shard, self.dir / INDEX)

    # ---- reading -----------------------------------------------------------------------------
    def names(self, prefix: str) -> list[str]:
        """Checkpoint tensor names under `prefix` (scale tensors of FP8 weights excluded)."""
        return sorted(k for k in self.weight_map
                      if k.startswith(prefix) and not k.endswith("_scale_inv"))

    def tensors(self, prefix: str, device: str | torch.device = "cpu",
                names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """{name without `prefix`: tensor on `device`} for the names under `prefix` (or `names`,
        full names starting with `prefix`), as stored; FP8 weights are dequantised to float32 on
        `device` with their block scales (the caller casts to the dtype it runs in)."""
        wanted = self.names(prefix) if names is None else names
        by_shard: dict[str, list[str]] = {}
        for k in wanted:
            if k not in self.weight_map:
                raise CheckpointError(f"{self.dir}: the checkpoint has no tensor {k}")
            by_shard.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for shard, keys in by_shard.items():
            with safe_open(str(self._path(shard)), "pt", device="cpu") as f:
                for k in keys:
                    out[k[len(prefix):]] = self._load(f, k, device)
        return out

    def _load(self, f, key: str, device) -> torch.Tensor:
        t = f.get_tensor(key).to(device)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_key = key + "_scale_inv"
            if self.fp8 is None or scale_key not in self.weight_map:
                raise CheckpointError(f"{self.dir}: {key} is float8 but the checkpoint has no "
                                      f"{scale_key} / fp8 quantization_config to dequantise it")
            scale = self._scale(scale_key, device)
            return fp8_dequantize(t, scale, self.fp8.block, torch.float32)
        return t

    def _scale(self, key: str, device) -> torch.Tensor:
        with safe_open(str(self._path(self.weight_map[key])), "pt", device="cpu") as f:
            return f.get_tensor(key).to(device)

    def nbytes(self) -> int:
        """Bytes of the checkpoint's weight files on disk."""
        return sum(os.path.getsize(self._path(s)) for s in set(self.weight_map.values()))


def _fp8_config(d: Path) -> FP8 | None:
    try:
        qc = json.loads((d / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    if qc.get("quant_method") != "fp8":
        return None
    block = qc.get("weight_block_size") or [128, 128]
    return FP8((int(block[0]), int(block[1])))
