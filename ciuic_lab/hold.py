"""How a run holds its model, chosen once at its start (`hold`), so that nothing after asks.

    memory    the model whole on the device (`Resident`)
    offload   the model in host memory, one block at a time on the device (`Offloaded`)
    stream    never the whole model: a meta skeleton whose blocks are read from the checkpoint's
              shards (`Streamed`); each compressed block is written to `<out_dir>/compressed` as
              it finishes (`ToCheckpoint`), then that checkpoint is evaluated whole if it fits the
              device, else block by block (`Stored`)

The dense baseline, the rotation, every walk (profile, Fisher, compress, tuning) and the
compressed evaluation go through the `Held`'s provider and sink. Where memory goes: resident
modes hold the model (on the device, or on the host with a block and the activations on the
device); a streamed run holds the embeddings, head and final norm, one block (one chunk of its
routed experts) and the calibration activations, whatever the depth: DeepSeek-V3's 61 blocks ×
256 experts are never in memory together, nor every layer's statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from ciuic_lab import dist
from ciuic_lab.compress.walk.blocks import BlockProvider, Offloaded, Resident, fits
from ciuic_lab.compress.walk.pipeline import InPlace, Sink, ToCheckpoint
from ciuic_lab.config import rotations_on, to_container
from ciuic_lab.eval.memory import stored_bytes


def fits_whole(nbytes: int, device: torch.device) -> bool:
    """Whether a model of `nbytes` weights can be evaluated resident on `device` (with room for
    activations: a fifth more on a GPU, half more on the host)."""
    return fits(nbytes, device, 1.2 if device.type == "cuda" else 1.5)


@dataclass
class Compressed:
    """The compressed model as the run holds it once the walk is done."""

    model: nn.Module | None  # the model whole, when it is held whole (serving memory reads it)
    walk: Callable[[], BlockProvider] | None  # evaluate block by block through this, else `model`
    why: str | None  # why it is walked (the note says it)
    weight_bytes: int
    path: Path | None  # the compressed checkpoint, when one was written


@dataclass
class Held:
    """The dense model as the run holds it (`hold`), and where its compressed blocks go."""

    provider: BlockProvider
    sink: Sink
    tokenizer: object
    dense_bytes: int  # what a checkpoint of the dense model holds
    dense_params: int
    walk_why: str | None  # why the dense model is evaluated block by block; None: whole
    on_device: bool  # the dense model was whole on the device (its serving memory is measured)
    notes: list[str] = field(default_factory=list)
    walk_compressed: bool = False  # eval.stream=true: the compressed model is walked from memory

    @property
    def model(self) -> nn.Module:
        return self.provider.model

    def rotate(self, cfg: DictConfig, metrics: dict, notes: list[str]) -> None:
        """After the dense baseline (measured on the model as published): rotate in place."""
        if not rotations_on(cfg):
            return
        from hydra.utils import instantiate

        t0 = time.perf_counter()
        info = instantiate(cfg.rotate)(self.model)
        metrics["rotate/runtime_bytes"] = int(info["runtime_bytes"])
        metrics["rotate/untied_head_bytes"] = int(info["untied_head_bytes"])
        metrics["time/rotate_s"] = time.perf_counter() - t0

    def teacher(self, e2e, windows: torch.Tensor, expert_chunk: int):
        """`tune=e2e`'s teacher from the dense model: by one forward of the whole model when it
        is on the device, else walked block by block through the provider (e2e_walk.py)."""
        if self.on_device:
            return e2e.teacher(self.model, windows)
        from ciuic_lab.compress.tune import e2e_walk

        return e2e_walk.teacher(e2e, self.provider, windows, expert_chunk)

    def distil(self, e2e, teacher, progress: bool) -> dict:
        """`tune=e2e` on the compressed model: whole when it is on the device, else walked block
        by block through the provider, which writes the result in place."""
        if self.on_device:
            return e2e.run(self.model, teacher, progress=progress)
        from ciuic_lab.compress.tune import e2e_walk

        return e2e_walk.run(e2e, self.provider, teacher, progress)

    def compressed(self, cfg: DictConfig, device: torch.device, out_dir, world,
                   metrics: dict) -> Compressed:
        """The model compressed in place: on the device (packed, it fits where the dense model
        may not), saved when `save`; walked from memory with eval.stream=true."""
        model, walk = self.provider.model, self.walk_compressed
        if not walk:
            model.to(device)
        path = None
        if cfg.save and out_dir is not None and world.main:
            from ciuic_lab.compress.store.checkpoint import save

            path = save(model, Path(out_dir) / "compressed", tokenizer=self.tokenizer,
                        run_config=to_container(cfg))
        return Compressed(model, (lambda: Resident(model, device)) if walk else None,
                          "eval.stream=true" if walk else None, stored_bytes(model), path)


@dataclass
class HeldStreamed(Held):
    """A checkpoint read block by block; the compressed blocks written as they finish."""

    transform: object = None  # rotate.StreamedRotation, applied to each part as it loads

    def rotate(self, cfg: DictConfig, metrics: dict, notes: list[str]) -> None:
        if not rotations_on(cfg):
            return
        from ciuic_lab.compress.rotate.streamed import StreamedRotation

        r = cfg.rotate
        self.transform = StreamedRotation(self.model.config, r.residual, bool(r.value_path),
                                          int(r.seed))
        self.provider.transform_with(self.transform)
        metrics["rotate/runtime_bytes"] = 0
        notes.append("rotate: fused rotations applied to each block as it loads (their time is "
                     "part of time/compress_s)")

    def distil(self, e2e, teacher, progress: bool) -> dict:
        """`tune=e2e` on the written checkpoint, a packed block at a time; the distilled
        checkpoint replaces it (written beside, swapped in) only if its KL is lower."""
        from ciuic_lab.compress.store.checkpoint import Stored
        from ciuic_lab.compress.tune import e2e_walk

        return e2e_walk.run(e2e, Stored(self.sink.path, self.provider.device), teacher, progress)

    def compressed(self, cfg: DictConfig, device: torch.device, out_dir, world,
                   metrics: dict) -> Compressed:
        """The written checkpoint: loaded whole if it fits the device (eval.stream=auto), else
        walked from disk a packed block at a time."""
        from ciuic_lab.compress.store import checkpoint

        path = self.sink.path
        size = checkpoint.stored_bytes(path)
        if self.transform is not None:  # known once the walk has loaded (and untied) the ends
            metrics["rotate/untied_head_bytes"] = self.transform.untied_head_bytes
        resident = fits_whole(size, device) if cfg.eval.stream == "auto" else not cfg.eval.stream
        if world.on:  # one decision for every rank: the two evaluations split differently
            resident = dist.broadcast_object(resident)
        if resident:
            return Compressed(checkpoint.load(path, device), None, None, size, path)
        why = ("eval.stream=true" if cfg.eval.stream is True
               else f"{size / 2**30:.1f} GiB does not fit {device}")
        return Compressed(None, lambda: checkpoint.Stored(path, device), why, size, path)


def hold(cfg: DictConfig, device: torch.device, dtype: torch.dtype, *, model=None,
         tokenizer=None, out_dir=None, evaluate: bool = True) -> Held:
    """Load the model the way the config says (`compress.stream`, `compress.offload`, or whole on
    the device; `model`: a live model, held as it is) and pick the sink to match."""
    if cfg.compress.stream:
        return _hold_streamed(cfg, device, dtype, out_dir)
    from ciuic_lab.models.loader import load

    offload = bool(cfg.compress.offload) and device.type != "cpu"
    # eval.stream=true on a model held in memory: walk it block by block all the same (as a model
    # too large for the device would be), rather than ignore the setting.
    walk = evaluate and cfg.eval.stream is True
    notes = []
    if walk:
        notes.append("eval.stream=true: the dense and compressed models were evaluated block by "
                     "block from memory (Resident), not as whole models")
    m = cfg.model
    if model is None:
        model, tokenizer = load(m.name_or_path, dtype=dtype, device="cpu" if offload else str(device),
                                trust_remote_code=m.trust_remote_code,
                                experts_implementation=m.experts_implementation,
                                seed=int(cfg.seed), revision=m.revision)
    home = next(model.parameters()).device
    provider = (Resident if home == device else Offloaded)(model, device)
    why = "eval.stream=true" if walk else "compress.offload=true" if offload else None
    return Held(provider, InPlace(provider), tokenizer, stored_bytes(model),
                sum(p.numel() for p in model.parameters()), why, not offload, notes, walk)


def _hold_streamed(cfg: DictConfig, device: torch.device, dtype: torch.dtype, out_dir
                   ) -> HeldStreamed:
    from ciuic_lab.compress.walk.blocks import Streamed
    from ciuic_lab.models.loader import load_tokenizer, skeleton
    from ciuic_lab.models.source import CheckpointSource

    m = cfg.model
    source = CheckpointSource.open(m.name_or_path, m.revision)  # every shard checked first
    sk = skeleton(m.name_or_path, dtype, m.trust_remote_code, m.revision)
    tokenizer = load_tokenizer(m.name_or_path, m.trust_remote_code)
    # the checkpoint's sizes as published: read off the skeleton before any tensor loads
    dense_bytes, dense_params = stored_bytes(sk), sum(p.numel() for p in sk.parameters())
    provider = Streamed(sk, source, device)  # the one skeleton of the run

    def where() -> Path:
        path = _stream_dir(out_dir)
        return Path(dist.broadcast_object(str(path))) if dist.world().on else path  # rank 0's

    return HeldStreamed(provider, ToCheckpoint(provider, where, dtype), tokenizer, dense_bytes,
                        dense_params, "compress.stream=true", False)


def _stream_dir(out_dir) -> Path:
    """Where a streamed run writes its compressed model: <out_dir>/compressed, or a temporary
    directory (kept: it is the run's result) when there is no run directory."""
    if out_dir is not None:
        return Path(out_dir) / "compressed"
    import tempfile

    return Path(tempfile.mkdtemp(prefix="ciuic_compressed_"))
