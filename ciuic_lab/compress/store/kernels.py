"""Kernel-backed layouts for the quantised (or 2:4 sparse) base part of a CompressedLinear.

The reference forward rebuilds the dense weight on every call; it stays the oracle and the
fallback. A *layout* is a small module, built once per layer when a model is prepared for
inference on a device, that holds the base part re-encoded for one fused kernel and computes

    forward(x) = x @ W_baseᵀ                      (no bias, no low-rank part)

where W_base = dequant(Q) ⊙ M, exactly what `layer.dense_codes().dequantize()` gives. Its buffers
are registered and persistent, so summing a module's buffers counts what the kernel really stores
(`KernelLayout.nbytes()`). A layout is bound to the device type it was built for (the int4 CPU
and CUDA encodings differ): moving it to another device type makes `forward` raise.

Layouts (`kernel_name`):

* ``int4_cpu`` / ``int4_cuda`` — PyTorch core's tinygemm int4 kernels
  (`aten._weight_int4pack_mm_for_cpu`, `aten._weight_int4pack_mm`). Both dequantise
  ``w = (q − 8)·scale + zero`` per (kernel group, output row) with scale and zero stored together
  as ``scale_zero[K/g, N, 2]``. Our grid is ``w = (q − z)·s``, so ``scale = s`` and
  ``zero = (8 − z)·s`` (0 for a symmetric grid, whose z is 8): the codes pass through unchanged.
  The kernel's group g must be 32, 64, 128 or 256 and divide K. Any of our group sizes (or
  per-channel, or a narrower tail group) that is a multiple of such a g maps exactly by repeating
  each of our scales over the kernel groups it spans; the largest such g is used (fewest scales).
  Limits established on torch 2.13: CPU takes int32 codes (N, K) and needs N % 16 == 0; it packs
  them itself into a CPU-capability-specific nibble interleave (AVX512: rows n and n+32 of each
  64-row block share a byte), so packed weights are not portable between machines and are
  always rebuilt from our codes. CUDA takes uint8 (N, K/2) with the *even* column in the *high*
  nibble (ours: low nibble first), needs N % 8 == 0 and K % (16·inner_k_tiles) == 0.
  The CPU kernel accepts fp32/fp16/bf16 activations (scale_zero in the same dtype), but only the
  bf16 path is vectorised: fp32 and fp16 run a scalar loop (11.5 s vs 83 ms for a 512×2048 by
  2048×2048 product here). So both devices compute in bf16: fp16/fp32 activations are cast to
  bf16 on the way in (relative rounding ≤ 2⁻⁸ per element) and the bf16 output is cast back.
  The bf16 scale_zero rounds our fp16 scale (≤ 2⁻⁸ relative) and (8 − z)·s once each, so the
  kernel's weight differs from ours by at most (|q − 8|·s + |(8 − z)·s|)·2⁻⁸ (tests/test_kernels.py
  reads the kernel's weight back through an identity input and checks it bit for bit).

* ``int8`` — `aten._weight_int8pack_mm(x, w int8 (N, K), scale (N,))` = (x @ wᵀ)·scale, per
  output channel only. Codes q ∈ [0, 255] are stored as q − 128 (int8, exact); a symmetric grid
  (z = 128) maps exactly, an asymmetric one adds the per-row term (Σₖ x)·(128 − z)·s, computed
  in fp32 from a stored fp32 vector. Computes in bf16 (as int4: the fp16/fp32 CPU paths are
  scalar). The CPU bf16 path of torch 2.13 steps K by 16 with *aligned* vector loads and no
  tail: for K % 16 != 0 it returns garbage or crashes, and an activation whose data pointer is
  not 32-byte aligned segfaults. So K % 16 == 0 is required and misaligned inputs are copied.
  On CUDA the op is a plain per-output loop in PyTorch's source; it is only used there when
  asked (`int8_cuda=True`) until measured.

* ``semi_structured`` — a 16-bit (unquantised) base with a mask keeping at most 2 of every 4
  input columns, through `torch.sparse.to_sparse_semi_structured` (CUTLASS or cuSPARSELt).
  CUDA only, and off unless asked (`semi_structured=True`): no GPU measurement yet says it beats
  dense there at our shapes.

* ``int4x2_cpu`` / ``int4x2_cuda`` — 5..8-bit codes (grouped, or 5..7 bits: what the int8 kernel
  does not take) as two 4-bit planes on the same int4 kernel, one call over a doubled K
  (Int4PairLayout: 8 bits a weight, exact up to the int4 layout's bf16 rounding).

* ``dense`` — the layer's whole weight (base and low-rank part) rebuilt once in the compute
  dtype, for the layers a model multiplies by every cached position at each decode step
  (DecoderAdapter.serve_dense: transformers' MLA caches the latent and re-expands it through
  kv_b_proj, so that layer's M is the context length, where the int4 kernels, built for M = 1,
  cost 10–20× a dense GEMM; vLLM's MLA dequantises kv_b_proj at load for the same reason).
  Costs 16 bits a weight in serving memory, counted like any layout's buffers.

* ``bytes`` — the fallback for what no kernel takes (shapes the int4 kernel refuses): one byte
  per code, the weight rebuilt on every call.

No PyTorch core kernel reads 3-bit or 5..7-bit packed streams themselves: the int4 layouts hold
2- and 3-bit codes at 4 bits a weight, 5..8-bit codes at 8 (see the issue note for what gemlite,
a Triton library, would need).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ciuic_lab.compress.quant import grid
from ciuic_lab.compress.state import QuantPart

# Group sizes the tinygemm int4 kernels are compiled for (CPU and CUDA), largest first.
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
KERNEL_NAMES = ("int4_cpu", "int4_cuda", "int4x2_cpu", "int4x2_cuda", "int8", "semi_structured",
                "bytes", "dense", "reference")


# ---- what the layouts are built from --------------------------------------------------------
# A layout is built from a CompressedLinear ("layer" below: duck-typed, so this module does not
# import the format that imports it): its `dense_codes()` for quantised bases, its
# `base_weight()` and `kept_mask()` for a 16-bit sparse one.


def kernel_group_size(cols: int, group_size: int,
                      allowed: tuple[int, ...] = INT4_KERNEL_GROUPS) -> int | None:
    """Largest kernel group that tiles both K and every one of our groups, or None.

    Our groups start at multiples of `group_size` (a narrower tail group ends at K); one group
    when per-channel or when group_size >= K. A kernel group g fits iff it divides K and our
    group width, so that each kernel group lies inside one of ours.
    """
    width = cols if group_size == -1 or group_size >= cols else group_size
    for g in allowed:
        if cols % g == 0 and width % g == 0:
            return g
    return None


def per_kernel_group(values: torch.Tensor, cols: int, group_size: int, g: int) -> torch.Tensor:
    """(out, G) per-group values -> (out, K/g), one per kernel group of width g (see above)."""
    return grid.expand_groups(values, cols, group_size)[:, ::g]


# ---- layouts -----------------------------------------------------------------------------------
class KernelLayout(nn.Module):
    """Base class: one layer's base part in one kernel's format, bound to one device type."""

    kernel_name = "reference"
    compute_dtype = torch.bfloat16  # what activations are cast to for the kernel
    folds_lowrank = False  # True: the layer's low-rank part is inside this layout's weight

    def __init__(self, out_features: int, in_features: int, device: torch.device):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.device_type = torch.device(device).type

    def _buf(self, name: str, t: torch.Tensor) -> None:
        self.register_buffer(name, t.contiguous(), persistent=True)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _check_device(self, x: torch.Tensor) -> None:
        if x.device.type != self.device_type:
            raise RuntimeError(f"{self.kernel_name} layout was built for {self.device_type}; "
                               f"input is on {x.device.type}: rebuild it with choose_kernel")

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) in the kernel's compute dtype."""
        raise NotImplementedError

    def matmul2d(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) in any float dtype -> a new (M, N) tensor in the compute dtype (callers may
        add into it in place: CompressedLinear.forward does, to save an allocation per call)."""
        self._check_device(x2)
        return self._matmul(x2.to(self.compute_dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.matmul2d(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features).to(x.dtype)

    @torch.no_grad()
    def weight(self, chunk: int = 1024) -> torch.Tensor:
        """The (out, in) weight the kernel computes with, read back through the kernel itself.

        Feeds identity rows (exact in bf16); column i of the output is W[:, i] as the kernel
        dequantises it, rounded to the compute dtype on the way out. Returns float32.
        """
        dev = next(self.buffers()).device
        cols = []
        for start in range(0, self.in_features, chunk):
            stop = min(start + chunk, self.in_features)
            eye = torch.zeros(stop - start, self.in_features, dtype=self.compute_dtype,
                              device=dev)
            eye[:, start:stop] = torch.eye(stop - start, dtype=self.compute_dtype, device=dev)
            cols.append(self.forward(eye).float())
        return torch.cat(cols).t().contiguous()


def recentred(q: QuantPart) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, zero) as the int4 layout stores them. For k <= 3 each code is moved onto the
    kernel's fixed offset: q' = q − z + 8 ∈ [1, 15] (z ∈ [0, 2^k − 1]), zero 8, so that
    w = (q' − 8)·s with a zero term of 0. Left as (q, z), the kernel would add two bf16-rounded
    terms (q − 8)·s and (8 − z)·s that cancel to a much smaller w (2-bit: ~7·2⁻⁸ relative error
    instead of 2⁻⁸). 4-bit codes stay as they are (q − z + 8 could leave [0, 15])."""
    if q.bits == 4:
        return q.codes, q.zero
    z = grid.expand_groups(q.zero, q.codes.shape[1], q.group_size).round().to(q.codes.dtype)
    return q.codes - z + 8, torch.full_like(q.zero, 8.0)


