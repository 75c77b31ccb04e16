"""What the pipeline may compress in each supported architecture, and how it sees their inputs.

One rule for every decoder: the blocks are `model.model.layers`; inside a block every nn.Linear
is a target except routers (`mlp.gate`: compressing it changes which experts run), and every
routed expert of a fused experts module (transformers 5 stores DeepSeek-V2/V3 experts as 3-D
parameters `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)) gives two targets per expert,
each an (out, in) slice. Norms and the router's correction bias are never targets. Embeddings and
the LM head sit outside the blocks and stay dense.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("deepseek_v3", "deepseek_v2", "llama", "qwen2")
ROUTER_NAMES = ("gate",)  # last path component of MoE routers, e.g. `mlp.gate`
EXPERT_PROJS = ("gate_up_proj", "down_proj")


class UnsupportedModel(ValueError):
    pass


def check_supported(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED:
        raise UnsupportedModel(
            f"model_type {mt!r} is not supported; supported architectures: {', '.join(SUPPORTED)}")


def blocks(model: nn.Module) -> nn.ModuleList:
    check_supported(model.config)
    return model.model.layers


def linear_kind(name: str) -> str:
    if "self_attn" in name:
        return "attn"
    if "shared_expert" in name:
        return "shared_expert"
    if "experts" in name:
        return "expert"
    return "mlp"


def is_fused_experts(mod: nn.Module) -> bool:
    return all(isinstance(getattr(mod, p, None), nn.Parameter) and getattr(mod, p).dim() == 3
               for p in EXPERT_PROJS)


@dataclass
class Target:
    """One compressible (out, in) weight: a linear, or one projection of one routed expert."""

    name: str  # path below the root it was found in, e.g. "mlp.experts.3.down_proj"
    kind: str
    module: nn.Module  # the nn.Linear, or the fused experts module holding the slice
    expert: int | None = None
    proj: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        if self.expert is None:
            return self.module.weight
        return getattr(self.module, self.proj)[self.expert]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias if self.expert is None else None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


def targets(block: nn.Module) -> list[Target]:
    """Every target of one decoder block, in module order."""
    out = []
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] not in ROUTER_NAMES:
            out.append(Target(name, linear_kind(name), mod))
        elif is_fused_experts(mod):
            for e in range(getattr(mod, EXPERT_PROJS[0]).shape[0]):
                for proj in EXPERT_PROJS:
                    out.append(Target(f"{name}.{e}.{proj}", "expert", mod, e, proj))
    return out


def _experts_call(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs[n] for n in names[len(args):]]
    return vals[0], vals[1]


@contextmanager
def collect_stats(tlist: list[Target], stats: dict, keep_moe_inputs: dict | None = None):
    """Hooks that feed `stats[target.name].add_batch(inputs)` while the caller runs forwards.

    Routed experts see only the tokens the router sends them (top-k), and their down projection
    sees act(gate)·up of those tokens computed from the current expert weights.
    `keep_moe_inputs[module]` collects every token entering each experts module (for fallbacks).
    """
    handles = []
    experts_mods: dict[int, tuple[nn.Module, list[Target]]] = {}
    for t in tlist:
        if t.expert is None:
            handles.append(t.module.register_forward_hook(
                lambda _m, args, _o, s=stats[t.name]: s.add_batch(args[0])))
        else:
            experts_mods.setdefault(id(t.module), (t.module, []))[1].append(t)

    for mod, ts in experts_mods.values():
        by_expert: dict[int, dict[str, Target]] = {}
        for t in ts:
            by_expert.setdefault(t.expert, {})[t.proj] = t

        def hook(m, args, kwargs, _out, by_expert=by_expert):
            hidden, top_k_index = _experts_call(args, kwargs)
            if keep_moe_inputs is not None:
                keep_moe_inputs.setdefault(m, []).append(hidden.detach())
            for e, projs in by_expert.items():
                tok = (top_k_index == e).any(-1).nonzero().squeeze(-1)
                x = hidden[tok]
                stats[projs["gate_up_proj"].name].add_batch(x)
                stats[projs["down_proj"].name].add_batch(expert_intermediate(m, e, x))

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def expert_intermediate(mod: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """act(x·W_gateᵀ) ⊙ (x·W_upᵀ): the input of expert e's down projection."""
    gate, up = F.linear(x, mod.gate_up_proj[e].to(x.dtype)).chunk(2, dim=-1)
    return mod.act_fn(gate) * up
