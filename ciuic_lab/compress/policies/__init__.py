"""Policies turn a model-wide goal into per-layer budgets, seeing every layer's profile first.

One file per policy; each registers itself by stage and name with `@register`. A policy is a
class with

    needs                     what it reads in the profile walk: "weight", "act_norm", "hessian"
                              (empty: it allocates from shapes alone, and no walk runs for it)
    summarize(facts, weight, stats, **knobs)       optional: keep a small fact about one layer
    summarize_block(facts_by_layer, weights, **knobs)   optional: a fact comparing a block's layers
    allocate(profiles, goal, **knobs) -> {layer name: budget}

Facts are small (an error per width, a ratio, a spectrum): the walk keeps them for every layer
and drops the statistics they came from, so the profile pass holds one block's statistics at a
time. They live in `profile.facts[stage]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module

from ciuic_lab.errors import ConfigError

_REGISTRY: dict[tuple[str, str], type] = {}
_MODULES = ("uniform", "rank", "depth_linear", "owl", "kind_map", "sensitivity")


@dataclass
class LayerProfile:
    """Cheap facts about one compressible weight, known before the block walk."""

    name: str
    kind: str  # attn | mlp | shared_expert | expert
    shape: tuple[int, int]  # (out, in)
    block: int
    facts: dict = field(default_factory=dict)  # stage -> what that stage's policy kept

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


def register(stage: str, name: str):
    def deco(cls):
        cls.stage = stage  # where its facts live: profile.facts[stage]
        _REGISTRY[(stage, name)] = cls
        return cls
    return deco


def get_policy(stage: str, name: str):
    for mod in _MODULES:
        import_module(f"{__name__}.{mod}")
    if (stage, name) not in _REGISTRY:
        known = sorted(n for s, n in _REGISTRY if s == stage)
        raise ConfigError(f"{stage}.policy: unknown policy {name!r}; known: {', '.join(known)}")
    return _REGISTRY[(stage, name)]()