class Int4Layout(KernelLayout):
    """4-bit codes on PyTorch's tinygemm kernels (CPU or CUDA); see the module docstring."""

    def __init__(self, q: QuantPart, device: torch.device, group: int,
                 inner_k_tiles: int | None = None):
        out, cols = q.codes.shape
        super().__init__(out, cols, device)
        dev = torch.device(device)
        self.kernel_name = "int4_cuda" if dev.type == "cuda" else "int4_cpu"
        self.group = group
        codes, zero = recentred(q)
        codes = codes.to(device=dev, dtype=torch.int32).contiguous()
        if dev.type == "cuda":
            # CUDA wants two codes per byte, even column in the high nibble.
            pairs = (codes[:, 0::2] << 4) | codes[:, 1::2]
            self.inner_k_tiles = inner_k_tiles or _inner_k_tiles(cols)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs.to(torch.uint8).contiguous(),
                                                                self.inner_k_tiles)
        else:
            # The CPU conversion ignores inner_k_tiles (same bytes for 1..16): it picks its own
            # interleave from the CPU capability.
            self.inner_k_tiles = None
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        self._buf("qweight", packed)
        s = per_kernel_group(q.scale.float(), cols, q.group_size, group).to(dev)
        z = per_kernel_group(zero.float(), cols, q.group_size, group).to(dev)
        # (8 − z)·s is exact in fp32 (an fp16 scale times an integer in [−7, 8]); it is rounded
        # once, to bf16, here.
        scale_zero = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1)  # (K/g, N, 2)
        self._buf("scale_zero", scale_zero.to(torch.bfloat16))

    @classmethod
    def supported(cls, out: int, cols: int, bits: int, group_size: int,
                  device: torch.device) -> int | None:
        """The kernel group size to use, or None when this shape has no int4 kernel.

        2- and 3-bit codes take the same kernel unchanged: q ∈ [0, 2^k − 1] ⊂ [0, 15], and
        scale = s, zero = (8 − z)·s give (q − 8)·s + (8 − z)·s = (q − z)·s for any grid."""
        if not 2 <= bits <= 4:
            return None
        g = kernel_group_size(cols, group_size)
        if g is None:
            return None
        if torch.device(device).type == "cuda":
            return g if out % 8 == 0 and cols % 32 == 0 else None
        return g if out % 16 == 0 else None

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.device_type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x2, self.qweight, self.group,
                                                      self.scale_zero)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group,
                                                          self.scale_zero)


