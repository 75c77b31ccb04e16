"""The three stage kinds. A method is a per-layer algorithm bound to its config (a dataclass);
its maths lives in pure functions beside it. A stage = method + policy + model-wide goal:

    budgets = method.allocate(profiles)        # the policy: model-wide goal -> per-layer budgets
    method.apply(state, stats, budgets[name])  # one layer, edits its LayerState

Adding a method is one file (a subclass) plus one YAML in conf/<stage>/ whose `_target_` names it.
Configs are checked in __post_init__, before any model is loaded.

A stage's policy knobs (prune.owl_m, quant.budget, ...) are fields here too, so that Hydra and the
config schema see them under the stage's keys; each takes its default from the policy that owns
it (`knob`), and the method hands them to that policy when it builds it (`bound_policy`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from functools import cached_property
from typing import ClassVar

from torch import nn

from ciuic_lab.compress.policies import LayerProfile, Policy, knob, policy_class, policy_classes
from ciuic_lab.compress.policies.depth_linear import DepthLinear
from ciuic_lab.compress.policies.kind_map import KindMap
from ciuic_lab.compress.policies.owl import OWL
from ciuic_lab.compress.policies.sensitivity import Sensitivity
from ciuic_lab.compress.prune.masks import mask_from_scores
from ciuic_lab.compress.state import LayerState, QuantPart, rtn_quantize
from ciuic_lab.compress.stats import LayerStats
from ciuic_lab.errors import check as _check
from ciuic_lab.names import name_matches, pattern_parts

_NM = re.compile(r"^(\d+):(\d+)$")
KERNEL_WIDTHS = (2, 3, 4, 8)  # int4 layout (2..4 bits, codes widened) and int8 (per channel)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    m = _NM.match(str(pattern))
    _check(m is not None, "prune.pattern", f"expected 'unstructured' or 'N:M' (e.g. 2:4), got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    _check(0 < n < mm, "prune.pattern", f"N:M needs 0 < N < M, got {n}:{mm}")
    return n, mm


@dataclass
class Method:
    stage: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # stats: "hessian", "act_norm"
    alone: ClassVar[bool] = False  # True: the run's only stage (a whole-weight baseline)

    def goal(self):
        """The model-wide goal the policy spreads over layers (mean sparsity, rank rule, bits)."""
        raise NotImplementedError

    # ---- the stage's policy -----------------------------------------------------------------
    @cached_property
    def bound_policy(self) -> Policy:
        """The policy `<stage>.policy` names, built from this method's knobs (and so checked).
        Every other policy of the stage whose knobs this method holds is built too, only to
        check them: a bad value fails now, not on the day someone switches policy."""
        chosen = policy_class(self.stage, self.policy)
        for cls in policy_classes(self.stage).values():
            if cls is not chosen and self._holds_knobs(cls):
                self._build_policy(cls)
        return self._build_policy(chosen)

    def _holds_knobs(self, cls: type) -> bool:
        return all(hasattr(self, f.name) for f in fields(cls))

    def _build_policy(self, cls: type) -> Policy:
        # A policy's fields are `<stage>.<field>` config keys, so the method holds them by name.
        missing = [f.name for f in fields(cls) if not hasattr(self, f.name)]
        if missing:
            raise TypeError(f"{type(self).__name__} has no field for {cls.__name__}'s knobs "
                            f"{', '.join(missing)} (declare them with `knob`)")
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    def policy_needs(self) -> frozenset[str]:
        """What the policy reads in the profile walk: "weight", "act_norm", "hessian",
        "output_grad" (the calibration loss's gradient at each layer's output)."""
        return frozenset(self.bound_policy.needs())

    def summarize(self, profile: LayerProfile, weight, stats: LayerStats | None) -> None:
        """Let the policy keep its small fact about one layer (profile walk)."""
        self.bound_policy.summarize(profile.facts.setdefault(self.stage, {}), weight, stats)

    def summarize_block(self, profiles: list[LayerProfile], prefix: str, weights) -> None:
        """Let the policy compare one block's layers; `weights()` yields (name in the block,
        weight) for each of them, as many times as it is called."""
        facts = {p.name[len(prefix) + 1:]: p.facts.setdefault(self.stage, {}) for p in profiles}
        self.bound_policy.summarize_block(facts, weights)

    def allocate(self, profiles: list[LayerProfile]) -> dict[str, object]:
        if not getattr(self, "fuse_siblings", False):
            return self.pin(self.bound_policy.allocate(profiles, self.goal()))
        # One budget per sibling set: the policy sees each set as one layer (its members'
        # parameters, their facts merged by the policy), and every member gets its set's budget.
        sets: dict[str, list[LayerProfile]] = {}
        for p in profiles:
            sets.setdefault(p.sibling or p.name, []).append(p)
        merged = []
        for key, members in sets.items():
            n = sum(m.params for m in members)
            cols = members[0].shape[1]
            facts = [m.facts.get(self.stage, {}) for m in members]
            merged.append(LayerProfile(
                key, members[0].kind, (-(-n // cols), cols), members[0].block,
                {self.stage: self.bound_policy.merge_facts(facts, [m.params for m in members])
                 if len(members) > 1 else facts[0]}))
        by_set = self.bound_policy.allocate(merged, self.goal())
        out = {p.name: by_set[p.sibling or p.name] for p in profiles}
        pinned = self.pin(out)
        for key, members in sets.items():  # a per-layer override must not split a set
            got = {repr(pinned[m.name]) for m in members}
            _check(len(got) == 1, f"{self.stage}.layers",
                   f"with {self.stage}.fuse_siblings=true the layers of {key} are served as one "
                   f"matmul and need one format, but the overrides give them {sorted(got)}")
        return pinned

    # ---- per-layer overrides by name (`<stage>.layers`) -------------------------------------
    # {name pattern: budget}: the first pattern that matches a layer sets its budget after the
    # policy has spread the goal (the other layers keep theirs); null skips this stage there.
    # A pattern is dotted name parts that must appear as a run in the layer's name, each part a
    # shell-style glob: `layers.0` (block 0, not block 10), `down_proj`, `mlp.experts.*.up_proj`.
    def _overrides(self) -> dict:
        return getattr(self, "layers", None) or {}  # a Method subclass may have no `layers`

    def _check_layers(self) -> None:
        for pattern, budget in self._overrides().items():
            _check(bool(pattern_parts(pattern)), f"{self.stage}.layers", f"empty name pattern {pattern!r}")
            if budget is not None:
                self._check_budget(f"{self.stage}.layers[{pattern}]", budget)

    def _check_budget(self, key: str, budget) -> None:
        raise NotImplementedError

    def _budget(self, value):
        return value

    def pin(self, alloc: dict[str, object]) -> dict[str, object]:
        overrides = self._overrides()
        if not overrides:
            return alloc
        out = {}
        for name, budget in alloc.items():
            for pattern, value in overrides.items():
                if name_matches(pattern, name):
                    budget = None if value is None else self._budget(value)
                    break
            out[name] = budget
        return out

    def check_shapes(self, profiles: list[LayerProfile]) -> None:
        """Raise ConfigError if a layer's shape rules this method out (before any calibration)."""
        for pattern in self._overrides():
            _check(any(name_matches(pattern, p.name) for p in profiles), f"{self.stage}.layers",
                   f"{pattern!r} matches no compressible layer (names look like "
                   f"{profiles[0].name if profiles else '?'})")

    def apply(self, state: LayerState, stats: LayerStats | None, budget) -> None:
        raise NotImplementedError

    def _check_hessian_knobs(self) -> None:
        """`percdamp` (and `blocksize` where the method has one) of the Hessian-based methods."""
        if hasattr(self, "blocksize"):
            _check(isinstance(self.blocksize, int) and self.blocksize > 0, f"{self.stage}.blocksize",
                   f"must be a positive integer, got {self.blocksize!r}")
        _check(isinstance(self.percdamp, (int, float)) and 0 <= self.percdamp <= 1,
               f"{self.stage}.percdamp", f"must be in [0, 1], got {self.percdamp!r}")

    def make_layer(self, state: LayerState, dtype) -> nn.Module | None:
        """The module that stores this layer, if this method has its own format (None: the
        packed CompressedLinear built from the state)."""
        return None


