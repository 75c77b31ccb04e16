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
calibration, and no prune or low-rank stage with them. On a float32 model the activations enter
LLM.int8() in bf16 (it is defined on 16-bit activations) and its output returns in float32.
Install with `pip install 'ciuic_lab[bnb]'`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ciuic_lab.compress.base import Method
from ciuic_lab.compress.state import LayerState
from ciuic_lab.compress.stats import LayerStats
from ciuic_lab.compress.store.formats import buffer_nbytes
from ciuic_lab.errors import ConfigError
from ciuic_lab.errors import check as _check


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:  # an optional extra
        raise ConfigError("quant=bnb_*: needs bitsandbytes (pip install 'ciuic_lab[bnb]')") from e
    return bitsandbytes


class BnbLinear(nn.Module):
    """One weight as bitsandbytes stores it. scheme 'nf4': packed 4-bit codes (uint8, two per
    byte) + fp32 absmax per block + the 16-entry NF4 code table; 'int8': int8 codes (out, in) +
    fp32 scale per row. Implements the packed-layer contract (compress/store/formats.py)."""

    format = "bnb"

    def __init__(self, in_features: int, out_features: int, scheme: str, blocksize: int = 64,
                 threshold: float = 6.0):
        super().__init__()
        if scheme not in ("nf4", "int8"):
            raise ValueError(f"unknown bitsandbytes scheme {scheme!r}")
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.blocksize, self.threshold = scheme, blocksize, threshold

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                 blocksize: int = 64, threshold: float = 6.0) -> BnbLinear:
        bnb = _bnb()
        mod = cls(weight.shape[1], weight.shape[0], scheme, blocksize, threshold)
        w = weight.detach()
        if scheme == "nf4":
            packed, qs = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                      compress_statistics=False)
            mod.register_buffer("packed", packed)
            mod.register_buffer("absmax", qs.absmax)
            mod.register_buffer("code", qs.code)
        else:
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.half())
            mod.register_buffer("cb", cb)
            mod.register_buffer("scb", scb)
        if bias is not None:
            mod.register_buffer("bias", bias.detach().clone())
        return mod

    def spec(self) -> dict:
        return {"format": self.format, "in": self.in_features, "out": self.out_features,
                "scheme": self.scheme, "blocksize": self.blocksize, "threshold": self.threshold}

    @classmethod
    def shell(cls, spec: dict, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> BnbLinear:
        mod = cls(spec["in"], spec["out"], spec["scheme"], spec["blocksize"], spec["threshold"])
        for name, (shape, dt) in shapes.items():
            mod.register_buffer(name, torch.empty(shape, dtype=dt))
        return mod

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    def nbytes(self) -> int:
        return buffer_nbytes(self)

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
        bias = self.bias.to(x.dtype) if hasattr(self, "bias") else None
        if self.scheme == "nf4":
            return bnb.matmul_4bit(x, self.packed.t(), bias=bias, quant_state=self._state4(x.dtype))
        # LLM.int8() is defined on 16-bit activations (its outlier columns run in fp16): a fp32
        # model's activations go through it in bf16 and come back in fp32.
        x16 = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)
        state = bnb.MatmulLtState()
        state.CB, state.SCB = self.cb, self.scb
        state.threshold, state.has_fp16_weights, state.is_training = self.threshold, False, False
        b16 = None if bias is None else bias.to(x16.dtype)
        # Its CPU path takes 2-D activations: fold the leading dims and unfold the result.
        y = bnb.matmul(x16.reshape(-1, self.in_features), self.cb, bias=b16, state=state)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

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

    def goal(self) -> float:
        return 4.0 if self.scheme == "nf4" else 8.0

    def apply(self, state: LayerState, stats: LayerStats | None, budget) -> None:
        state.info["bits"] = int(self.goal())
        state.info["bnb"] = True

    def make_layer(self, state: LayerState, dtype: torch.dtype) -> nn.Module | None:
        if not state.info.get("bnb"):
            return None  # left out by `quant.layers`: stored like any unquantised layer
        bias = None if state.bias is None else state.bias.to(dtype)
        return BnbLinear.quantize(state.weight, bias, self.scheme, self.blocksize, self.threshold)