class Int4PairLayout(Int4Layout):
    """5..8-bit codes as two 4-bit planes, on the int4 kernel in one call over a doubled K.

    Recentred, a code of the grid w = (q − z)·s is r = q − z, and r ∈ [−128, 127] for any
    symmetric grid up to 8 bits and any asymmetric one up to 7 (an asymmetric 8-bit layer
    qualifies when its codes do). It splits as r = 16·h + l with l = r mod 16 ∈ [0, 15] and
    h = ⌊r / 16⌋ ∈ [−8, 7]:

        w = l·s + 16s·h = [(l − 8)·s + 8s] + [(c − 8)·16s],   c = h + 8 ∈ [0, 15]

    i.e. two int4 planes, scales s and 16s, zero terms 8s and 0. Side by side along K
    (W₂ = [L | H], (N, 2K)) and fed [x | x], one int4 matmul computes x·Wᵀ. bf16(16s) = 16·bf16(s)
    and bf16(8s) = 8·bf16(s) (powers of two), so the kernel's weight is bf16(s)·r: the int4
    layout's rounding. Reads 8 bits a weight (the byte layout's size) without rebuilding the
    weight on every call, which is what made 5..8-bit layers decode slower than dense.
    """

    def __init__(self, q: QuantPart, device: torch.device, group: int,
                 inner_k_tiles: int | None = None, r: torch.Tensor | None = None):
        cols = q.codes.shape[1]
        r = self.signed(q) if r is None else r  # (N, K) int32, q − z
        low = r & 15  # two's complement: r mod 16, also for negative r
        high = (r - low) >> 4  # ⌊r / 16⌋
        s = per_kernel_group(q.scale.float(), cols, q.group_size, group)  # (N, K/g)
        planes = QuantPart(torch.cat([low, high + 8], 1), torch.cat([s, 16 * s], 1),
                           torch.cat([torch.zeros_like(s), torch.full_like(s, 8.0)], 1),
                           4, group, False)
        super().__init__(planes, device, group, inner_k_tiles)
        self.in_features = cols  # the kernel sees 2K columns; callers see K
        self.kernel_name = self.kernel_name.replace("int4", "int4x2")

    @classmethod
    def supported(cls, out: int, cols: int, bits: int, group_size: int,
                  device: torch.device) -> int | None:
        if not 5 <= bits <= 8:
            return None
        g = kernel_group_size(cols, group_size)  # the 2K columns are then in groups of g
        return None if g is None else Int4Layout.supported(out, 2 * cols, 4, g, device)

    @staticmethod
    def signed(q: QuantPart) -> torch.Tensor:
        """(N, K) int32 recentred codes r = q − z."""
        z = grid.expand_groups(q.zero, q.codes.shape[1], q.group_size).round().to(torch.int32)
        return q.codes.to(torch.int32) - z

    @staticmethod
    def fits(r: torch.Tensor) -> bool:
        """Whether every recentred code lies in [−128, 127] (always, but for asymmetric 8 bits)."""
        return bool(r.min() >= -128 and r.max() <= 127)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return super()._matmul(torch.cat([x2, x2], -1))


