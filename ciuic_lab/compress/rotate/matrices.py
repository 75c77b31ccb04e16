"""The maths of rotations: Hadamard and orthogonal matrices as `Rotation` objects.

`fwht` (fast Walsh–Hadamard transform, any leading dims), `kron_matmul` (the same transform as a
few small GEMMs, used at run time), Paley Hadamard matrices, `HadamardRotation` (random signs ·
(H_p ⊗ H_2^k) / √n, for any n = p·2^k with a known Hadamard of order p, else a small seeded Haar
block in its place) and `RandomOrthogonal` (dense Haar-random Q, for offline use where speed does
not matter). Pure tensor maths: no modules, no model.

Conventions: activations are row vectors; `Rotation.apply(x)` = x Q and `Rotation.apply_t(x)` =
x Qᵀ on the last dim.
"""

from __future__ import annotations

import math

import torch


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
    a few factors of width ≤ 64, the widest last (see `sylvester_factors`); on CPU this measured
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


def sylvester_factors(k: int, chunk: int = 64, dtype=torch.float64) -> list[torch.Tensor]:
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
        self.factors = ([] if self.block is None else [self.block]) + sylvester_factors(self.k)

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
