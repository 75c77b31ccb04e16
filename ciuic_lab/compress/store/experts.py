"""CompressedExperts: routed experts of a MoE layer, each projection a packed CompressedLinear.

Replaces a fused experts module (3-D `gate_up_proj`, `down_proj`: the adapter's `expert_projs`)
after compression. Expert e's projections live at `<experts>.<e>.<proj>`, the fused parameters'
names, as the report names them. The routing inputs are unchanged (the router stays dense), and
the forward is the eager per-expert loop of transformers' DeepSeek experts running the adapter's
`expert_mlp` on the packed layers, so outputs equal a dense model holding the dequantised experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.models.adapters import DecoderAdapter


class _Expert(nn.Module):
    def __init__(self, projs: dict[str, CompressedLinear]):
        super().__init__()
        for name, mod in projs.items():  # e.g. gate_up_proj (2I, H), down_proj (H, I)
            self.add_module(name, mod)


class CompressedExperts(nn.Module):
    """Built by `DecoderAdapter.install`, which passes itself: the projections' names and the
    expert MLP are the adapter's (the default adapter's when built by hand)."""

    def __init__(self, gate_up: list[CompressedLinear], down: list[CompressedLinear], act_fn,
                 adapter: DecoderAdapter | None = None):
        super().__init__()
        self.adapter = adapter if adapter is not None else DecoderAdapter()
        self.num_experts = len(gate_up)
        first, second = self.adapter.expert_projs
        for e, (gu, d) in enumerate(zip(gate_up, down)):
            self.add_module(str(e), _Expert({first: gu, second: d}))
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return route(hidden_states, top_k_index, top_k_weights, self.num_experts, self._expert)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        expert = getattr(self, str(e))
        first, second = self.adapter.expert_projs
        return self.adapter.expert_mlp(x, getattr(expert, first), getattr(expert, second),
                                       self.act_fn)


def route(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
          num_experts: int, expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The eager per-expert loop of transformers' DeepSeek experts: each chosen expert e runs
    `expert(e, its tokens (t, H))` and adds its routing-weighted output, in ascending e (the
    order fixes the float sums, so outputs match the dense module's). Indices outside
    [0, num_experts) (another rank's experts) are skipped."""
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique().tolist():
        if not 0 <= e < num_experts:
            continue
        token_idx, k_pos = torch.where(top_k_index == e)
        y = expert(e, hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out
