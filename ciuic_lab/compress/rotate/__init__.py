"""Incoherence processing: orthogonal rotations that every stage can work under.

Idea (QuIP#, arXiv 2402.04396, §3; QuaRot, arXiv 2404.00456, §4; SpinQuant, arXiv 2405.16406):
a random orthogonal Q spreads any large weight or activation coordinate over all coordinates,
so W Q has no outlier columns ("incoherent"); low-bit grids then waste far less of their range.
Where Q and Qᵀ can be absorbed by the weights on both sides of a tensor, the network computes
exactly the same function and the rotation is free at run time. Where they cannot, Q is applied
to activations at run time, so it must be fast and its stored bytes and time are counted.

The maths:

    matrices  `fwht` (fast Walsh–Hadamard transform, any leading dims), `kron_matmul` (the same
              transform as a few small GEMMs, used at run time), Paley Hadamard matrices,
              `HadamardRotation` (random signs · (H_p ⊗ H_2^k) / √n, for any n = p·2^k with a
              known Hadamard of order p, else a small seeded Haar block in its place) and
              `RandomOrthogonal` (dense Haar-random Q, for offline use where speed does not
              matter).
    fused     `rotate_model`: the fused residual-stream rotation (offline, zero run-time cost)
              for Llama, Qwen2, DeepSeek-V2 and DeepSeek-V3, driven by each architecture's
              `ResidualLayout`. `rotate_value_path`: the fused per-head rotation of attention
              values and o_proj's input.

The run-time parts:

    online    `OnlineRotation` / `RotatedLinear` / `add_online_rotations`: a rotation kept at run
              time in front of a linear (down_proj, o_proj): W ← W Q offline, x ← x Q online;
              its sign vector is a persistent buffer, so model byte counts include it, and its
              FLOPs show up in measured speed.
    streamed  `StreamedRotation`: the fused rotations of a streamed model, part by part.

and here `apply_rotations`, the entry point a run config calls (conf/rotate/).

Where each transform applies is the model's adapter's to say (`models/adapters.py`: its blocks,
ends, `residual` layout or the reason it has none, `value_rows`, `online_sites`); this package
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

import torch
from torch import nn

from ciuic_lab.compress.rotate.fused import rotate_model, rotate_value_path
from ciuic_lab.compress.rotate.online import add_online_rotations


@torch.no_grad()
def apply_rotations(model: nn.Module, residual: str | None = "hadamard", value_path: bool = False,
                    online: tuple[str, ...] = (), seed: int = 0) -> dict:
    """Every transform of this package in a fixed order, for a run config to call once after
    loading and before `compress_model`: the value path (needs plain v/o linears), the residual
    stream (`residual`: "hadamard" | "random" | None), then online rotations of `online` sites
    (`online.ONLINE_SITES`).

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