def _inner_k_tiles(cols: int) -> int:
    """Widest load the CUDA layout allows (8 k-tiles = 16-byte loads), K % (16·tiles) == 0."""
    for tiles in (8, 4, 2):
        if cols % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"K={cols} is not a multiple of 32: no int4 CUDA layout")


class Int8Layout(KernelLayout):
    """8-bit per-channel codes on `aten._weight_int8pack_mm`; see the module docstring."""

    kernel_name = "int8"

    def __init__(self, q: QuantPart, device: torch.device):
        out, cols = q.codes.shape
        super().__init__(out, cols, device)
        dev = torch.device(device)
        self._buf("qweight", (q.codes.to(dev) - 128).to(torch.int8))
        s = q.scale[:, 0].float().to(dev)
        self._buf("scale", s.to(torch.bfloat16))
        self.sym = bool(q.sym) or bool((q.zero == 128).all())
        if not self.sym:
            # W = (q − z)·s = (q − 128)·s + (128 − z)·s: the second term is a per-row constant,
            # so x·Wᵀ gains (Σₖ x)·(128 − z)·s. Stored in fp32 (the kernel rounds s to bf16, but
            # this term can be large and cancels against the kernel's part).
            self._buf("zero_fix", (128.0 - q.zero[:, 0].float().to(dev)) * s)

    @classmethod
    def supported(cls, out: int, cols: int, bits: int, group_size: int,
                  device: torch.device) -> bool:
        if bits != 8 or not (group_size == -1 or group_size >= cols):
            return False
        # The CPU bf16 path has no K tail (garbage or a crash when K % 16 != 0).
        return torch.device(device).type != "cpu" or cols % 16 == 0

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.device_type == "cpu" and x2.data_ptr() % 64:
            x2 = x2.clone()  # aligned loads in the CPU kernel: a fresh allocation is 64-aligned
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        if self.sym:
            return y
        fix = x2.float().sum(-1, keepdim=True) * self.zero_fix
        return (y.float() + fix).to(y.dtype)


