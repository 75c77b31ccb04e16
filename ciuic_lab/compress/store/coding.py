"""Pruning masks stored near their entropy limit.

A bool mask is stored as one plain uint8 stream (a persistent buffer, counted by its bytes) plus a
small JSON-able meta dict naming the codec and its parameters. Four codecs:

``nm_colex`` (N:M masks)
    Each group of M consecutive entries along the last dim keeps exactly N, so a group is one of
    R = C(M, N) subsets. A group's kept set {c_1 < ... < c_N} is ranked in the combinatorial number
    system (colex order): rank = sum_i C(c_i, i), a bijection onto [0, R). Ranks of k consecutive
    groups form one mixed-radix number sum_j r_j R^j < R^k <= 2^63 (an int64), stored in
    bitlen(R^k - 1) bits; k is chosen to minimise bits per group, so the loss to the entropy limit
    log2 R per group is under 1/k bit. The last, partial word takes only the bits its digits need.
    The stream's length is a formula of the shape (nm_coded_nbytes).

``rans_iid`` (unstructured masks far from 50 % density)
    The 1-bit-per-weight bitmask's bytes (packing.pack_mask order) coded with rANS (Duda,
    arXiv 1311.2540) under the i.i.d. model of the mask's density p: a byte with c ones has
    probability p^c (1-p)^(8-c), so the expected cost is H(p) bits per weight. The model is
    computed from a 16-bit quantised p with integer arithmetic only, so encoder and decoder
    agree bit for bit on any machine. Symbols are dealt round-robin to `lanes` (one per 1024
    bytes, at most 4096) independent coder states, so that coding advances all lanes
    together as array ops: a Python loop of ceil(n_bytes / lanes) steps, not one per symbol.
    It runs in numpy on CPU (a GPU stream is copied over and the mask copied back). Layout: the
    lanes' final states as uint32 LE, then the 16-bit renormalisation words (LE) in the order
    the decoder reads them; decoding must end with every lane back at the initial state.

``bitmask``  the plain 1 bit per weight of packing.pack_mask, chosen whenever coding would not
             save (a density near 50 %, or a mask too small to amortise the lane states).
``const``    every entry equal (all kept or all pruned): zero bytes.

API: encode_mask(mask, nm) -> (stream, meta); decode_mask(stream, meta, shape) -> mask;
decode_masks([(stream, meta, shape), ...]) decodes many at once (rans_iid's loop has ~1024 steps per
mask whatever its size, so a model's many small masks should be decoded together, once);
coded_nbytes(shape, nm, density) predicts the stream's size; entropy_bits(...) is the limit.
Nothing here loops in Python over groups or rows; see benchmarks/mask_coding.py for rates and
timings on a 7168x2048 mask.
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache

import numpy as np
import torch

from ciuic_lab.compress.store import packing

VERSION = 1

# Streams are defined byte by byte (little-endian); the int64 <-> 8-byte views below rely on it.
if sys.byteorder != "little":
    raise ImportError("ciuic_lab.compress.store.coding needs a little-endian host")

# ---------------------------------------------------------------------------------------------
# N:M: combinatorial number system + mixed-radix words
# ---------------------------------------------------------------------------------------------

_WORD_LIMIT = 1 << 63  # a word holds values < R^k <= 2^63, i.e. fits a signed int64
_LUT_MAX = 1 << 16  # unrank through a (R, M) table when R is at most this (all usual patterns)
_PATTERN_MAX_M = 16  # rank through a 2^M pattern table up to this M (512 KiB of int64)


def _check_nm(n: int, m: int) -> int:
    if not (1 <= n <= m):
        raise ValueError(f"N:M needs 1 <= N <= M, got {n}:{m}")
    r = math.comb(m, n)
    if r > _WORD_LIMIT:
        raise ValueError(f"N:M {n}:{m} has C(M,N) = {r} > 2^63 choices per group: not supported")
    return r


@lru_cache(maxsize=64)
def nm_plan(n: int, m: int) -> tuple[int, int]:
    """(k, word_bits): groups per int64 word and the bits one full word is stored in.

    Minimises word_bits / k (ties: the smaller k) over every k with R^k <= 2^63.
    """
    r = _check_nm(n, m)
    if r == 1:  # N == M: nothing to code
        return 1, 0
    best = None
    k, rk = 1, r
    while rk <= _WORD_LIMIT:
        bits = (rk - 1).bit_length()
        if best is None or bits * best[0] < best[1] * k:
            best = (k, bits)
        k, rk = k + 1, rk * r
    return best


def nm_coded_bits(numel: int, n: int, m: int) -> int:
    """Exact size in bits of the nm_colex code of a mask with `numel` entries."""
    if numel % m:
        raise ValueError(f"{numel} entries do not split into groups of {m}")
    r = _check_nm(n, m)
    k, word_bits = nm_plan(n, m)
    groups = numel // m
    full, rem = divmod(groups, k)
    return full * word_bits + ((r ** rem - 1).bit_length() if rem else 0)


def nm_coded_nbytes(shape: tuple[int, ...], n: int, m: int) -> int:
    return math.ceil(nm_coded_bits(math.prod(shape), n, m) / 8)


@lru_cache(maxsize=64)
def _binom_table(n: int, m: int) -> torch.Tensor:
    """(m, n+1) int64: C(j, i) for j < m, i <= n, capped at R = C(m, n).

    A valid rank is a sum of such terms and < R, so no capped entry is ever added or chosen;
    the cap keeps every entry in int64 (C(j, i) can exceed 2^63 while R does not).
    """
    r = math.comb(m, n)
    return torch.tensor([[min(math.comb(j, i), r) for i in range(n + 1)] for j in range(m)],
                        dtype=torch.int64)


def nm_ranks(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Colex rank in [0, C(M,N)) of every group of m along the last dim, row-major: (groups,)."""
    _check_nm(n, m)
    if mask.shape[-1] % m:
        raise ValueError(f"N:M {n}:{m} needs the last dim divisible by {m}, got {mask.shape[-1]}")
    groups = mask.reshape(-1, m)
    bad = ValueError(f"mask is not {n}:{m}: every group of {m} must keep exactly {n}")
    if m <= _PATTERN_MAX_M:
        # The group's m bits as one integer, then a 2^m table from pattern to rank (-1 where the
        # pattern does not keep exactly n): m cheap column ops and one gather per group.
        pat = _group_patterns(groups, m)
        ranks = _rank_of_pattern(n, m).to(mask.device).index_select(0, pat)
        if groups.shape[0] and int(ranks.min()) < 0:
            raise bad
        return ranks
    if not bool((groups.sum(-1) == n).all()):
        raise bad
    # rank = sum over kept positions j of C(j, i_j), i_j = how many kept at positions <= j:
    # one pass per position, each over all groups at once.
    table = _binom_table(n, m).to(mask.device)
    ranks = torch.zeros(groups.shape[0], dtype=torch.int64, device=mask.device)
    count = torch.zeros_like(ranks)
    for j in range(m):
        g = groups[:, j]
        count += g
        ranks += torch.where(g, table[j][count.clamp(max=n)], 0)
    return ranks


