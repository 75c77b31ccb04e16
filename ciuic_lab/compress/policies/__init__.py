"""Policies turn a model-wide target into per-layer budgets, seeing every layer's profile first.

One file per policy; each registers itself by stage and name with `@register`.
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
    extra: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


def register(stage: str, name: str):
    def deco(cls):
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