@dataclass
class PruneMethod(Method):
    """Sets `state.mask` on the base part. Subclasses implement `scores` or override `apply`."""

    stage: ClassVar[str] = "prune"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    policy: str = "uniform"  # uniform | depth_linear | owl
    ramp: float = knob(DepthLinear, "ramp")
    owl_lambda: float = knob(OWL, "owl_lambda")
    owl_m: float = knob(OWL, "owl_m")
    layers: dict | None = None  # {name pattern: sparsity or null (not pruned)}

    def __post_init__(self):
        _check(isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0,
               "prune.sparsity", f"must be in [0, 1), got {self.sparsity!r}")
        self.nm = parse_pattern(self.pattern)
        self.bound_policy  # noqa: B018 (built now: its knobs are checked before any model loads)
        self._check_layers()

    def _check_budget(self, key: str, budget) -> None:
        _check(not self.nm, key, f"pattern {self.pattern} fixes every layer's sparsity: a layer "
               "can only be left out (null)")
        _check(isinstance(budget, (int, float)) and 0.0 <= budget < 1.0, key,
               f"sparsity must be in [0, 1) or null, got {budget!r}")

    def _budget(self, value):
        return float(value)

    def check_shapes(self, profiles: list[LayerProfile]) -> None:
        super().check_shapes(profiles)
        if not self.nm:
            return
        m = self.nm[1]
        bad = [f"{p.name} (in={p.shape[1]})" for p in profiles if p.shape[1] % m]
        _check(not bad, "prune.pattern", f"{self.pattern} needs every input dim divisible by {m}; "
               f"{len(bad)} layer(s) are not: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")

    def goal(self) -> float:
        # An N:M pattern fixes the sparsity of every layer: 1 - N/M.
        return 1.0 - self.nm[0] / self.nm[1] if self.nm else float(self.sparsity)

    def to_prune(self, state: LayerState):
        """What the mask is chosen for: the weight minus any low-rank part already fitted."""
        lr = state.lowrank_weight()
        return state.weight if lr is None else state.weight - lr

    def apply(self, state: LayerState, stats: LayerStats | None, budget) -> None:
        w = self.to_prune(state)
        mask = mask_from_scores(self.scores(w, stats), float(budget), self.nm)
        state.base, state.mask, state.nm, state.quant = w, mask, self.nm, None
        state.info["sparsity"] = 1.0 - mask.float().mean().item()

    def scores(self, w, stats):
        raise NotImplementedError


