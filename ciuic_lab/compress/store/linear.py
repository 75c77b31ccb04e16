"""CompressedLinear: the lab's own packed format ("ciuic.packed") of one weight.

    W ≈ dequant(Q) masked by M  +  U·V        (each part optional)

Stages edit a LayerState (compress/state.py) in float32; `CompressedLinear.pack` then stores only
packed parts as persistent buffers, so `nbytes()` and the model-level byte count are read from
what is really stored:

    mask_code   uint8   the kept-entry mask at its entropy limit (compress/store/coding.py): an N:M
                        pattern in log2 C(M,N) bits per group (2:4: 0.65 bit per weight), an
                        unstructured mask near H(density) bits per weight (1 bit at 50 %)
    values      16-bit  kept weights                 (base part, not quantised)
    codes       uint8   k bits per kept weight       (base part, quantised)
    scale/zero  fp16 / uint8 per (row, group)
    u, v        16-bit or k-bit codes (+ grids)      (low-rank part)
    bias        16-bit

Forward: the reference path rebuilds the dense weight transiently in the input's dtype and device;
it is the oracle. `prepare(device, dtype)` re-encodes the base part for a fused kernel where one
fits (compress/store/kernels.py: PyTorch's int4/int8 weight-only matmuls) and drops the packed base
buffers it replaces, so the layer then holds (and `nbytes()` counts) the kernel's layout; the
low-rank part runs as two small matmuls U·(V·x), never as a dense U·V. A prepared layer is for
inference: save checkpoints before preparing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ciuic_lab.compress.quant import grid
from ciuic_lab.compress.state import LayerState, QuantPart
from ciuic_lab.compress.store import coding, packing
from ciuic_lab.compress.store.formats import buffer_nbytes

_BASE_BUFFERS = ("mask_code", "values", "codes", "scale", "zero")


class CompressedLinear(nn.Module):
    """A linear layer whose weight lives only in packed parts (see module docstring).
    Implements the packed-layer contract of compress/store/formats.py."""

    format = "ciuic.packed"

    def __init__(self, in_features: int, out_features: int, meta: dict):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.meta = meta  # formats of the stored parts: enough to rebuild the weight
        self.kernel: nn.Module | None = None  # set by prepare()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def pack(cls, state: LayerState, dtype: torch.dtype = torch.float16) -> CompressedLinear:
        out, cols = state.weight.shape
        meta: dict = {"dtype": str(dtype).removeprefix("torch."), "base": None, "lowrank": None,
                      "bias": state.bias is not None}
        mod = cls(cols, out, meta)
        if state.base is not None:
            base: dict = {"mask": None, "quant": None}
            kept = state.mask
            if kept is not None:
                stream, code = coding.encode_mask(kept, state.nm)
                mod._buf("mask_code", stream)
                base["mask"] = {"code": code}
                base["n_kept"] = int(kept.sum())
            if state.quant is not None:
                q = state.quant
                codes = q.codes[kept] if kept is not None else q.codes.reshape(-1)
                mod._store_quant("", codes, q)
                base["quant"] = {"bits": q.bits, "group_size": q.group_size, "sym": q.sym}
            else:
                vals = state.base[kept] if kept is not None else state.base.reshape(-1)
                mod._buf("values", vals.to(dtype))
            meta["base"] = base
        if state.u is not None:
            lr: dict = {"rank": state.u.shape[1], "quant": None}
            for name, dense, q in (("u", state.u, state.u_quant), ("v", state.v, state.v_quant)):
                if q is not None:
                    mod._store_quant(name + "_", q.codes.reshape(-1), q)
                    lr["quant"] = {"bits": q.bits, "group_size": q.group_size, "sym": q.sym}
                else:
                    mod._buf(name, dense.to(dtype))
            meta["lowrank"] = lr
        if state.bias is not None:
            mod._buf("bias", state.bias.to(dtype))
        return mod

    def spec(self) -> dict:
        if self.kernel is not None:
            raise RuntimeError("a layer prepared for inference no longer holds its packed base "
                               "part: save the checkpoint before prepare()")
        return {"format": self.format, "in": self.in_features, "out": self.out_features,
                "meta": self.meta}

    @classmethod
    def shell(cls, spec: dict, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) \
            -> CompressedLinear:
        """A module with uninitialised buffers of the given shapes (for loading checkpoints)."""
        mod = cls(spec["in"], spec["out"], spec["meta"])
        for name, (shape, dt) in shapes.items():
            mod._buf(name, torch.empty(shape, dtype=dt))
        return mod

    def _buf(self, name: str, t: torch.Tensor) -> None:
        self.register_buffer(name, t.contiguous(), persistent=True)

    def _store_quant(self, prefix: str, codes_flat: torch.Tensor, q: QuantPart) -> None:
        self._buf(prefix + "codes", packing.pack_bits(codes_flat, q.bits))
        self._buf(prefix + "scale", q.scale.to(torch.float16))
        if not q.sym:
            self._buf(prefix + "zero", q.zero.to(torch.uint8))

    # ---- reading --------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every buffer the layer holds (a prepared layer's kernel layout included)."""
        return buffer_nbytes(self)

    @property
    def params(self) -> int:
        """Parameters of the dense weight this layer replaces (the denominator of bits/param)."""
        return self.in_features * self.out_features

    @property
    def kernel_name(self) -> str:
        return "reference" if self.kernel is None else self.kernel.kernel_name

    def _grid(self, prefix: str, qmeta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        scale = getattr(self, prefix + "scale").float()
        if qmeta["sym"]:
            zero = torch.full_like(scale, float(2 ** (qmeta["bits"] - 1)))
        else:
            zero = getattr(self, prefix + "zero").float()
        return scale, zero

    def kept_mask(self) -> torch.Tensor | None:
        """The base part's kept entries, bool (out, in), decoded from `mask_code` (None: dense)."""
        m = self.meta["base"]["mask"]
        if m is None:
            return None
        return coding.decode_mask(self.mask_code, m["code"], (self.out_features, self.in_features))

    def _dense_part(self, prefix: str, dense_name: str, shape: tuple[int, int],
                    qmeta: dict | None, kept: torch.Tensor | None) -> torch.Tensor:
        """float32 dense matrix of one stored part, zeros where not kept.

        Unquantised parts live in buffer `dense_name`; quantised ones in `<prefix>codes` (+grid).
        """
        if qmeta is None:
            zeros = torch.zeros(shape, device=self._device())
            return _scatter(getattr(self, dense_name).float(), kept, zeros)
        n = int(kept.sum()) if kept is not None else shape[0] * shape[1]
        codes = packing.unpack_bits(getattr(self, prefix + "codes"), qmeta["bits"], n)
        scale, zero = self._grid(prefix, qmeta)
        dense = _scatter(codes, kept, torch.zeros(shape, dtype=torch.int32, device=codes.device))
        w = grid.dequantize(dense, scale, zero, qmeta["group_size"])
        return w if kept is None else w * kept

    def dense_codes(self) -> QuantPart:
        """The base part's codes as a dense (out, in) int32 grid with its scale and zero (float32).

        Pruned entries get their group's zero code, so they dequantise to exactly 0: the form a
        dense integer kernel or an exporter needs. Raises ValueError if the base is not quantised.
        """
        base = self.meta["base"]
        if base is None or base["quant"] is None:
            raise ValueError("this layer's base part is not quantised: it has no codes")
        q = base["quant"]
        shape = (self.out_features, self.in_features)
        kept = self.kept_mask()
        n = int(kept.sum()) if kept is not None else shape[0] * shape[1]
        codes = packing.unpack_bits(self.codes, q["bits"], n)
        scale, zero = self._grid("", q)
        fill = grid.expand_groups(zero, shape[1], q["group_size"]).round().to(torch.int32)
        dense = _scatter(codes, kept, fill.contiguous())
        return QuantPart(dense, scale, zero, q["bits"], q["group_size"], q["sym"])

    def _device(self) -> torch.device:
        return next(self.buffers()).device

    def base_weight(self) -> torch.Tensor:
        """float32 (out, in) base part: dequant(Q) ⊙ M, or its 16-bit values ⊙ M (zeros if the
        layer is purely low rank); read back through the kernel when prepared."""
        shape = (self.out_features, self.in_features)
        base = self.meta["base"]
        if base is None:
            return torch.zeros(shape, device=self._device())
        if self.kernel is not None:
            return self.kernel.weight()
        return self._dense_part("", "values", shape, base["quant"], self.kept_mask())

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U (out, r), V (r, in)) float32, dequantised if stored in k bits; None without them."""
        lr = self.meta["lowrank"]
        if lr is None:
            return None
        if self.kernel is not None and self.kernel.folds_lowrank:  # inside the kernel's weight
            return None
        if "lr_u" in self._buffers:  # prepared: held in the compute dtype (see `prepare`)
            return self.lr_u.float(), self.lr_v.float()
        r = lr["rank"]
        return (self._dense_part("u_", "u", (self.out_features, r), lr["quant"], None),
                self._dense_part("v_", "v", (r, self.in_features), lr["quant"], None))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) weight this layer computes with, rebuilt from packed parts."""
        w = self.base_weight()
        factors = self.lowrank_factors()
        if factors is not None:
            w = w + factors[0] @ factors[1]
        return w.to(dtype)

    # ---- computing ------------------------------------------------------------------------
    def prepare(self, device: torch.device | str, dtype: torch.dtype, *, dense: bool = False,
                **flags) -> str:
        """Re-encode the base part for the fastest kernel on `device` (compress/store/kernels.py),
        if one fits, and drop the packed base buffers it replaces. Returns the kernel's name
        ("reference" when none fits: the layer is unchanged).

        dense: hold the whole weight (low-rank part folded in) in `dtype` instead (DenseLayout),
        for a layer the model multiplies by many rows at every decode step
        (`DecoderAdapter.serve_dense`); its packed parts are dropped too."""
        from ciuic_lab.compress.store.kernels import DenseLayout, choose_kernel

        if self.kernel is None:
            layout = DenseLayout(self.dequantized_weight().to(device), dtype) if dense \
                else choose_kernel(self, device, dtype, **flags)
            if layout is not None:
                folds = layout.folds_lowrank  # the factors are in its weight
                for name in [n for n in self._buffers if n != "bias"] if folds else _BASE_BUFFERS:
                    self._buffers.pop(name, None)
                self.kernel = layout
                if not folds:
                    self._prepare_factors(torch.device(device), dtype)
        return self.kernel_name

    def _prepare_factors(self, device: torch.device, dtype: torch.dtype) -> None:
        """Hold U and V decoded instead of their k-bit codes, so that the forward does not
        dequantise them on every call (what made the recipe decode slower than dense). In the
        compute dtype on CUDA; in float32 on CPU, where a bf16 matmul this thin is slower at one
        token (2048², rank 20: 0.076 vs 0.104 ms for the pair, benchmarks/results/
        kernel_micro_cpu.md; ~19 µs per bf16 call in the MoE decode profile, where the factor
        matmuls of every expert were a third of the recipe's decode time). At prefill float32 is
        2–3× bf16, but there the int4 kernels' own time dominates. Costs r·(out + in) values at
        that dtype; nbytes() counts them."""
        factors = self.lowrank_factors()
        if factors is None:
            return
        for name in [n for n in self._buffers if n in ("u", "v") or n.startswith(("u_", "v_"))]:
            self._buffers.pop(name)
        fdtype = torch.float32 if device.type == "cpu" else dtype
        self._buf("lr_u", factors[0].to(fdtype))
        self._buf("lr_v", factors[1].to(fdtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.meta["bias"] else None
        if self.kernel is None:
            return F.linear(x, self.dequantized_weight(x.dtype), b)
        # At one decode token each call's fixed costs add up (a MoE token runs dozens of these
        # layers, benchmarks/decode_profile.py): the 2-D input goes straight to the layout's
        # matmul (not through its Module call), and the low-rank part and the bias are added in
        # place into its fresh output (no cast or sum allocated per call).
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features)
        y = self.kernel.matmul2d(x2)
        u = self._buffers.get("lr_u")
        if u is not None:  # two thin matmuls: r (out + in) per token, not out · in
            v = self._buffers["lr_v"]
            y.add_(F.linear(F.linear(x2.to(v.dtype), v), u))
        if b is not None:
            y.add_(b)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bytes={self.nbytes()}, "
                f"bits/param={8 * self.nbytes() / self.params:.3f}, kernel={self.kernel_name}")


def _scatter(values: torch.Tensor, kept: torch.Tensor | None, fill: torch.Tensor) -> torch.Tensor:
    """A dense matrix shaped like `fill`: the stored values (row-major) at the kept entries, `fill`
    elsewhere; with no mask the values are the whole matrix."""
    if kept is None:
        return values.view(fill.shape)
    fill[kept] = values
    return fill