class ByteCodesLayout(KernelLayout):
    """Any quantised base (2..8 bits, any group size, masked or not) as one byte per code,
    dequantised on each call and multiplied densely.

    The fallback where no fused kernel fits (5..7 bits, grouped 8 bits, shapes the int4 kernels
    refuse). What it saves over the reference path is the per-call work that dominates small
    layers there: unpacking k-bit streams and decoding the entropy-coded mask (pruned entries
    already hold their group's zero code). What it costs: 8 bits per weight + the layer's scales,
    more than the packed form stores; prepared-model memory (mem/peak_bytes) shows it. Computes in
    the model's dtype from a float32 weight rebuilt per call, so in float32 it is the reference
    forward's weight exactly.
    """

    kernel_name = "bytes"

    def __init__(self, q: QuantPart, device: torch.device, dtype: torch.dtype):
        out, cols = q.codes.shape
        super().__init__(out, cols, device)
        dev = torch.device(device)
        self.compute_dtype = dtype
        self.group_size = q.group_size
        self._buf("codes", q.codes.to(device=dev, dtype=torch.uint8))
        self._buf("scale", q.scale.to(device=dev, dtype=torch.float16))  # fp16-exact (ours)
        self._buf("zero", q.zero.to(device=dev, dtype=torch.uint8))

    def _weight(self) -> torch.Tensor:
        return grid.dequantize(self.codes, self.scale, self.zero, self.group_size)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x2, self._weight().to(x2.dtype))


class DenseLayout(KernelLayout):
    """The layer's dense weight, rebuilt once in `dtype` (see ``dense`` in the module docstring).

    Unlike the other layouts it folds the low-rank part in (W = dequant(Q) ⊙ M + U·V), so the
    layer drops its factors too (`folds_lowrank`): one GEMM instead of three at M = context."""

    kernel_name = "dense"
    folds_lowrank = True

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        out, cols = weight.shape
        super().__init__(out, cols, weight.device)
        self.compute_dtype = dtype
        self._buf("dense_weight", weight.to(dtype))

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, self.dense_weight)


