"""The packed-layer contract: what every stored form of a compressed weight provides.

A packed layer replaces one dense (out, in) weight (an nn.Linear, or one projection of one routed
expert). The pipeline, the byte counting, the per-layer report and the checkpoint talk to it only
through this contract, so a new format (a non-uniform codebook, a vendor kernel's layout) is one
file implementing it plus one line in FORMATS below:

    format          class attribute, the key the checkpoint stores and dispatches on
    in_features, out_features, params   the dense weight it replaces (params = out·in)
    nbytes()        bytes of every persistent buffer it holds: the truth of every memory figure
    dequantized_weight(dtype)   the dense (out, in) weight it computes with (the oracle)
    spec()          JSON-able description: with the buffers' shapes, enough to rebuild a shell
    shell(spec, shapes)         classmethod: an empty layer of that spec, ready for a strict
                    load_state_dict of its buffers (no unpickling, no recompression)
    forward(x)      y = x Wᵀ (+ bias)
"""

from __future__ import annotations

from importlib import import_module
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

# format key -> "module:Class". Keys are stable names written into checkpoints.
FORMATS = {
    "ciuic.packed": "ciuic_lab.compress.store.linear:CompressedLinear",
    "bnb": "ciuic_lab.compress.quant.bnb:BnbLinear",
}


@runtime_checkable
class PackedLayer(Protocol):
    format: ClassVar[str]
    in_features: int
    out_features: int

    @property
    def params(self) -> int: ...

    def nbytes(self) -> int: ...

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def spec(self) -> dict: ...

    @classmethod
    def shell(cls, spec: dict, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]): ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


def format_class(key: str) -> type:
    """The class that implements format `key` (imported on first use)."""
    if key not in FORMATS:
        raise KeyError(f"unknown packed format {key!r}; known: {', '.join(sorted(FORMATS))}")
    module, _, name = FORMATS[key].partition(":")
    return getattr(import_module(module), name)


def is_packed(module: nn.Module) -> bool:
    return isinstance(module, nn.Module) and isinstance(module, PackedLayer)


def buffer_nbytes(module: nn.Module) -> int:
    """Bytes of a module's persistent buffers (what a packed layer stores)."""
    return sum(b.numel() * b.element_size() for name, b in module.named_buffers()
               if name.rpartition(".")[2] not in _non_persistent(module, name))


def _non_persistent(root: nn.Module, name: str) -> set[str]:
    owner = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
    return owner._non_persistent_buffers_set