def _group_patterns(groups: torch.Tensor, m: int) -> torch.Tensor:
    """(G, m) bool -> (G,) int64: bit j of a group's integer is its entry j (m <= 16)."""
    g = groups.shape[0]
    if 8 % m == 0:  # whole groups per byte: the plain bitmask's bytes, split into fields
        data = _bits_to_bytes(groups.reshape(-1)).to(torch.int64)
        shifts = torch.arange(0, 8, m, device=groups.device)
        return ((data[:, None] >> shifts) & ((1 << m) - 1)).reshape(-1)[:g]
    width = 8 * math.ceil(m / 8)  # pad every group to whole bytes, then join its bytes
    padded = torch.zeros(g, width, dtype=torch.bool, device=groups.device)
    padded[:, :m] = groups
    data = _bits_to_bytes(padded.reshape(-1)).view(g, width // 8).to(torch.int64)
    pat = data[:, 0].clone()
    for i in range(1, width // 8):
        pat |= data[:, i] << (8 * i)
    return pat


@lru_cache(maxsize=32)
def _rank_of_pattern(n: int, m: int) -> torch.Tensor:
    """(2^m,) int64: colex rank of every m-bit pattern with n ones, -1 for the others."""
    inv = torch.full((1 << m,), -1, dtype=torch.int64)
    pats = _unrank_lut(n, m).to(torch.int64) << torch.arange(m)
    inv[pats.sum(1)] = torch.arange(pats.shape[0])
    return inv


def _unrank_greedy(ranks: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(G,) colex ranks -> (G, m) bool, one vectorised pass per kept entry (largest first).

    The largest kept position c_N is the largest c with C(c, N) <= rank; subtract and repeat for
    N-1, ... (the greedy inverse of the combinatorial number system).
    """
    table = _binom_table(n, m).to(ranks.device)
    r = ranks.clone()
    out = torch.zeros(ranks.shape[0], m, dtype=torch.bool, device=ranks.device)
    for i in range(n, 0, -1):
        col = table[:, i].contiguous()  # C(c, i), non-decreasing in c
        c = torch.searchsorted(col, r, right=True) - 1
        out.scatter_(1, c[:, None], True)
        r -= col[c]
    return out


@lru_cache(maxsize=32)
def _unrank_lut(n: int, m: int) -> torch.Tensor:
    """(R, m) bool: the group pattern of every rank, built once by the greedy inverse."""
    return _unrank_greedy(torch.arange(math.comb(m, n)), n, m)


def nm_unrank(ranks: torch.Tensor, n: int, m: int, use_lut: bool | None = None) -> torch.Tensor:
    """Inverse of nm_ranks: (G,) ranks -> (G, m) bool groups."""
    r = _check_nm(n, m)
    if use_lut is None:
        use_lut = r <= _LUT_MAX
    if use_lut:
        return _unrank_lut(n, m).to(ranks.device).index_select(0, ranks)
    return _unrank_greedy(ranks, n, m)


def _bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """Flat uint8 0/1 (or bool) bits, LSB first -> bytes; the tail is padded with zeros.

    The layout of packing.pack_mask. On CPU through numpy's packbits (one C pass; torch's
    elementwise route is ~100x slower here); elsewhere with torch ops on the device.
    """
    if bits.device.type == "cpu":
        return torch.from_numpy(np.packbits(bits.contiguous().numpy(), bitorder="little"))
    return _bits_to_bytes_torch(bits)


def _bits_to_bytes_torch(bits: torch.Tensor) -> torch.Tensor:
    bits = bits.view(torch.uint8) if bits.dtype == torch.bool else bits
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    b = bits.view(-1, 8)
    out = b[:, 0].clone()
    for j in range(1, 8):
        out |= b[:, j] << j
    return out


def _bytes_to_bits(data: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> flat uint8 0/1 bits, LSB first (the inverse of _bits_to_bytes)."""
    if data.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(data.contiguous().numpy(), bitorder="little"))
    return _bytes_to_bits_torch(data)


def _bytes_to_bits_torch(data: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=data.device)
    return ((data[:, None] >> shifts) & 1).reshape(-1)


def _pack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """(W,) int64 words in [0, 2^bits) -> ceil(W*bits/8) bytes: word i at bits [i*bits, ...).

    Works on bytes: a word's 8 little-endian bytes, their bits, the low `bits` of them.
    """
    if not words.numel() or not bits:
        return torch.empty(math.ceil(words.numel() * bits / 8), dtype=torch.uint8,
                           device=words.device)
    if bits <= 8:  # (1:4, 1:2, ...: k = 1) the packer for narrow codes is much cheaper
        return packing.pack_bits(words, bits)
    if words.stride(0) != 1:  # (a length-1 slice can keep a stride that .view refuses)
        words = torch.empty(words.shape, dtype=words.dtype, device=words.device).copy_(words)
    as_bytes = words.view(torch.uint8).view(-1, 8)  # little-endian host (checked at import)
    wbits = _bytes_to_bits(as_bytes.reshape(-1)).view(-1, 64)[:, :bits]
    return _bits_to_bytes(wbits.reshape(-1))


def _unpack_words(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of _pack_words: the first `count` words as int64. Missing tail bits read as 0."""
    if not bits or not count:
        return torch.zeros(count, dtype=torch.int64, device=stream.device)
    if bits <= 8:
        nbytes = packing.packed_nbytes(count, bits)
        if stream.numel() < nbytes:  # a short final word
            stream = torch.cat([stream, stream.new_zeros(nbytes - stream.numel())])
        return packing.unpack_bits(stream, bits, count).to(torch.int64)
    need = count * bits
    flat = _bytes_to_bits(stream[: math.ceil(need / 8)])[:need]
    if flat.numel() < need:  # the final word was stored in fewer bits than a full one
        flat = torch.cat([flat, flat.new_zeros(need - flat.numel())])
    wbits = torch.zeros(count, 64, dtype=torch.uint8, device=stream.device)
    wbits[:, :bits] = flat.view(count, bits)
    return _bits_to_bytes(wbits.view(-1)).view(torch.int64)


def encode_nm(mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, dict]:
    r = _check_nm(n, m)
    k, word_bits = nm_plan(n, m)
    ranks = nm_ranks(mask, n, m)
    meta = {"codec": "nm_colex", "version": VERSION, "n": n, "m": m, "k": k,
            "word_bits": word_bits}
    if r == 1:
        return torch.empty(0, dtype=torch.uint8, device=mask.device), meta
    groups = ranks.numel()
    pad = (-groups) % k
    if pad:  # zero digits on top of the last word: it stays < R^rem, so fits its shorter field
        ranks = torch.cat([ranks, ranks.new_zeros(pad)])
    digits = ranks.view(-1, k).t().contiguous()  # (k, W): each digit position contiguous
    # Horner, highest digit first: every partial value stays < R^k <= 2^63, no overflow.
    words = digits[k - 1].clone()
    for j in range(k - 2, -1, -1):
        words.mul_(r).add_(digits[j])
    stream = _pack_words(words, word_bits)
    nbytes = math.ceil(nm_coded_bits(mask.numel(), n, m) / 8)
    return stream[:nbytes].clone(), meta


def decode_nm(stream: torch.Tensor, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
    n, m, k, word_bits = meta["n"], meta["m"], meta["k"], meta["word_bits"]
    r = _check_nm(n, m)
    if (k, word_bits) != nm_plan(n, m):
        raise ValueError(f"nm_colex meta {meta} does not match this version's plan")
    numel = math.prod(shape)
    expect = math.ceil(nm_coded_bits(numel, n, m) / 8)
    if stream.numel() != expect:
        raise ValueError(f"nm_colex stream has {stream.numel()} bytes, shape {shape} needs {expect}")
    groups = numel // m
    if r == 1:
        return torch.ones(shape, dtype=torch.bool, device=stream.device)
    n_words = math.ceil(groups / k)
    words = _unpack_words(stream, word_bits, n_words)
    digits = torch.empty(k, n_words, dtype=torch.int64, device=stream.device)
    # Mixed radix digits, lowest first: repeated divmod by R over all words at once.
    rest = words
    for j in range(k):
        quot = torch.div(rest, r, rounding_mode="floor")
        torch.sub(rest, quot * r, out=digits[j])
        rest = quot
    ranks = digits.t().reshape(-1)[:groups]
    return nm_unrank(ranks, n, m).view(shape)


# ---------------------------------------------------------------------------------------------
# Unstructured: interleaved rANS over the bitmask's bytes, i.i.d. Bernoulli(p) model
# ---------------------------------------------------------------------------------------------

_PREC = 16  # probabilities in units of 2^-16
_TOTAL = 1 << _PREC
_STATE_LO = 1 << 16  # coder state lives in [2^16, 2^32); renormalisation moves 16-bit words
_Q_BITS = 16  # the density p is stored as q / 2^16
# Lanes trade rate for decode time: each lane costs its 4-byte final state, and the decoder's
# Python loop runs one step (~15 numpy ops) per symbol per lane. With S steps per mask the states
# cost 32 / (8 S) = 4 / S bits per weight; S = 1024 gives 0.004 b/w and keeps a small layer's
# decode as short as a large one's (with 2048 bytes per lane instead, a 256x256 mask took 2048
# steps for its 8 KiB).
_MAX_STEPS = 1024
_MAX_LANES = 4096


def quantise_density(p: float) -> int:
    return min(max(round(p * (1 << _Q_BITS)), 1), (1 << _Q_BITS) - 1)


@lru_cache(maxsize=256)
def _byte_model(q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """freq (256,), cum (256,), slot->symbol lut (2^16,) of the i.i.d. byte model, all int64.

    Integer-exact: w_v = q^c (Q-q)^(8-c) sums to Q^8 = 2^128 (binomial theorem), so
    floor(w_v / 2^112) is the 16-bit frequency rounded down; every byte value gets at least 1
    (so any mask is codable) and the remainder goes to the most probable byte (lowest value on a
    tie). Same integers on every machine, hence the same stream.
    """
    qq = 1 << _Q_BITS
    freq = []
    for v in range(256):
        c = v.bit_count()
        freq.append(max(1, (q ** c * (qq - q) ** (8 - c)) >> (8 * _Q_BITS - _PREC)))
    top = max(range(256), key=lambda v: (freq[v], -v))
    freq[top] += _TOTAL - sum(freq)
    if freq[top] < 1:
        raise AssertionError("byte model does not normalise")  # cannot happen for q in [1, Q)
    f = np.array(freq, dtype=np.int64)
    cum = np.cumsum(f) - f
    lut = np.repeat(np.arange(256, dtype=np.int64), f)
    for a in (f, cum, lut):
        a.flags.writeable = False  # cached and shared
    return f, cum, lut


def rans_lanes(n_symbols: int) -> int:
    return int(min(_MAX_LANES, max(1, math.ceil(n_symbols / _MAX_STEPS))))


# The two coder loops run in numpy: each step is a handful of ops on `lanes` (~1000) values,
# where numpy's per-op cost is a third of torch's; the loop is sequential anyway (CPU).

def _rans_encode(sym: np.ndarray, q: int, lanes: int) -> np.ndarray:
    """Encode (N,) byte symbols; symbol i goes to lane i % lanes at step i // lanes."""
    freq, cum, _ = _byte_model(q)
    n = sym.size
    steps = math.ceil(n / lanes)
    x = np.full(lanes, _STATE_LO, dtype=np.int64)
    f_all, c_all = freq[sym], cum[sym]
    limit_all = f_all << 16
    # Words are emitted into a (steps, lanes) grid; the decoder reads step 0 first and lanes in
    # ascending order, i.e. the emitted cells in row-major order: one compaction at the end.
    grid_words = np.zeros(steps * lanes, dtype=np.uint16)
    grid_emit = np.zeros(steps * lanes, dtype=bool)
    # rANS is LIFO: encode the last step first, so the decoder meets step 0 first.
    for t in range(steps - 1, -1, -1):
        lo, hi = t * lanes, min(n, (t + 1) * lanes)
        xs = x[: hi - lo]
        # Keep x < f * 2^16 before the step so the result stays below 2^32: shift out a word.
        emit = xs >= limit_all[lo:hi]
        grid_emit[lo:hi] = emit
        grid_words[lo:hi] = xs  # low 16 bits (uint16 cast wraps); used where emit only
        xs = np.where(emit, xs >> 16, xs)
        quot, rem = np.divmod(xs, f_all[lo:hi])
        x[: hi - lo] = (quot << _PREC) + rem + c_all[lo:hi]
    words = grid_words[grid_emit]
    return np.concatenate([x.astype("<u4").view(np.uint8), words.astype("<u2").view(np.uint8)])


@lru_cache(maxsize=32)
def _decode_tables(q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slot (2^16): its symbol, that symbol's frequency, and slot - cum (the decoder's bias)."""
    freq, cum, lut = _byte_model(q)
    slots = np.arange(_TOTAL, dtype=np.int64)
    tables = (lut.astype(np.uint8), freq[lut].astype(np.int32), (slots - cum[lut]).astype(np.int32))
    for a in tables:
        a.flags.writeable = False
    return tables


def _rans_decode(stream: np.ndarray, q: int, lanes: int, n: int) -> np.ndarray:
    """(N,) uint8 symbols from a _rans_encode stream."""
    return _rans_decode_many([(stream, q, lanes, n)])[0]


def _rans_decode_many(jobs: list[tuple[np.ndarray, int, int, int]]) -> list[np.ndarray]:
    """Decode several rANS streams (stream, q, lanes, n_symbols) in one loop.

    The loop has one step per symbol per lane whatever the stream's size, so small masks cost as
    many steps as large ones; decoding many masks together (all lanes of all streams side by
    side, each lane with its own model and its own stream's words) pays those steps once.
    """
    qs = sorted({q for _, q, _, _ in jobs})
    tabs = [_decode_tables(q) for q in qs]
    sym_tab = np.concatenate([t[0] for t in tabs])
    freq_tab = np.concatenate([t[1] for t in tabs])
    bias_tab = np.concatenate([t[2] for t in tabs])
    q_index = {q: i for i, q in enumerate(qs)}

    states, words, n_words, lane_job, lane_local = [], [], [], [], []
    lane_lanes, lane_base, lane_steps, out_base = [], [], [], []
    word_base, sym_base = 0, 0
    for j, (stream, q, lanes, n) in enumerate(jobs):
        if stream.size < 4 * lanes or (stream.size - 4 * lanes) % 2:
            raise ValueError("rans stream is truncated")
        states.append(stream[:4 * lanes].view("<u4").astype(np.int64))
        w = stream[4 * lanes:].view("<u2").astype(np.int64)
        words.append(w)
        n_words.append(w.size)
        local = np.arange(lanes, dtype=np.int64)
        lane_job.append(np.full(lanes, j, dtype=np.int64))
        lane_local.append(local)
        lane_lanes.append(np.full(lanes, lanes, dtype=np.int64))
        lane_base.append(np.full(lanes, q_index[q] * _TOTAL, dtype=np.int64))
        lane_steps.append((n - local + lanes - 1) // lanes)  # symbols local, local + lanes, ...
        out_base.append(sym_base + local)
        word_base += w.size
        sym_base += n
    x = np.concatenate(states)
    job = np.concatenate(lane_job)
    stride = np.concatenate(lane_lanes)
    base = np.concatenate(lane_base)
    nsteps = np.concatenate(lane_steps)
    out_pos = np.concatenate(out_base)
    n_jobs = len(jobs)
    word_off = np.concatenate([[0], np.cumsum(n_words)]).astype(np.int64)
    all_words = np.append(np.concatenate(words) if words else np.empty(0, np.int64), 0)
    dump = sym_base  # inactive lanes write here
    out = np.empty(sym_base + 1, dtype=np.uint8)
    # where each job's lanes start in the concatenation: the segmented (per stream) count of
    # words read this step is cum[lane] - cum[first lane of its stream - 1]
    first_lane = np.concatenate([[0], np.cumsum([lanes for _, _, lanes, _ in jobs])])
    seg_start = first_lane[job]
    ptr = word_off[:-1].copy()  # next word to read, per job, in all_words
    for t in range(int(nsteps.max()) if nsteps.size else 0):
        act = nsteps > t
        slot = base + (x & (_TOTAL - 1))
        s = sym_tab[slot]
        xn = freq_tab[slot] * (x >> _PREC) + bias_tab[slot]
        need = (xn < _STATE_LO) & act
        cum = np.concatenate([[0], np.cumsum(need)])
        pos = ptr[job] + cum[1:] - cum[seg_start] - 1
        np.clip(pos, 0, all_words.size - 1, out=pos)
        xn = np.where(need, (xn << 16) | all_words[pos], xn)
        x = np.where(act, xn, x)
        ptr += cum[first_lane[1:]] - cum[first_lane[:-1]]
        out[np.where(act, out_pos + t * stride, dump)] = s
    # Every lane must land back on the encoder's initial state, having read every word of its
    # stream: a free integrity check that catches a corrupt or mismatched stream.
    ok_states = np.ones(n_jobs, dtype=bool)
    np.logical_and.at(ok_states, job, x == _STATE_LO)
    bad = np.flatnonzero((ptr != word_off[1:]) | ~ok_states)
    if bad.size:
        raise ValueError(f"rans stream {int(bad[0])} does not decode to a consistent state "
                         "(corrupt stream?)")
    offs = np.concatenate([[0], np.cumsum([n for _, _, _, n in jobs])])
    return [out[offs[j]:offs[j + 1]] for j in range(n_jobs)]


def _count(mask: torch.Tensor) -> int:
    if mask.device.type == "cpu":  # one C pass; torch's bool sum is far slower on CPU
        return int(np.count_nonzero(mask.contiguous().numpy()))
    return int(mask.sum())


def encode_rans(mask: torch.Tensor, kept: int | None = None,
                plain: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """rans_iid code of an unstructured mask (any shape), whatever its density.

    kept (its count of True) and plain (its bitmask bytes) may be passed when already known.
    """
    flat = mask.reshape(-1)
    kept = _count(flat) if kept is None else kept
    q = quantise_density(kept / flat.numel() if flat.numel() else 0.0)
    if plain is None:
        plain = _bits_to_bytes(flat)
    sym = plain.cpu().numpy().astype(np.int64)
    lanes = rans_lanes(sym.size)
    stream = torch.from_numpy(_rans_encode(sym, q, lanes))
    meta = {"codec": "rans_iid", "version": VERSION, "q": q, "lanes": lanes}
    return stream.to(mask.device), meta


def decode_rans(stream: torch.Tensor, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    n_sym = packing.packed_nbytes(numel, 1)
    sym = _rans_decode(stream.cpu().numpy(), meta["q"], meta["lanes"], n_sym)
    return _mask_from_bytes(sym, shape, stream.device)


def _mask_from_bytes(sym: np.ndarray, shape: tuple[int, ...], device) -> torch.Tensor:
    bits = _bytes_to_bits(torch.from_numpy(sym))[: math.prod(shape)]
    return bits.view(torch.bool).view(shape).to(device)


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------


def binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def entropy_bits(shape: tuple[int, ...], nm: tuple[int, int] | None = None,
                 density: float | None = None) -> float:
    """The limit: log2 C(M,N) per group for N:M, numel * H(density) bits for an i.i.d. mask."""
    numel = math.prod(shape)
    if nm is not None:
        n, m = nm
        return numel / m * math.log2(math.comb(m, n))
    if density is None:
        raise ValueError("an unstructured mask's entropy needs its density")
    return numel * binary_entropy(density)


def coded_nbytes(shape: tuple[int, ...], nm: tuple[int, int] | None = None,
                 density: float | None = None) -> int:
    """Bytes of the stream encode_mask would store, from the shape (and density) alone.

    Exact for N:M and for the plain / constant cases. For an unstructured mask coded with rANS it
    is the model's expectation (entropy of the quantised model + lane states), capped at the
    bitmask: a budget estimate, not a promise (the stored stream is what counts).
    """
    numel = math.prod(shape)
    if nm is not None:
        return nm_coded_nbytes(shape, *nm)
    plain = packing.packed_nbytes(numel, 1)
    if density is None:
        return plain
    if density <= 0.0 or density >= 1.0:
        return 0
    n_sym = plain
    freq, _, _ = _byte_model(quantise_density(density))
    p = density
    # expected code length per byte under the true density p, with the stored model's freqs
    bits = 0.0
    for v in range(256):
        c = v.bit_count()
        pv = p ** c * (1 - p) ** (8 - c)
        bits += pv * (_PREC - math.log2(int(freq[v])))
    est = math.ceil(n_sym * bits / 8) + 4 * rans_lanes(n_sym)
    est += est % 2  # words are 16-bit
    return min(plain, est)


def encode_mask(mask: torch.Tensor, nm: tuple[int, int] | None = None,
                codec: str | None = None) -> tuple[torch.Tensor, dict]:
    """Code a bool mask: (uint8 stream, JSON-able meta). decode_mask(stream, meta, shape) inverts.

    nm=(N, M): the mask must keep exactly N of every M along the last dim -> nm_colex.
    Otherwise unstructured: const if all entries are equal, else rans_iid when its stream is
    shorter than the bitmask, else bitmask. `codec` forces one ("bitmask", "rans_iid", ...),
    for tests and benchmarks.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    if nm is not None:
        if codec not in (None, "nm_colex"):
            raise ValueError(f"an N:M mask is coded with nm_colex, not {codec}")
        return encode_nm(mask, *nm)
    numel = mask.numel()
    kept = _count(mask)
    if codec is None and numel and kept in (0, numel):
        codec = "const"
    if codec == "const":
        if kept not in (0, numel):
            raise ValueError("const codec needs a mask with all entries equal")
        return (torch.empty(0, dtype=torch.uint8, device=mask.device),
                {"codec": "const", "version": VERSION, "value": bool(numel and kept == numel)})
    plain = _bits_to_bytes(mask.reshape(-1))  # == packing.pack_mask(mask), faster on CPU
    if codec == "bitmask":
        return plain, {"codec": "bitmask", "version": VERSION}
    if codec == "rans_iid":
        return encode_rans(mask, kept, plain)
    if codec is not None:
        raise ValueError(f"unknown codec {codec!r}")
    # Skip the coder where even its expected size cannot win by 0.5 % (a density near 50 %, a
    # mask too small for its lane states); otherwise the real stream decides.
    est = coded_nbytes(tuple(mask.shape), None, kept / numel) if numel else plain.numel()
    if est < plain.numel() * 0.995:
        stream, meta = encode_rans(mask, kept, plain)
        if stream.numel() < plain.numel():
            return stream, meta
    return plain, {"codec": "bitmask", "version": VERSION}


def decode_masks(items: list[tuple[torch.Tensor, dict, tuple[int, ...]]]) -> list[torch.Tensor]:
    """decode_mask over many (stream, meta, shape) at once: the same masks, in order.

    rans_iid streams are decoded together in one loop (its step count does not grow with the
    number of masks), which is what makes loading a model with many small layers fast; the
    other codecs are vectorised per mask already.
    """
    out: list[torch.Tensor | None] = [None] * len(items)
    rans = []
    for i, (stream, meta, shape) in enumerate(items):
        shape = tuple(shape)
        if meta.get("codec") == "rans_iid":
            _check_version(meta)
            n_sym = packing.packed_nbytes(math.prod(shape), 1)
            rans.append((i, (stream.cpu().numpy(), meta["q"], meta["lanes"], n_sym)))
        else:
            out[i] = decode_mask(stream, meta, shape)
    if rans:
        decoded = _rans_decode_many([job for _, job in rans])
        for (i, _), sym in zip(rans, decoded):
            stream, _, shape = items[i]
            out[i] = _mask_from_bytes(sym, tuple(shape), stream.device)
    return out


def _check_version(meta: dict) -> None:
    if meta.get("version", VERSION) != VERSION:
        raise ValueError(f"mask code version {meta.get('version')} is not {VERSION}")


def decode_mask(stream: torch.Tensor, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool mask of `shape` that encode_mask coded into (stream, meta), on stream's device."""
    shape = tuple(shape)
    codec = meta.get("codec")
    _check_version(meta)
    if codec == "nm_colex":
        return decode_nm(stream, meta, shape)
    if codec == "rans_iid":
        return decode_rans(stream, meta, shape)
    if codec == "bitmask":
        return _bytes_to_bits(stream)[: math.prod(shape)].view(torch.bool).view(shape)
    if codec == "const":
        return torch.full(shape, bool(meta["value"]), dtype=torch.bool, device=stream.device)
    raise ValueError(f"unknown mask codec {codec!r}")