@dataclass
class LowRankMethod(Method):
    """Fits `state.u`, `state.v`.

    mode=factorize: W ≈ U·V replaces the layer's weight (its base part is dropped);
    mode=residual:  U·V fits what the other stages so far left out, W − base (put lowrank after
    the stages whose error it should correct, e.g. stages=[prune,quant,lowrank]).
    rule: ratio (kept parameters / dense parameters), energy (kept share of Σσ²), rank (fixed).
    factor_bits: 16 keeps U, V in 16-bit; 2..8 quantises them (RTN, per output row).
    """

    stage: ClassVar[str] = "lowrank"
    mode: str = "residual"
    rule: str = "ratio"
    ratio: float = 0.1
    energy: float = 0.9
    rank: int | None = None
    factor_bits: int = 16
    policy: str = "rank"  # rank: the rule per layer | global: one budget spread by σ² gain
    layers: dict | None = None  # {name pattern: rank or null (no low-rank part)}

    def __post_init__(self):
        _check(self.mode in ("factorize", "residual"), "lowrank.mode",
               f"must be 'factorize' or 'residual', got {self.mode!r}")
        _check(self.rule in ("ratio", "energy", "rank"), "lowrank.rule",
               f"must be one of ratio, energy, rank; got {self.rule!r}")
        _check(0.0 < float(self.ratio) <= 1.0, "lowrank.ratio", f"must be in (0, 1], got {self.ratio}")
        _check(0.0 < float(self.energy) <= 1.0, "lowrank.energy", f"must be in (0, 1], got {self.energy}")
        _check(self.rule != "rank" or (isinstance(self.rank, int) and self.rank > 0), "lowrank.rank",
               f"rule=rank needs a positive integer rank, got {self.rank!r}")
        _check(self.factor_bits == 16 or 2 <= self.factor_bits <= 8, "lowrank.factor_bits",
               f"must be 16 or in 2..8, got {self.factor_bits}")
        self.bound_policy  # noqa: B018 (built now: its knobs are checked before any model loads)
        self._check_layers()

    def _check_budget(self, key: str, budget) -> None:
        _check(isinstance(budget, int) and not isinstance(budget, bool) and budget > 0, key,
               f"rank must be a positive integer or null, got {budget!r}")

    def _budget(self, value):
        return {"rule": "rank", "rank": int(value)}

    def goal(self) -> dict:
        return {"rule": self.rule, "ratio": self.ratio, "energy": self.energy, "rank": self.rank}

    def to_fit(self, state: LayerState):
        if self.mode == "factorize":
            return state.reconstruct()
        return state.weight - state.base_weight()

    def finish(self, state: LayerState, u, v) -> None:
        if self.mode == "factorize":
            state.base, state.mask, state.nm, state.quant = None, None, None, None
        state.u, state.v, state.u_quant, state.v_quant = u, v, None, None
        if self.factor_bits != 16:
            state.u_quant = rtn_quantize(u, self.factor_bits, -1, True)
            state.v_quant = rtn_quantize(v, self.factor_bits, -1, True)
        state.info["rank"] = u.shape[1]


