"""bitsandbytes baselines, the quantisers a user would reach for instead of this lab's pipeline.

- NF4 (Dettmers et al., QLoRA, arXiv 2305.14314): 4-bit NormalFloat codes, one fp32 absmax per
  block of `blocksize` weights (64, bitsandbytes' default; no double quantisation of the absmax).
- LLM.int8() (Dettmers et al., arXiv 2208.07339): int8 weights with one fp32 scale per output row;
  at matmul time input features above `threshold` go through a 16-bit path (the mixed-precision
  decomposition).

They run through bitsandbytes itself (`quantize_4bit` / `matmul_4bit`, `int8_vectorwise_quant` /
`matmul`), on CUDA or on the CPU where the installed version supports it (0.45+). `BnbLinear`
keeps what bitsandbytes stores as persistent buffers, so `nbytes()` and the run's memory figures
count codes, absmax and scales, like every other layer here. They are whole-weight baselines: no
calibration, and no prune or low-rank stage with them. Install with `pip install 'ciuic_lab[bnb]'`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ciuic_lab.compress.base import ConfigError, Method, _check
from ciuic_lab.compress.linear import LayerState
from ciuic_lab.compress.stats import LayerStats


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:  # an optional extra
        raise ConfigError("quant=bnb_*: needs bitsandbytes (pip install 'ciuic_lab[bnb]')") from e
    return bitsandbytes


class BnbLinear(nn.Module):
    """One weight as bitsandbytes stores it. scheme 'nf4': packed 4-bit codes (uint8, two per
    byte) + fp32 absmax per block + the 16-entry NF4 code table; 'int8': int8 codes (out, in) +
    fp32 scale per row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                 blocksize: int = 64, threshold: float = 6.0):
        super().__init__()
        bnb = _bnb()
        self.out_features, self.in_features = weight.shape
        self.scheme, self.blocksize, self.threshold = scheme, blocksize, threshold
        w = weight.detach()
        if scheme == "nf4":
            packed, qs = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                      compress_statistics=False)
            self.register_buffer("packed", packed)
            self.register_buffer("absmax", qs.absmax)
            self.register_buffer("code", qs.code)
        elif scheme == "int8":
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.half())
            self.register_buffer("cb", cb)
            self.register_buffer("scb", scb)
        else:
            raise ValueError(f"unknown bitsandbytes scheme {scheme!r}")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _state4(self, dtype: torch.dtype):
        from bitsandbytes.functional import QuantState

        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          code=self.code, blocksize=self.blocksize, quant_type="nf4", dtype=dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        bnb = _bnb()
        if self.scheme == "nf4":
            return bnb.functional.dequantize_4bit(self.packed, self._state4(torch.float32)).to(dtype)
        return (self.cb.float() * (self.scb.float() / 127.0)[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.scheme == "nf4":
            return bnb.matmul_4bit(x, self.packed.t(), bias=bias, quant_state=self._state4(x.dtype))
        if x.dtype == torch.float32 and x.device.type == "cpu":
            # bitsandbytes' int8 path wants 16-bit activations; a fp32 CPU model gets the same
            # int8 weights applied in fp32
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        state = bnb.MatmulLtState()
        state.CB, state.SCB = self.cb, self.scb
        state.threshold, state.has_fp16_weights, state.is_training = self.threshold, False, False
        return bnb.matmul(x, self.cb, bias=bias, state=state)

    def extra_repr(self) -> str:
        return (f"{self.scheme}, in={self.in_features}, out={self.out_features}, "
                f"bits/param={8 * self.nbytes() / self.params:.3f}")


@dataclass
class BnbQuant(Method):
    """A bitsandbytes baseline as the quant stage (see the module docstring)."""

    stage: ClassVar[str] = "quant"
    alone: ClassVar[bool] = True  # no prune or low-rank stage with it
    scheme: str = "nf4"  # nf4 | int8
    blocksize: int = 64  # nf4: weights per absmax
    threshold: float = 6.0  # int8: outlier threshold of the mixed-precision decomposition
    policy: str = "uniform"
    layers: dict | None = None  # {name pattern: null} leaves a layer in 16-bit

    def __post_init__(self):
        _check(self.scheme in ("nf4", "int8"), "quant.scheme", f"must be nf4 or int8, got {self.scheme!r}")
        _check(self.blocksize in (64, 128, 256, 512, 1024, 2048, 4096), "quant.blocksize",
               f"must be a power of two in 64..4096 (bitsandbytes' block sizes), got {self.blocksize!r}")
        _check(self.threshold >= 0, "quant.threshold", f"must be >= 0, got {self.threshold!r}")
        self._check_layers()
        _bnb()

    def _check_budget(self, key: str, budget) -> None:
        _check(False, key, f"a bitsandbytes baseline can only leave layers out (null), got {budget!r}")

    def target(self) -> float:
        return 4.0 if self.scheme == "nf4" else 8.0

    def apply(self, state: LayerState, stats: LayerStats | None, budget) -> None:
        state.info["bits"] = int(self.target())
        state.info["bnb"] = True

    def make_layer(self, state: LayerState, dtype: torch.dtype) -> nn.Module | None:
        if not state.info.get("bnb"):
            return None  # left out by `quant.layers`: stored like any unquantised layer
        bias = None if state.bias is None else state.bias.to(dtype)
        return BnbLinear(state.weight, bias, self.scheme, self.blocksize, self.threshold)
