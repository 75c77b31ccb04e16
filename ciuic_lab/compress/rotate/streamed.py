"""The fused rotations applied to a streamed model (never whole in memory), part by part as
it loads: the same operations `fused.rotate_value_path` and `fused.rotate_model` apply."""

from __future__ import annotations

import torch
from torch import nn

from ciuic_lab.compress.rotate.fused import (
    ValuePath,
    get_path,
    residual_setup,
    rotate_block,
    rotate_ends,
    rotate_experts,
    rotation_adapter,
)


class StreamedRotation:
    """The fused rotations (`rotate_value_path`, then `rotate_model`) of a model that is never
    whole in memory (`blocks.Streamed`): the ends (embeddings, final norm, head) once when they
    load, each block every time it loads from the checkpoint, each chunk of routed experts as it
    is read. Every piece gets exactly the operations the in-memory transforms apply to it, so a
    streamed rotated run stores what an in-memory one does.

    Memory: one (hidden,) float64 MLP-norm scale per block that has routed experts (folded into
    their gate_up as they are read, after the block's own norm is already set to ones).
    Tied embeddings are untied in `ends` (as `rotate_model` does), which also sets the skeleton's
    config untied, so a checkpoint writer built on it stores the head separately;
    `untied_head_bytes` then says what that added.
    """

    def __init__(self, config, residual: str | None = "hadamard", value_path: bool = False,
                 seed: int = 0):
        if residual is None and not value_path:
            raise ValueError("StreamedRotation: nothing to rotate "
                             "(residual=None, value_path=False)")
        self.adapter = rotation_adapter(config)
        self.lay, self.rot = (residual_setup(config, seed, residual) if residual is not None
                              else (None, None))
        self.values = ValuePath.of(config, seed) if value_path else None
        self._scales: dict[int, torch.Tensor] = {}
        self.untied_head_bytes = 0

    def ends(self, model: nn.Module) -> None:
        if self.rot is not None:
            self.untied_head_bytes = rotate_ends(model, self.rot)

    def block(self, i: int, block: nn.Module) -> None:
        path = self.adapter.block_name(i)
        if self.values is not None:
            self.values.rotate(block, path)
        if self.rot is not None:
            _, g = rotate_block(block, self.lay, self.rot, path, check=i == 0)
            if any(get_path(block, p) is not None for p in self.lay.expert_readers):
                self._scales[i] = g

    def experts(self, i: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        if self.rot is not None:
            rotate_experts([gate_up], [down], self._scales[i], self.rot)
