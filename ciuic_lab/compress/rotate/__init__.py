"""Incoherence processing: orthogonal rotations that every stage can work under.

Idea (QuIP#, arXiv 2402.04396, §3; QuaRot, arXiv 2404.00456, §4; SpinQuant, arXiv 2405.16406):
a random orthogonal Q spreads any large weight or activation coordinate over all coordinates,
so W Q has no outlier columns ("incoherent"); low-bit grids then waste far less of their range.
Where Q and Qᵀ can be absorbed by the weights on both sides of a tensor, the network computes
exactly the same function and the rotation is free at run time. Where they cannot, Q is applied
to activations at run time, so it must be fast and its stored bytes and time are counted.

Three layers of this file:

1. Maths. `fwht` (fast Walsh–Hadamard transform, any leading dims), `kron_matmul` (the same
   transform as a few small GEMMs, used at run time), Paley Hadamard matrices,
   `HadamardRotation` (random signs · (H_p ⊗ H_2^k) / √n, for any n = p·2^k with a known
   Hadamard of order p, else a small seeded Haar block in its place) and `RandomOrthogonal`
   (dense Haar-random Q, for offline use where speed does not matter).
2. `rotate_model`: the fused residual-stream rotation (offline, zero run-time cost) for Llama,
   Qwen2, DeepSeek-V2 and DeepSeek-V3, driven by each architecture's `ResidualLayout`.
   `rotate_value_path`: the fused per-head rotation of attention values and o_proj's input.
3. `OnlineRotation` / `RotatedLinear` / `add_online_rotations`: a rotation kept at run time in
   front of a linear (down_proj, o_proj): W ← W Q offline, x ← x Q online; its sign vector is a
   persistent buffer, so model byte counts include it, and its FLOPs show up in measured speed.

Where each transform applies is the model's adapter's to say (`models/adapters.py`: its blocks,
ends, `residual` layout or the reason it has none, `value_rows`, `online_sites`); this file
names no module path. Wiring into the walk: transforms run on the loaded model before
`compress_model` (they only edit weights or wrap modules), so every stage calibrates in the
rotated basis. A streamed model (never whole in memory) gets the fused ones part by part as it
loads (`StreamedRotation`). Routed experts' down projections get no run-time rotation: their
input is computed inside the experts module, so the walk's calibration, CompressedExperts and
the export would all have to apply it (see `add_online_rotations`).

Conventions: a linear computes y = x Wᵀ with W (out, in); activations are row vectors, a rotated
activation is x Q. `Rotation.apply(x)` = x Q and `Rotation.apply_t(x)` = x Qᵀ on the last dim.
Then a layer reading a rotated input needs W ← W Q (`apply(W)`), and a layer whose output must
come out rotated needs W ← Qᵀ W (`apply(Wᵀ)ᵀ`), b ← Qᵀ b (`apply(b)`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ciuic_lab.errors import UnsupportedModel
from ciuic_lab.models import adapters
from ciuic_lab.models.adapters import DecoderAdapter, ResidualLayout, ValueRows

# ------------------------------------------------------------------------------------------------
# 1. Maths
# ------------------------------------------------------------------------------------------------


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n along the last dim, H_n the (unnormalised, symmetric) Sylvester Hadamard matrix
    H_1 = [1], H_2m = [[H_m, H_m], [H_m, −H_m]]; n must be a power of two.

    log2(n) butterfly passes of n additions each, all leading dims at once (no Python loop over
    rows): O(n log n) per vector instead of the O(n²) of a matrix product. H_n H_n = n I, so
    fwht(fwht(x)) / n == x.
    """
    n = x.shape[-1]
    if not is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two last dim, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        # pairs (i, i + h) inside each block of 2h: [a, b] -> [a + b, a − b]
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def sylvester(n: int, dtype=torch.float64) -> torch.Tensor:
    """The n×n Sylvester Hadamard matrix (n a power of two), unnormalised: fwht(x) = x @ it."""
    return fwht(torch.eye(n, dtype=dtype))