@dataclass
class QuantMethod(Method):
    """Sets `state.quant` (codes of the base part's kept entries), or quantises U, V when a
    factorize stage removed the base part. A layer's budget is its width in bits, or
    {"bits": b, "group_size": g} when the policy also chose its group size."""

    stage: ClassVar[str] = "quant"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    policy: str = "uniform"  # uniform | kind_map | sensitivity
    avg_bits: float | None = None  # mean bits goal of uniform and sensitivity (null = `bits`)
    # `knob` returns a dataclasses.field (a fresh list per instance), which RUF009 cannot see.
    kind_bits: dict | None = knob(KindMap, "kind_bits")  # noqa: RUF009
    candidate_bits: list = knob(Sensitivity, "candidate_bits")  # noqa: RUF009
    candidate_groups: list | None = knob(Sensitivity, "candidate_groups")  # noqa: RUF009
    sensitivity: str = knob(Sensitivity, "sensitivity")
    budget: str = knob(Sensitivity, "budget")
    layers: dict | None = None  # {name pattern: bits or null (kept at the store dtype)}
    # Serving constraints (issue #21): one format per set an engine fuses into one matmul
    # (q/k/v, gate/up, a layer's routed experts: adapter.sibling_set), and only the widths a
    # fast kernel serves: 2/3/4 through the int4 layout, 8 through int8 (per output channel).
    fuse_siblings: bool = False
    kernel_widths: bool = False

    def __post_init__(self):
        _check(isinstance(self.bits, int) and 2 <= self.bits <= 8, "quant.bits",
               f"must be an integer in 2..8, got {self.bits!r}")
        _check(self.avg_bits is None or 2 <= float(self.avg_bits) <= 8, "quant.avg_bits",
               f"must be in [2, 8] or null, got {self.avg_bits!r}")
        _check(isinstance(self.group_size, int) and (self.group_size == -1 or self.group_size > 0),
               "quant.group_size",
               f"must be -1 (per channel) or a positive integer, got {self.group_size!r}")
        for key in ("fuse_siblings", "kernel_widths"):
            _check(isinstance(getattr(self, key), bool), f"quant.{key}",
                   f"must be true or false, got {getattr(self, key)!r}")
        if self.kernel_widths:
            self._check_kernel_widths()
        self.bound_policy  # noqa: B018 (built now: its knobs are checked before any model loads)
        self._check_layers()

    def _check_kernel_widths(self) -> None:
        ok = KERNEL_WIDTHS
        why = "with quant.kernel_widths=true (widths a fast kernel serves: 2, 3, 4, 8)"
        if self.policy == "sensitivity":
            kept = [b for b in self.candidate_bits if b in ok]
            _check(bool(kept), "quant.candidate_bits",
                   f"{why} none of {list(self.candidate_bits)} is left")
            self.candidate_bits = kept
        elif self.policy == "kind_map":
            for kind, b in (self.kind_bits or {}).items():
                _check(b in ok, "quant.kind_bits", f"{kind}: {b} bits is not allowed {why}")
        widths = {self.bits}
        if self.policy == "uniform" and self.avg_bits is not None:
            widths = {math.floor(self.avg_bits), math.ceil(self.avg_bits)}
        for b in widths:
            _check(b in ok or self.policy == "sensitivity",
                   "quant.avg_bits" if self.avg_bits is not None else "quant.bits",
                   f"{b} bits is not allowed {why}")
        for pattern, b in (self.layers or {}).items():
            _check(b is None or b in ok, f"quant.layers[{pattern}]",
                   f"{b} bits is not allowed {why}")

    def _check_budget(self, key: str, budget) -> None:
        _check(isinstance(budget, int) and not isinstance(budget, bool) and 2 <= budget <= 8, key,
               f"bits must be an integer in 2..8 or null, got {budget!r}")

    def _budget(self, value):
        return int(value)

    def goal(self) -> float:
        return float(self.avg_bits if self.avg_bits is not None else self.bits)

    def format_of(self, budget) -> tuple[int, int]:
        """(bits, group size) of a layer's budget."""
        if isinstance(budget, dict):
            bits, group = int(budget["bits"]), int(budget.get("group_size", self.group_size))
        else:
            bits, group = int(budget), self.group_size
        if self.kernel_widths and bits == 8:
            group = -1  # the int8 kernel scales per output channel (fewer stored bits, too)
        return bits, group

    def to_quantize(self, state: LayerState):
        # Keep what a prune stage reconstructed (SparseGPT updates the kept weights); with a
        # low-rank part, the base must carry what U·V does not.
        lr = state.lowrank_weight()
        if lr is None:
            return state.base if state.base is not None else state.weight
        return state.weight - lr

    def apply(self, state: LayerState, stats: LayerStats | None, budget) -> None:
        bits, group = self.format_of(budget)
        if state.base is None:  # factorized layer: the factors are what is stored
            state.u_quant = self.quantize(state.u, None, None, bits, group)
            state.v_quant = self.quantize(state.v, None, None, bits, group)
        else:
            w = self.to_quantize(state)
            state.base = w
            state.quant = self.quantize(w, state.mask, stats, bits, group)
        state.info["bits"] = bits
        state.info["group_size"] = group

    def quantize(self, w, mask, stats: LayerStats | None, bits: int, group_size: int) -> QuantPart:
        raise NotImplementedError
