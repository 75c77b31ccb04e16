"""A compressed model made ready to compute: kernel layouts, or weights materialised once.

    kernels = prepare_for_inference(model, device, dtype)   # {layer name: kernel}
    with materialized(model, dtype):                         # quality metrics at dense speed
        perplexity(model, windows)

`prepare_for_inference` asks every packed layer that can (CompressedLinear.prepare) to re-encode
itself for the fastest kernel on the device; the model then holds those layouts, and its memory
and speed are measured that way. `materialized` swaps each packed layer for a dense nn.Linear
holding exactly the weight the layer computes with (its `dequantized_weight`), once, for
metrics where only the numbers matter; the packed layers come back when it exits.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ciuic_lab.compress.store.formats import is_packed
from ciuic_lab.models.adapters import swapped


def prepare_for_inference(model: nn.Module, device: torch.device | str, dtype: torch.dtype,
                          *, serve_dense: tuple[str, ...] | None = None, **flags) -> dict[str, str]:
    """{name: kernel} of every packed layer ("reference" where no kernel fits or the format has
    no `prepare`).

    serve_dense: name suffixes of layers held as a dense weight in `dtype` (DenseLayout) rather
    than on a kernel; by default the model's adapter's `serve_dense` (MLA's kv_b_proj, which
    transformers applies to every cached position at each decode step), () for none."""
    serve_dense = _adapter_serve_dense(model) if serve_dense is None else tuple(serve_dense)
    out = {}
    for name, mod in model.named_modules():
        if is_packed(mod):
            if not hasattr(mod, "prepare"):
                out[name] = "reference"
                continue
            out[name] = mod.prepare(device, dtype, dense=name.endswith(serve_dense), **flags)
    return out


def _adapter_serve_dense(model: nn.Module) -> tuple[str, ...]:
    from ciuic_lab.errors import UnsupportedModel
    from ciuic_lab.models.adapters import adapter_for

    try:
        return tuple(adapter_for(model).serve_dense)
    except UnsupportedModel:  # a model no adapter knows (or a bare module): nothing held dense
        return ()


class _Dense(nn.Module):
    """A packed layer's weight, rebuilt once (with its bias)."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(layer.dequantized_weight(dtype), requires_grad=False)
        bias = getattr(layer, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@contextmanager
def materialized(model: nn.Module, dtype: torch.dtype):
    """Within the block, every packed layer computes with its weight rebuilt once, in `dtype`.

    Costs the dense model's memory for the duration; the outputs are the packed layers' own up
    to float rounding (the same `dequantized_weight`)."""
    dense = {name: _Dense(mod, dtype) for name, mod in model.named_modules() if is_packed(mod)}
    with swapped(model, dense):
        yield model