class SemiStructuredLayout(KernelLayout):
    """A 16-bit base with at most 2 kept of every 4 inputs, as a 2:4 sparse tensor (CUDA only).

    Stores the compressed values and metadata that `to_sparse_semi_structured` produced (so its
    bytes are counted) and wraps them back into the tensor subclass for `F.linear`.
    """

    kernel_name = "semi_structured"

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        from torch.sparse import to_sparse_semi_structured

        out, cols = weight.shape
        super().__init__(out, cols, weight.device)
        self.compute_dtype = dtype
        sparse = to_sparse_semi_structured(weight.to(dtype).contiguous())
        self._cls = type(sparse)
        self._extra = {"fuse_transpose_cusparselt": getattr(sparse, "fuse_transpose_cusparselt",
                                                            False),
                       "alg_id_cusparselt": getattr(sparse, "alg_id_cusparselt", 0)}
        self._buf("packed", sparse.packed)
        self._has_meta = sparse.meta is not None
        if self._has_meta:  # CUTLASS keeps metadata apart; cuSPARSELt inside `packed`
            self._buf("meta", sparse.meta)
        self._wrapped: torch.Tensor | None = None

    def _sparse(self) -> torch.Tensor:
        w = self._wrapped
        if w is None or w.packed is not self.packed:  # rebuilt after .to()/load_state_dict
            w = self._cls(torch.Size((self.out_features, self.in_features)), packed=self.packed,
                          meta=self.meta if self._has_meta else None, packed_t=None, meta_t=None,
                          compressed_swizzled_bitmask=None, **self._extra)
            self._wrapped = w
        return w

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, self._sparse())


def _is_two_of_four(mask: torch.Tensor) -> bool:
    out, cols = mask.shape
    return cols % 4 == 0 and bool((mask.view(out, cols // 4, 4).sum(-1) <= 2).all())


# ---- choosing ------------------------------------------------------------------------------------
def choose_kernel(layer, device: torch.device | str, dtype: torch.dtype, *,
                  semi_structured: bool = False, int8_cuda: bool = False,
                  int4_pairs: bool = True, byte_codes: bool = True) -> KernelLayout | None:
    """The fastest layout for this layer's base part on `device`, or None (reference path).

    dtype: the activation dtype the model runs in; the int4/int8 layouts compute in bf16 whatever
    it is (see the module docstring), the 2:4 layout in `dtype` itself (fp16 or bf16).
    semi_structured / int8_cuda: enable the CUDA layouts not yet measured faster than dense.
    int4_pairs: 5..8-bit codes that the int8 kernel does not take (grouped, or 5..7 bits) run as
    two 4-bit planes on the int4 kernel (Int4PairLayout), where the shape allows.
    byte_codes: any other quantised base takes ByteCodesLayout (one byte per weight) rather than
    the reference path (packed storage, rebuilt on every call); False keeps the packed form.
    A low-rank part or a mask does not prevent a layout: it covers the base part only, and pruned
    entries carry their group's zero code. The layer is not modified.
    """
    device = torch.device(device)
    base = layer.meta.get("base")
    if base is None:
        return None
    out, cols = layer.out_features, layer.in_features
    q = base["quant"]
    if q is None:
        if not (semi_structured and device.type == "cuda" and dtype in (torch.float16,
                                                                           torch.bfloat16)):
            return None
        mask = layer.kept_mask()
        if mask is None or not _is_two_of_four(mask):
            return None
        try:
            return SemiStructuredLayout(layer.base_weight().to(device), dtype)
        except (RuntimeError, ValueError):  # shape below the backend's minimum tile
            return None
    bits, gs = q["bits"], q["group_size"]
    g = Int4Layout.supported(out, cols, bits, gs, device)
    if g is not None:
        return Int4Layout(layer.dense_codes(), device, g)
    if Int8Layout.supported(out, cols, bits, gs, device) and (device.type == "cpu" or int8_cuda):
        return Int8Layout(layer.dense_codes(), device)
    codes = None  # decoded once for the two layouts below
    if int4_pairs and Int4PairLayout.supported(out, cols, bits, gs, device):
        codes = layer.dense_codes()
        r = Int4PairLayout.signed(codes)
        if Int4PairLayout.fits(r):
            return Int4PairLayout(codes, device, kernel_group_size(cols, gs), r=r)
    if byte_codes and dtype.is_floating_point:
        return ByteCodesLayout(codes if codes is not None else layer.dense_codes(), device, dtype)
    return None


def kernel_name(layout: KernelLayout | None) -> str:
    """What a layer computes with, for reports: a layout's name, or "reference"."""
    return "reference" if layout is None else layout.kernel_name
