"""Rotations kept at run time: `OnlineRotation` (x ← x Q, a randomised Hadamard as a module),
`RotatedLinear` (a linear behind one) and `add_online_rotations` (wrap the linears at the
adapter's `online_sites`). Their sign vectors are persistent buffers, so byte counts include
them, and their FLOPs show up in measured speed. Routed experts' down projections get none (see
`add_online_rotations`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ciuic_lab.compress.rotate.fused import edit_float64, get_path, rotation_adapter
from ciuic_lab.compress.rotate.matrices import HadamardRotation, kron_matmul, sylvester_factors


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
        r.factors = ([] if r.block is None else [r.block]) + sylvester_factors(self.k)
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
            t.numel() * t.element_size()
            for t in (*self.linear.parameters(), *self.linear.buffers()))
        return inner + self.rotation.nbytes()


@torch.no_grad()
def rotate_linear_input(linear: nn.Linear, seed: int) -> RotatedLinear:
    """W ← W Q offline and x ← x Q online: y = (x Q)(W Q)ᵀ = x Wᵀ."""
    rotation = OnlineRotation(linear.in_features, seed).to(linear.weight.device)
    edit_float64(linear.weight, rotation.rotation().apply)
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
    ad = rotation_adapter(model)
    n = 0
    for i, block in enumerate(ad.blocks(model)):
        prefix = ad.block_name(i)
        for site in sites:
            for path in ad.online_sites.get(site, ()):
                lin = get_path(block, path)
                if not isinstance(lin, nn.Linear):
                    continue
                n += 1  # each wrapped module its own signs: seeds differ deterministically
                wrapped = rotate_linear_input(lin, seed * 1_000_003 + n)
                parent, _, leaf = path.rpartition(".")
                setattr(get_path(block, parent), leaf, wrapped)
                info.wrapped.append(f"{prefix}.{path}")
                info.runtime_bytes += wrapped.rotation.nbytes()
            if site == "down_proj":
                info.skipped += [f"{prefix}.{name}.{ad.expert_projs[-1]}"
                                 for name, mod in block.named_modules()
                                 if ad.is_fused_experts(mod)]
    return {"wrapped": info.wrapped, "runtime_bytes": info.runtime_bytes, "skipped": info.skipped}
