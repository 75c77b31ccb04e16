"""Bit packing: k-bit codes, bit masks and N:M indices stored as dense uint8 bit streams.

Everything here is pure tensor maths (no modules), so the round-trip properties are tested alone.
A stream of n codes of k bits occupies ceil(n*k/8) bytes: that is what CompressedLinear stores and
what every memory figure counts.
"""

from __future__ import annotations

import math

import torch

_BYTE_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)  # little-endian bit order inside a byte


def packed_nbytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a uint8 stream of ceil(n*bits/8) bytes.

    Works for any width 1..8 (a code may straddle a byte boundary for 3, 5, 6, 7 bits).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=flat.device)
    # Chunks of a multiple of 8 codes start on a byte boundary, so each packs on its own and
    # the temporary bit matrix stays small (16 bytes per code would dwarf a large layer).
    chunk = 1 << 20
    for start in range(0, n, chunk):
        part = flat[start:start + chunk].to(torch.int32)
        lo = start * bits // 8
        out[lo:lo + packed_nbytes(part.numel(), bits)] = _pack_chunk(part, bits)
    return out


def _pack_chunk(flat: torch.Tensor, bits: int) -> torch.Tensor:
    if 8 % bits == 0:  # whole codes per byte: shift and sum, no bit stream
        per = 8 // bits
        pad = (-flat.numel()) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=flat.device)
        return (flat.view(-1, per) << shifts).sum(1).to(torch.uint8)
    # (n, bits) bit matrix -> one long little-endian bit stream -> bytes.
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = _BYTE_WEIGHTS.to(flat.device)
    return (stream.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: the first n codes as int32 (1-D)."""
    if bits == 8:
        return packed[:n].to(torch.int32)
    if 8 % bits == 0:
        # Whole codes per byte (1, 2, 4 bits): shift each byte once per code it holds, which
        # avoids the 8-ints-per-byte bit stream on the forward path.
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:n]
    # 3, 5, 6, 7 bits: via a bit stream, in chunks of 8 codes' worth of whole bytes so the
    # temporary stays small on the forward path.
    out = torch.empty(n, dtype=torch.int32, device=packed.device)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device))
    chunk = 1 << 20  # codes per chunk (a multiple of 8: starts on a byte boundary)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        lo = start * bits // 8
        part = packed[lo:lo + packed_nbytes(m, bits)]
        stream = ((part.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)[: m * bits]
        out[start:start + m] = (stream.view(m, bits) * weights).sum(1)
    return out


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask of any shape as 1 bit per entry."""
    return pack_bits(mask.reshape(-1).to(torch.int32), 1)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return unpack_bits(packed, 1, math.prod(shape)).bool().view(shape)


def nm_index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def nm_indices(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Positions (0..m-1, ascending) of the n kept entries in each group of m along the last dim.

    mask: (out, in) bool with exactly n True per group -> (out, in // m, n) int32.
    """
    out, cols = mask.shape
    groups = mask.view(out, cols // m, m)
    if not bool((groups.sum(-1) == n).all()):
        raise ValueError(f"mask is not {n}:{m}: every group of {m} must keep exactly {n}")
    pos = torch.arange(m, device=mask.device).expand_as(groups)
    # Sorting kept positions first (stable) keeps them ascending: the same row-major order in
    # which the kept values are stored.
    key = torch.where(groups, pos, pos + m)
    return key.sort(-1).values[..., :n].to(torch.int32)


def nm_mask(indices: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of nm_indices: (out, in // m, n) positions -> (out, in) bool mask."""
    out, g, _ = indices.shape
    mask = torch.zeros(out, g, m, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, indices.long(), True)
    return mask.view(out, g * m)