def kron_matmul(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x @ (F_1 ⊗ F_2 ⊗ … ⊗ F_m) on the last dim without forming the n×n product.

    x is viewed as (T, d_1, …, d_m). Axis i is contracted in place as a batched product
    F_iᵀ @ (T·d_1⋯d_{i−1}, d_i, d_{i+1}⋯d_m), the last axis as one plain GEMM (·, d_m) @ F_m:
    no transposes, no copies beyond each product's output. Cost n·Σ d_i multiply-adds.
    Since the Sylvester matrix factors, H_ab = H_a ⊗ H_b, a Hadamard of width 2^k is applied as
    a few factors of width ≤ 64, the widest last (see `_sylvester_factors`); on CPU this measured
    about 2-3x faster than the butterfly `fwht` (BLAS instead of log2 n memory passes).
    """
    lead, n = x.shape[:-1], x.shape[-1]
    dims = [f.shape[0] for f in factors]
    if math.prod(dims) != n:
        raise ValueError(f"factor sizes {dims} do not multiply to {n}")
    y = x.reshape(-1, n)
    right = n
    for f in factors:
        d = f.shape[0]
        right //= d
        f = f.to(y.dtype)
        if right == 1:
            y = y.reshape(-1, d) @ f
        else:  # (x @ (F ⊗ I))[.., b, r] = Σ_a F[a, b] x[.., a, r]
            y = torch.matmul(f.T, y.reshape(-1, d, right))
    return y.reshape(*lead, n)


def _sylvester_factors(k: int, chunk: int = 64, dtype=torch.float64) -> list[torch.Tensor]:
    """Normalised Sylvester factors (each ≤ chunk wide) whose Kronecker product is H_k / √k,
    narrowest first: the widest is then contracted last as one plain GEMM, which measured
    fastest. Any order gives the same matrix (all are Kronecker powers of H_2)."""
    widths = []
    while k > 1:
        widths.append(min(k, chunk))
        k //= widths[-1]
    return [sylvester(d, dtype) / math.sqrt(d) for d in sorted(widths)]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = χ(j − i) over GF(q), q prime, χ the Legendre symbol (0, +1 residue, −1 not)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.int64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley_hadamard(order: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix (H Hᵀ = order·I) of the given order by Paley's constructions
    (R. E. A. C. Paley, "On orthogonal matrices", 1933), or None if neither applies with a prime:

    I  (order = q + 1, q ≡ 3 mod 4): H = I + [[0, 1ᵀ], [−1, Q]]  (Q skew-symmetric)
    II (order = 2(q + 1), q ≡ 1 mod 4): the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]],
        each 0 replaced by [[1, −1], [−1, −1]] and each ±1 by ±[[1, 1], [1, −1]].

    These cover the odd factors of every width listed for DeepSeek and SmolLM2: 12 (q=11, I),
    20 (q=19, I), 28 (q=13, II), 36 (q=17, II), ... Only primes q are used, so e.g. order 28 via
    q = 27 (a prime power) is found through II instead.
    """
    q = order - 1
    if q % 4 == 3 and _is_prime(q):
        c = torch.zeros(order, order, dtype=torch.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, -1, _jacobsthal(q)
        return c + torch.eye(order, dtype=torch.int64)
    if order % 2 == 0:
        q = order // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
            c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
            zero_blk = torch.tensor([[1, -1], [-1, -1]])
            one_blk = torch.tensor([[1, 1], [1, -1]])
            # kron(C, one_blk) handles ±1; the zero diagonal entries take zero_blk instead
            h = torch.kron(c, one_blk) + torch.kron(torch.eye(q + 1, dtype=torch.int64), zero_blk)
            return h
    return None


def haar_orthogonal(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A seeded Haar-random orthogonal (n, n): QR of a Gaussian with R's diagonal signs folded
    into Q (without that fix QR's sign convention biases the distribution)."""
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.to(dtype)


def hadamard_factor(n: int) -> tuple[int, int, str]:
    """(p, 2^k, kind) with n = p·2^k for the fast rotation of width n.

    kind "sylvester": p = 1 (n a power of two).
    kind "paley":     p = m·2^t (m the odd part of n) is a Paley order; t as small as possible so
                      that most of the work stays in the O(n log n) transform.
    kind "haar":      no Hadamard of any order m·2^t was found: p = m and the p×p block is a
                      seeded Haar-random orthogonal matrix (still orthogonal and fast, but its
                      entries are not all ±1/√p, so the result is a little less incoherent).

    Why Kronecker and not block-diagonal: (B ⊗ H) mixes every input coordinate into every output
    coordinate, so an outlier is spread over all n coordinates. A block-diagonal rotation would
    keep each outlier inside its block (max entry 1/√(n/m) instead of 1/√n for Paley).
    """
    if n <= 0:
        raise ValueError(f"rotation width must be positive, got {n}")
    a = (n & -n).bit_length() - 1
    m = n >> a
    if m == 1:
        return 1, n, "sylvester"
    for t in range(1, a + 1):
        if paley_hadamard(m << t) is not None:
            return m << t, n // (m << t), "paley"
    return m, n // m, "haar"


class Rotation:
    """An orthogonal Q (n, n) acting on the last dim: apply(x) = x Q, apply_t(x) = x Qᵀ."""

    n: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        return self.apply(torch.eye(self.n, dtype=dtype))

    def describe(self) -> str:
        raise NotImplementedError


class HadamardRotation(Rotation):
    """Randomised Hadamard Q = diag(s) · (B ⊗ H_2^k / √2^k), s random ±1 (QuIP#'s "RHT",
    arXiv 2402.04396 §3.1; QuaRot's randomised Hadamard, arXiv 2404.00456 §3).

    B is the normalised p×p block from `hadamard_factor` (absent for p = 1, a Paley Hadamard
    / √p, or a Haar block). x Q costs n·(p + Σ chunk widths) multiply-adds (`kron_matmul`).
    The random signs make Q a random orthogonal matrix whose entries are all ±1/√n (Paley and
    Sylvester): a fixed input is mapped to an incoherent one with high probability whatever it
    is, which a fixed (unsigned) Hadamard does not guarantee.
    """

    def __init__(self, n: int, seed: int):
        self.n = n
        self.p, self.k, self.kind = hadamard_factor(n)
        g = torch.Generator().manual_seed(int(seed))
        self.signs = torch.randint(0, 2, (n,), generator=g).mul(2).sub(1).to(torch.int8)
        if self.kind == "paley":
            self.block = paley_hadamard(self.p).double() / math.sqrt(self.p)
        elif self.kind == "haar":
            self.block = haar_orthogonal(self.p, seed + 1)
        else:
            self.block = None
        self.factors = ([] if self.block is None else [self.block]) + _sylvester_factors(self.k)

    def describe(self) -> str:
        core = f"H{self.k}" if self.kind == "sylvester" else f"{self.kind}{self.p} ⊗ H{self.k}"
        return f"random signs · {core}, orthonormal"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return kron_matmul(x * self.signs.to(x.dtype), self.factors)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        # Qᵀ = (B ⊗ H)ᵀ diag(s) = (Bᵀ ⊗ H) diag(s): H is symmetric, a Paley B generally is not.
        return kron_matmul(x, [f.T for f in self.factors]) * self.signs.to(x.dtype)


class RandomOrthogonal(Rotation):
    """A dense seeded Haar-random Q (SpinQuant's random baseline, arXiv 2405.16406 §3): for
    rotations fused offline into weights, where the O(n²) product is paid once."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.q = haar_orthogonal(n, seed)

    def describe(self) -> str:
        return f"haar{self.n}"

    def apply(self, x):
        return x @ self.q.to(x.dtype)

    def apply_t(self, x):
        return x @ self.q.T.to(x.dtype)


def make_rotation(n: int, seed: int, kind: str = "hadamard") -> Rotation:
    if kind == "hadamard":
        return HadamardRotation(n, seed)
    if kind == "random":
        return RandomOrthogonal(n, seed)
    raise ValueError(f"rotation kind must be 'hadamard' or 'random', got {kind!r}")


# ------------------------------------------------------------------------------------------------
# 2. Fused residual-stream rotation
# ------------------------------------------------------------------------------------------------


class _ByArchitecture(Mapping):
    """{model_type: what `entry(adapter)` gives} over the registered adapters where it is not
    None, read live (an adapter registered later shows). A view for the config check, not a
    table: the layouts themselves are the adapters'."""

    def __init__(self, entry):
        self._entry = entry

    def _items(self) -> dict:
        return {mt: v for mt, ad in adapters.ADAPTERS.items() if (v := self._entry(ad)) is not None}

    def __getitem__(self, key):
        return self._items()[key]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


# Read by `config.py` to refuse a rotation before any work.
RESIDUAL = _ByArchitecture(lambda ad: ad.residual)  # architectures with a residual layout
NO_RESIDUAL = _ByArchitecture(lambda ad: ad.no_residual)  # ... without one, and why
VALUE_PATH = _ByArchitecture(lambda ad: ad.value_path)  # ... with a value path


class RotationUnsupported(ValueError):
    pass


def _adapter(model_or_config) -> DecoderAdapter:
    try:
        return adapters.adapter_for(model_or_config)
    except UnsupportedModel as e:
        raise RotationUnsupported(str(e)) from e


def _get(root: nn.Module, path: str):
    """Module or parameter at a dotted path, or None."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _check_norm(norm: nn.Module, hidden: int, rot: Rotation) -> None:
    """Refuse a norm that does not commute with the rotation once its scale is folded.

    RMSNorm(x) = x / √(mean(x²) + ε) is rotation-equivariant exactly when the mean of squares
    runs over the full hidden dim (‖xQ‖ = ‖x‖) and nothing else is applied; LayerNorm's mean
    subtraction, a bias, a (1 + w) scale or a grouped norm would break it. Checked numerically
    on the module itself with its scale set to ones.
    """
    w = getattr(norm, "weight", None)
    if w is None or tuple(w.shape) != (hidden,) or getattr(norm, "bias", None) is not None:
        raise RotationUnsupported(f"{type(norm).__name__}: expected an RMSNorm over {hidden} "
                                  f"features with a scale and no bias")
    saved = w.detach().clone()
    with torch.no_grad():
        w.fill_(1.0)
        x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = x * torch.linspace(0.1, 30, hidden, dtype=torch.float64)  # outliers: a real test
        a = norm(rot.apply(x).to(w.dtype)).double()
        b = rot.apply(norm(x.to(w.dtype)).double())
        w.copy_(saved)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())):
        raise RotationUnsupported(f"{type(norm).__name__} is not rotation-invariant after folding "
                                  f"its scale (max diff {float((a - b).abs().max()):.3g})")


def _with(t: torch.Tensor, fn) -> None:
    """t ← fn(t in float64), in place, keeping t's dtype (float64 so that fusing adds no error
    beyond the final rounding to the model's dtype)."""
    with torch.no_grad():
        t.copy_(fn(t.detach().double()).to(t.dtype))


def fold_norm(norm: nn.Module, readers: list[torch.Tensor]) -> None:
    """RMSNorm scale g into the weights reading its output: W diag(g) (last dim), then g ← 1."""
    g = norm.weight.detach().double()
    for w in readers:
        _with(w, lambda t: t * g)
    with torch.no_grad():
        norm.weight.fill_(1.0)


def _block_tensors(block: nn.Module, lay: ResidualLayout, path: str):
    """(attn_readers, mlp_readers (router included), writers, writer biases, expert_readers,
    expert_writers, names) of one block, checking that nothing unknown holds parameters."""
    found: dict[str, list] = {k: [] for k in ("attn", "mlp", "w", "wb", "er", "ew")}
    names: list[str] = []
    for key, paths in (("attn", lay.attn_readers), ("mlp", lay.mlp_readers + lay.router),
                       ("w", lay.writers)):
        for p in paths:
            mod = _get(block, p)
            if mod is None:
                continue
            found[key].append(mod.weight)
            names.append(p)
            if key == "w" and getattr(mod, "bias", None) is not None:
                found["wb"].append(mod.bias)
    for key, paths in (("er", lay.expert_readers), ("ew", lay.expert_writers)):
        for p in paths:
            t = _get(block, p)
            if t is not None:
                found[key].append(t)
                names.append(p)
    # Everything with parameters must be accounted for: a layout this table does not know
    # (an extra projection, a bias-carrying norm) would otherwise be rotated wrongly, silently.
    known = set(names) | {lay.attn_norm, lay.mlp_norm} | set(lay.internal)
    for pname, _ in block.named_parameters():
        if not any(pname == k or pname.startswith(k + ".") for k in known):
            raise RotationUnsupported(f"{path}.{pname}: not in the residual-stream table of this "
                                      f"architecture; refusing to rotate")
    return found, names


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, kind: str = "hadamard") -> dict:
    """Rotate the residual stream of a decoder in place by an orthogonal Q (fused, zero run-time
    cost), QuaRot (arXiv 2404.00456 §4.1) / SpinQuant (arXiv 2405.16406 §3) style:

      1. fold every residual RMSNorm's scale into the linears that read it (norm weight ← 1),
         the final norm's into the head;
      2. embeddings E ← E Q; every reader (q/k/v, q_a_proj, kv_a_proj_with_mqa, gate/up, shared
         experts' gate/up, routed experts' gate_up, the router) W ← W Q; every writer (o_proj,
         down_proj, shared and routed experts' down) W ← Qᵀ W (and bias ← Qᵀ b); head W ← W Q.

    The model then computes the same logits (fp32: to rounding), router logits included, so
    routing is unchanged; the router is rotated, never compressed. Shapes are unchanged.
    Tied input/output embeddings are untied first (`untie_embeddings`): E Q for the input and
    E diag(g) Q for the head differ unless the final norm's scale is all ones, so the head gets
    its own copy and `model.config.tie_word_embeddings` becomes False (the only config change).

    kind: "hadamard" (HadamardRotation) or "random" (dense Haar-random). Returns an info dict:
    kind, seed, hidden, construction, folded norms, rotated module paths, runtime_bytes (0),
    untied_head_bytes (the head's new stored bytes, 0 when it was already separate).
    A streamed model gets the same transform block by block: `StreamedRotation`.
    """
    ad = _adapter(model)
    lay, rot = _residual_setup(model.config, seed, kind)
    head_bytes = _rotate_ends(model, rot)
    rotated: list[str] = []
    blocks = ad.blocks(model)
    for i, block in enumerate(blocks):
        path = ad.block_name(i)
        names, _ = rotate_block(block, lay, rot, path, check=i == 0)
        rotated += [f"{path}.{n}" for n in names]
    return {"kind": kind, "seed": seed, "hidden": rot.n, "construction": rot.describe(),
            "folded_norms": 2 * len(blocks) + 1,
            "rotated": ["embed", *rotated, "lm_head"], "runtime_bytes": 0,
            "untied_head_bytes": head_bytes}


def _residual_setup(config, seed: int, kind: str) -> tuple[ResidualLayout, Rotation]:
    ad, mt = _adapter(config), getattr(config, "model_type", None)
    if ad.no_residual is not None:
        raise RotationUnsupported(f"no residual-stream rotation for {mt}: {ad.no_residual}")
    if ad.residual is None:
        raise RotationUnsupported(f"no residual-stream layout for model_type {mt!r} (its adapter "
                                  f"sets no `residual`); known: {', '.join(RESIDUAL)}")
    return ad.residual, make_rotation(int(config.hidden_size), seed, kind)


def untie_embeddings(model: nn.Module) -> int:
    """Give a head that shares the input embedding's tensor its own copy; returns its bytes.

    A residual rotation needs E Q at the input but E diag(g_final) Q at the head (QuaRot,
    arXiv 2404.00456 §4.1, rotates untied models only), and no single tensor is both. The copy is
    a second vocab × hidden matrix at the embedding's dtype, which is real storage: it is a new
    parameter, so `stored_bytes` and checkpoints count it. The config is set untied so that
    nothing re-ties it (transformers' `tie_weights`, the checkpoint's skeleton on reload).
    """
    ad = _adapter(model)
    embed, head = ad.embeddings(model), ad.head(model)
    if head is None or embed is None:
        raise RotationUnsupported("rotating the residual stream needs input embeddings and an "
                                  "LM head")
    added = 0
    if head.weight.data_ptr() == embed.weight.data_ptr():
        w = embed.weight
        head.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        added = head.weight.numel() * head.weight.element_size()
    # Also when the tensors were already separate but the config still said tied: a reload
    # would otherwise tie them again and drop one of the two rotated matrices.
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5 re-ties from this map
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return added


def _rotate_ends(model: nn.Module, rot: Rotation) -> int:
    """Embeddings E ← E Q; the final norm's scale folded into the head, head W ← W Q. A tied
    head is untied first; returns the bytes that added."""
    ad = _adapter(model)
    norm = ad.final_norm(model)
    _check_norm(norm, rot.n, rot)
    added = untie_embeddings(model)
    embed, head = ad.embeddings(model), ad.head(model)
    fold_norm(norm, [head.weight])
    _with(head.weight, rot.apply)
    _with(embed.weight, rot.apply)
    return added


@torch.no_grad()
def rotate_block(block: nn.Module, lay: ResidualLayout, rot: Rotation, path: str,
                 check: bool = False) -> tuple[list[str], torch.Tensor]:
    """One decoder block's share of `rotate_model`, in place. Routed experts still on the meta
    device (a streamed block: they are read a chunk at a time later) are left for
    `rotate_experts`, which needs the MLP norm's scale: returned (hidden,) float64, with the
    rotated paths."""
    found, names = _block_tensors(block, lay, path)
    attn_norm, mlp_norm = _get(block, lay.attn_norm), _get(block, lay.mlp_norm)
    if check:
        _check_norm(attn_norm, rot.n, rot)
    g = mlp_norm.weight.detach().double().clone()
    experts_in, experts_out = [t for t in found["er"] if not t.is_meta], \
        [t for t in found["ew"] if not t.is_meta]
    fold_norm(attn_norm, found["attn"])
    fold_norm(mlp_norm, found["mlp"])
    for w in found["attn"] + found["mlp"]:
        _with(w, rot.apply)  # W ← W Q (last dim is the stream)
    for w in found["w"]:
        _with(w, lambda t: rot.apply(t.T).T)  # W ← Qᵀ W
    for b in found["wb"]:
        _with(b, rot.apply)  # column b ← Qᵀ b is row b ← b Q
    rotate_experts(experts_in, experts_out, g, rot)
    return names, g


@torch.no_grad()
def rotate_experts(gate_up: list[torch.Tensor], down: list[torch.Tensor], g: torch.Tensor,
                   rot: Rotation) -> None:
    """Fused routed-expert tensors (or a chunk of their experts), in place: gate_up (E, 2I, H)
    ← gate_up · diag(g) · Q (they read the MLP norm's output), down (E, H, I) ← Qᵀ · down."""
    for w in gate_up:
        _with(w, lambda t: rot.apply(t * g))
    for w in down:
        _with(w, lambda t: rot.apply(t.transpose(-1, -2)).transpose(-1, -2))


def _rotate_rows_per_head(w: torch.Tensor, rot: Rotation, heads: int, stride: int,
                          offset: int) -> None:
    """Rows [h·stride + offset, h·stride + offset + rot.n) of w (each head's value rows), or the
    same entries of a bias: W_h ← Qᵀ W_h, so that each head's values come out as v_h Q."""
    def fn(t):
        lead = t.shape[1:]
        t = t.reshape(heads, stride, -1).clone()
        v = t[:, offset:offset + rot.n, :]  # (heads, d, in)
        t[:, offset:offset + rot.n, :] = rot.apply(v.transpose(1, 2)).transpose(1, 2)
        return t.reshape(heads * stride, *lead)
    _with(w, fn)


@torch.no_grad()
def rotate_value_path(model: nn.Module, seed: int = 0, kind: str = "hadamard") -> dict:
    """Fused per-head rotation of the attention values and of o_proj's input (QuaRot, arXiv
    2404.00456 §4.1, "W_v and W_out"), zero run-time cost.

    Attention mixes each head's value vectors linearly over positions (A_h v_h), so rotating
    every head's values by one orthogonal Q_d (d = head_dim / v_head_dim), v_h ← v_h Q_d, makes
    the attention output o_h Q_d; o_proj, which reads the concatenated heads, undoes it with
    W_o ← W_o (I_heads ⊗ Q_d). The value rows rotated are v_proj's (Llama/Qwen2: per KV head, so
    grouped-query heads share it) or the value rows of kv_b_proj (MLA: each head's last
    v_head_dim rows). o_proj's input dim becomes incoherent within each head's block; combine
    with an online rotation of o_proj for full-width mixing. Composes with `rotate_model`
    (either order): it touches only value rows and o_proj's input side.
    """
    ad = _adapter(model)
    spec = ValuePath.of(model.config, seed, kind)
    done = []
    for i, block in enumerate(ad.blocks(model)):
        spec.rotate(block, ad.block_name(i))
        done.append(f"{ad.block_name(i)}.{spec.rows.out.rpartition('.')[0]}")
    return {"kind": kind, "seed": seed, "head_dim": spec.rot.n, "construction": spec.rot.describe(),
            "rotated": done, "runtime_bytes": 0}


@dataclass
class ValuePath:
    """One architecture's value rows (`adapter.value_rows`) and the rotation they get (see
    `rotate_value_path`)."""

    rot: Rotation
    rows: ValueRows

    @staticmethod
    def of(cfg, seed: int, kind: str = "hadamard") -> ValuePath:
        rows = _adapter(cfg).value_rows(cfg)
        if rows is None:
            mt = getattr(cfg, "model_type", None)
            raise RotationUnsupported(f"no value-path layout for model_type {mt!r} (its adapter "
                                      f"sets no `value_path`)")
        return ValuePath(make_rotation(rows.width, seed, kind), rows)

    @torch.no_grad()
    def rotate(self, block: nn.Module, path: str) -> None:
        r = self.rows
        vmod, omod = _get(block, r.src), _get(block, r.out)
        if not isinstance(vmod, nn.Linear) or not isinstance(omod, nn.Linear):
            raise RotationUnsupported(f"{path}: expected nn.Linear {r.src} and {r.out} "
                                      f"(rotate before compressing or wrapping them)")
        rot, heads, d = self.rot, r.heads, self.rot.n
        _rotate_rows_per_head(vmod.weight, rot, r.kv_heads, r.stride, r.offset)
        if vmod.bias is not None:
            _rotate_rows_per_head(vmod.bias, rot, r.kv_heads, r.stride, r.offset)
        # o_proj reads (heads, d) blocks: W_o ← W_o (I ⊗ Q_d)
        _with(omod.weight, lambda t: rot.apply(t.reshape(t.shape[0], heads, d)).reshape(t.shape))


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
            raise ValueError("StreamedRotation: nothing to rotate (residual=None, value_path=False)")
        self.adapter = _adapter(config)
        self.lay, self.rot = (_residual_setup(config, seed, residual) if residual is not None
                              else (None, None))
        self.values = ValuePath.of(config, seed) if value_path else None
        self._scales: dict[int, torch.Tensor] = {}
        self.untied_head_bytes = 0

    def ends(self, model: nn.Module) -> None:
        if self.rot is not None:
            self.untied_head_bytes = _rotate_ends(model, self.rot)

    def block(self, i: int, block: nn.Module) -> None:
        path = self.adapter.block_name(i)
        if self.values is not None:
            self.values.rotate(block, path)
        if self.rot is not None:
            _, g = rotate_block(block, self.lay, self.rot, path, check=i == 0)
            if any(_get(block, p) is not None for p in self.lay.expert_readers):
                self._scales[i] = g

    def experts(self, i: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        if self.rot is not None:
            rotate_experts([gate_up], [down], self._scales[i], self.rot)


# ------------------------------------------------------------------------------------------------
# 3. Online rotations (kept at run time)
# ------------------------------------------------------------------------------------------------


class OnlineRotation(nn.Module):
    """x ← x Q at run time with Q a HadamardRotation (QuaRot's online Hadamard, arXiv 2404.00456
    §4.2, used there in front of down_proj).

    Stored (persistent buffers, so `stored_bytes`/checkpoints count them): the sign vector
    (int8, n bytes) and, for a non-power-of-two width, the p×p block (float32; p ≤ 36 for every
    width DeepSeek uses). The Sylvester factors are non-persistent buffers rebuilt from n, like
    rotary tables. Computed in float32 whatever the activation dtype, so the transform adds no
    more rounding than one fp32 product; n·(p + Σ factor widths) multiply-adds per token.
    """

    def __init__(self, n: int, seed: int):
        super().__init__()
        rot = HadamardRotation(n, seed)
        self.n, self.p, self.k, self.kind = n, rot.p, rot.k, rot.kind
        self.register_buffer("signs", rot.signs.clone(), persistent=True)
        if rot.block is not None:
            self.register_buffer("block", rot.block.float(), persistent=True)
        else:
            self.block = None
        self._n_syl = len(rot.factors) - (rot.block is not None)
        for i, f in enumerate(rot.factors[len(rot.factors) - self._n_syl:]):
            self.register_buffer(f"_syl{i}", f.float(), persistent=False)

    def factors(self) -> list[torch.Tensor]:
        syl = [getattr(self, f"_syl{i}") for i in range(self._n_syl)]
        return ([] if self.block is None else [self.block]) + syl

    def rotation(self) -> HadamardRotation:
        """The same Q as a Rotation object (for fusing it offline into the next weight)."""
        r = HadamardRotation.__new__(HadamardRotation)
        r.n, r.p, r.k, r.kind = self.n, self.p, self.k, self.kind
        r.signs = self.signs.cpu()
        r.block = None if self.block is None else self.block.double().cpu()
        r.factors = ([] if r.block is None else [r.block]) + _sylvester_factors(self.k)
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_matmul(x.float() * self.signs.float(), self.factors()).to(x.dtype)

    def nbytes(self) -> int:
        """Stored bytes: the persistent buffers (signs, block), as `stored_bytes` counts them."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                   if not name.startswith("_syl"))

    def extra_repr(self) -> str:
        return f"n={self.n}, {self.kind} p={self.p} k={self.k}, bytes={self.nbytes()}"


class RotatedLinear(nn.Module):
    """linear(rotation(x)): a linear whose input basis is rotated at run time.

    `linear` holds W Q (fused when built by `rotate_linear_input`), so the output is unchanged.
    It is a plain child module: the compression pipeline finds `<name>.linear` as an nn.Linear,
    collects statistics of the rotated inputs on it and may replace it by a CompressedLinear,
    so every stage works in the rotated basis while the rotation stays in front.
    """

    def __init__(self, rotation: OnlineRotation, linear: nn.Module):
        super().__init__()
        self.rotation = rotation
        self.linear = linear

    @property
    def in_features(self) -> int:
        return self.rotation.n

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rotation(x))

    def nbytes(self) -> int:
        inner = self.linear.nbytes() if hasattr(self.linear, "nbytes") else sum(
            t.numel() * t.element_size() for t in (*self.linear.parameters(), *self.linear.buffers()))
        return inner + self.rotation.nbytes()


@torch.no_grad()
def rotate_linear_input(linear: nn.Linear, seed: int) -> RotatedLinear:
    """W ← W Q offline and x ← x Q online: y = (x Q)(W Q)ᵀ = x Wᵀ."""
    rotation = OnlineRotation(linear.in_features, seed).to(linear.weight.device)
    _with(linear.weight, rotation.rotation().apply)
    return RotatedLinear(rotation, linear)


# Where a run-time rotation may go, by site: in front of the MLP's writer(s) or attention's. Each
# adapter's `online_sites` maps a site to its paths.
ONLINE_SITES = ("down_proj", "o_proj")


@dataclass
class OnlineInfo:
    wrapped: list[str] = field(default_factory=list)
    runtime_bytes: int = 0
    skipped: list[str] = field(default_factory=list)


@torch.no_grad()
def add_online_rotations(model: nn.Module, seed: int = 0,
                         sites: tuple[str, ...] = ("down_proj",)) -> dict:
    """Wrap the inputs of the linears at `sites` (ONLINE_SITES; the adapter's `online_sites`
    says where each is) in every block with a run-time randomised Hadamard (a different seed per
    module).

    Routed experts (the adapter's fused experts modules) are listed in `skipped`, not rotated:
    their down projection's input is act(gate)·up computed inside the experts module, so a
    run-time rotation there needs the experts' forward (and the adapter's
    `expert_intermediate`, which calibrates them, and CompressedExperts, which replaces them) to
    apply it.
    Returns {"wrapped": [...], "runtime_bytes": total buffer bytes added, "skipped": [...]}.
    """
    info = OnlineInfo()
    for site in sites:
        if site not in ONLINE_SITES:
            raise ValueError(f"online rotation site must be one of {list(ONLINE_SITES)}, "
                             f"got {site!r}")
    ad = _adapter(model)
    n = 0
    for i, block in enumerate(ad.blocks(model)):
        prefix = ad.block_name(i)
        for site in sites:
            for path in ad.online_sites.get(site, ()):
                lin = _get(block, path)
                if not isinstance(lin, nn.Linear):
                    continue
                n += 1  # each wrapped module its own signs: seeds differ deterministically
                wrapped = rotate_linear_input(lin, seed * 1_000_003 + n)
                parent, _, leaf = path.rpartition(".")
                setattr(_get(block, parent), leaf, wrapped)
                info.wrapped.append(f"{prefix}.{path}")
                info.runtime_bytes += wrapped.rotation.nbytes()
            if site == "down_proj":
                info.skipped += [f"{prefix}.{name}.{ad.expert_projs[-1]}"
                                 for name, mod in block.named_modules()
                                 if ad.is_fused_experts(mod)]
    return {"wrapped": info.wrapped, "runtime_bytes": info.runtime_bytes, "skipped": info.skipped}


@torch.no_grad()
def apply_rotations(model: nn.Module, residual: str | None = "hadamard", value_path: bool = False,
                    online: tuple[str, ...] = (), seed: int = 0) -> dict:
    """Every transform of this file in a fixed order, for a run config to call once after
    loading and before `compress_model`: the value path (needs plain v/o linears), the residual
    stream (`residual`: "hadamard" | "random" | None), then online rotations of `online` sites
    (ONLINE_SITES).

    The model computes the same function afterwards (to fp32 rounding). Returns each
    transform's info, `runtime_bytes`, the stored bytes kept for run-time rotations, and
    `untied_head_bytes`, the head a residual rotation had to untie from the embeddings.
    """
    info: dict = {"runtime_bytes": 0, "untied_head_bytes": 0}
    if value_path:
        info["value_path"] = rotate_value_path(model, seed)
    if residual is not None:
        info["residual"] = rotate_model(model, seed, residual)
        info["untied_head_bytes"] = info["residual"]["untied_head_bytes"]
    if online:
        info["online"] = add_online_rotations(model, seed, tuple(online))
        info["runtime_bytes"] += info["online"]["runtime_bytes"]
    return info
