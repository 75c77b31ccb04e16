"""Policies turn a model-wide goal into per-layer budgets, seeing every layer's profile first.

One file per policy; each is a dataclass subclassing `PolicyBase`, registered by stage and name
with `@register`, and provides the `Policy` protocol:

    needs()                   what it reads in the profile walk: "weight", "act_norm", "hessian",
                              "output_grad" (empty: it allocates from shapes alone, and no walk
                              runs for it)
    summarize(facts, weight, stats)             keep a small fact about one layer
    summarize_block(facts_by_layer, weights)    keep a fact comparing a block's layers
    allocate(profiles, goal) -> {layer name: budget}
    merge_facts(facts, params)                  one fact for a set of layers that must share a
                                                budget (`quant.fuse_siblings`)

Its fields are its knobs, each the config key `<stage>.<field>` (prune.owl_m), checked in
`__post_init__` with that key in the message. The stage's Method declares the same keys (so
Hydra and the config schema see them) with `knob(Policy, name)`, which takes the policy's
default, and builds the policy from its own values: a default is written once, on the policy.
A field without a default is the Method's own knob that the policy reads (quant.group_size).

Facts are small (an error per width, a ratio, a spectrum): the walk keeps them for every layer
and drops the statistics they came from, so the profile pass holds one block's statistics at a
time. They live in `profile.facts[stage]`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from importlib import import_module
from typing import ClassVar, Protocol

from ciuic_lab.errors import ConfigError, check

_REGISTRY: dict[tuple[str, str], type[Policy]] = {}
_MODULES = ("uniform", "rank", "depth_linear", "owl", "kind_map", "sensitivity")


@dataclass
class LayerProfile:
    """Cheap facts about one compressible weight, known before the block walk."""

    name: str
    kind: str  # attn | mlp | shared_expert | expert
    shape: tuple[int, int]  # (out, in)
    block: int
    facts: dict = field(default_factory=dict)  # stage -> what that stage's policy kept
    sibling: str | None = None  # the set it is fused with when served (adapter.sibling_set)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


class Policy(Protocol):
    """What a stage's Method calls on its policy, every step of it, in this order."""

    stage: ClassVar[str]

    def needs(self) -> frozenset[str]: ...

    def summarize(self, facts: dict, weight, stats) -> None: ...

    def summarize_block(self, facts_by_layer: dict, weights) -> None: ...

    def allocate(self, profiles: list[LayerProfile], goal) -> dict: ...

    def merge_facts(self, facts: list[dict], params: list[int]) -> dict: ...


@dataclass(kw_only=True)
class PolicyBase:
    """The steps a policy may skip: it needs nothing and keeps no facts. kw_only: knobs with
    defaults and the Method's knobs without them may then come in any order."""

    stage: ClassVar[str] = ""  # set by @register: where its facts live, how its keys are named

    def needs(self) -> frozenset[str]:
        return frozenset()

    def summarize(self, facts: dict, weight, stats) -> None:
        return None

    def summarize_block(self, facts_by_layer: dict, weights) -> None:
        return None

    def allocate(self, profiles: list[LayerProfile], goal) -> dict:
        raise NotImplementedError

    def merge_facts(self, facts: list[dict], params: list[int]) -> dict:
        """The facts of a set of layers that must share one budget (`quant.fuse_siblings`),
        from each member's facts and parameter count."""
        return {}

    def check(self, cond: bool, knob: str, msg: str) -> None:
        """Raise ConfigError naming the knob's config key, `<stage>.<knob>`."""
        check(cond, f"{self.stage}.{knob}", msg)


def is_number(x) -> bool:
    """int or float, not bool (YAML's `true` would otherwise pass as 1)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def register(stage: str, name: str):
    def deco(cls):
        # The Method builds a policy from its fields and calls every step unconditionally.
        if not (is_dataclass(cls) and issubclass(cls, PolicyBase)):
            raise TypeError(f"policy {stage}.{name}: {cls.__name__} must be a dataclass "
                            "subclassing PolicyBase")
        cls.stage = stage
        _REGISTRY[(stage, name)] = cls
        return cls
    return deco


def _load() -> None:
    for mod in _MODULES:
        import_module(f"{__name__}.{mod}")


def policy_class(stage: str, name: str) -> type[PolicyBase]:
    _load()
    if (stage, name) not in _REGISTRY:
        known = sorted(n for s, n in _REGISTRY if s == stage)
        raise ConfigError(f"{stage}.policy: unknown policy {name!r}; known: {', '.join(known)}")
    return _REGISTRY[(stage, name)]


def policy_classes(stage: str) -> dict[str, type[PolicyBase]]:
    """{name: class} of every policy registered for the stage."""
    _load()
    return {n: cls for (s, n), cls in _REGISTRY.items() if s == stage}


def get_policy(stage: str, name: str, **knobs) -> PolicyBase:
    """The policy `<stage>.policy=name` with these knobs (the others at their defaults)."""
    return policy_class(stage, name)(**knobs)


def knob(policy: type, name: str):
    """The field a Method declares for a policy's knob `name`: the config key exists on the
    Method while its default stays the policy's own."""
    f = {f.name: f for f in fields(policy)}[name]
    if f.default_factory is not MISSING:
        return field(default_factory=f.default_factory)
    if f.default is MISSING:
        raise TypeError(f"{policy.__name__}.{name} has no default: it is the Method's own knob")
    return field(default=f.default)
