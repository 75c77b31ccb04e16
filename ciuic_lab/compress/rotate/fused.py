"""Rotations fused into the weights (offline, zero run-time cost).

`rotate_model`: the residual-stream rotation of Llama, Qwen2, DeepSeek-V2 and DeepSeek-V3,
driven by each architecture's `ResidualLayout` (norm scales folded into their readers, readers
W ← W Q, writers W ← Qᵀ W, embeddings and head rotated). `rotate_value_path`: the per-head
rotation of attention values and of o_proj's input. `rotate_block` / `rotate_ends` /
`rotate_experts` are their parts, which `streamed.StreamedRotation` applies piece by piece.
Where each applies is the adapter's to say (`models/adapters.py`); this file names no module
path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ciuic_lab.compress.rotate.matrices import Rotation, make_rotation
from ciuic_lab.errors import UnsupportedModel
from ciuic_lab.models import adapters
from ciuic_lab.models.adapters import DecoderAdapter, ResidualLayout, ValueRows


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


def rotation_adapter(model_or_config) -> DecoderAdapter:
    try:
        return adapters.adapter_for(model_or_config)
    except UnsupportedModel as e:
        raise RotationUnsupported(str(e)) from e


def get_path(root: nn.Module, path: str):
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


def edit_float64(t: torch.Tensor, fn) -> None:
    """t ← fn(t in float64), in place, keeping t's dtype (float64 so that fusing adds no error
    beyond the final rounding to the model's dtype)."""
    with torch.no_grad():
        t.copy_(fn(t.detach().double()).to(t.dtype))


def fold_norm(norm: nn.Module, readers: list[torch.Tensor]) -> None:
    """RMSNorm scale g into the weights reading its output: W diag(g) (last dim), then g ← 1."""
    g = norm.weight.detach().double()
    for w in readers:
        edit_float64(w, lambda t: t * g)
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
            mod = get_path(block, p)
            if mod is None:
                continue
            found[key].append(mod.weight)
            names.append(p)
            if key == "w" and getattr(mod, "bias", None) is not None:
                found["wb"].append(mod.bias)
    for key, paths in (("er", lay.expert_readers), ("ew", lay.expert_writers)):
        for p in paths:
            t = get_path(block, p)
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
    ad = rotation_adapter(model)
    lay, rot = residual_setup(model.config, seed, kind)
    head_bytes = rotate_ends(model, rot)
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


def residual_setup(config, seed: int, kind: str) -> tuple[ResidualLayout, Rotation]:
    ad, mt = rotation_adapter(config), getattr(config, "model_type", None)
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
    ad = rotation_adapter(model)
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


def rotate_ends(model: nn.Module, rot: Rotation) -> int:
    """Embeddings E ← E Q; the final norm's scale folded into the head, head W ← W Q. A tied
    head is untied first; returns the bytes that added."""
    ad = rotation_adapter(model)
    norm = ad.final_norm(model)
    _check_norm(norm, rot.n, rot)
    added = untie_embeddings(model)
    embed, head = ad.embeddings(model), ad.head(model)
    fold_norm(norm, [head.weight])
    edit_float64(head.weight, rot.apply)
    edit_float64(embed.weight, rot.apply)
    return added


@torch.no_grad()
def rotate_block(block: nn.Module, lay: ResidualLayout, rot: Rotation, path: str,
                 check: bool = False) -> tuple[list[str], torch.Tensor]:
    """One decoder block's share of `rotate_model`, in place. Routed experts still on the meta
    device (a streamed block: they are read a chunk at a time later) are left for
    `rotate_experts`, which needs the MLP norm's scale: returned (hidden,) float64, with the
    rotated paths."""
    found, names = _block_tensors(block, lay, path)
    attn_norm, mlp_norm = get_path(block, lay.attn_norm), get_path(block, lay.mlp_norm)
    if check:
        _check_norm(attn_norm, rot.n, rot)
    g = mlp_norm.weight.detach().double().clone()
    experts_in, experts_out = [t for t in found["er"] if not t.is_meta], \
        [t for t in found["ew"] if not t.is_meta]
    fold_norm(attn_norm, found["attn"])
    fold_norm(mlp_norm, found["mlp"])
    for w in found["attn"] + found["mlp"]:
        edit_float64(w, rot.apply)  # W ← W Q (last dim is the stream)
    for w in found["w"]:
        edit_float64(w, lambda t: rot.apply(t.T).T)  # W ← Qᵀ W
    for b in found["wb"]:
        edit_float64(b, rot.apply)  # column b ← Qᵀ b is row b ← b Q
    rotate_experts(experts_in, experts_out, g, rot)
    return names, g


@torch.no_grad()
def rotate_experts(gate_up: list[torch.Tensor], down: list[torch.Tensor], g: torch.Tensor,
                   rot: Rotation) -> None:
    """Fused routed-expert tensors (or a chunk of their experts), in place: gate_up (E, 2I, H)
    ← gate_up · diag(g) · Q (they read the MLP norm's output), down (E, H, I) ← Qᵀ · down."""
    for w in gate_up:
        edit_float64(w, lambda t: rot.apply(t * g))
    for w in down:
        edit_float64(w, lambda t: rot.apply(t.transpose(-1, -2)).transpose(-1, -2))


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
    edit_float64(w, fn)


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
    ad = rotation_adapter(model)
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
        rows = rotation_adapter(cfg).value_rows(cfg)
        if rows is None:
            mt = getattr(cfg, "model_type", None)
            raise RotationUnsupported(f"no value-path layout for model_type {mt!r} (its adapter "
                                      f"sets no `value_path`)")
        return ValuePath(make_rotation(rows.width, seed, kind), rows)

    @torch.no_grad()
    def rotate(self, block: nn.Module, path: str) -> None:
        r = self.rows
        vmod, omod = get_path(block, r.src), get_path(block, r.out)
        if not isinstance(vmod, nn.Linear) or not isinstance(omod, nn.Linear):
            raise RotationUnsupported(f"{path}: expected nn.Linear {r.src} and {r.out} "
                                      f"(rotate before compressing or wrapping them)")
        rot, heads, d = self.rot, r.heads, self.rot.n
        _rotate_rows_per_head(vmod.weight, rot, r.kv_heads, r.stride, r.offset)
        if vmod.bias is not None:
            _rotate_rows_per_head(vmod.bias, rot, r.kv_heads, r.stride, r.offset)
        # o_proj reads (heads, d) blocks: W_o ← W_o (I ⊗ Q_d)
        edit_float64(omod.weight,
                     lambda t: rot.apply(t.reshape(t.shape[0], heads, d)).reshape(t.shape))
