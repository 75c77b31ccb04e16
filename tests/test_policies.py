"""Policies turn a model-wide target into per-layer budgets and meet it."""

import itertools
import re
from dataclasses import MISSING, fields

import pytest
import torch
import yaml

from ciuic_lab.compress.base import LowRankMethod, PruneMethod, QuantMethod
from ciuic_lab.compress.policies import LayerProfile, get_policy, policy_classes
from ciuic_lab.compress.policies.owl import OWL
from ciuic_lab.compress.policies.rank import greedy_ranks
from ciuic_lab.compress.policies.sensitivity import Sensitivity, allocate_bits, layer_errors
from ciuic_lab.compress.stats import LayerStats
from ciuic_lab.config import CONF_DIR, build_methods, compose
from ciuic_lab.errors import ConfigError


def _profiles(n_blocks=6, shapes=((64, 64), (128, 64), (64, 128))):
    out = []
    for b in range(n_blocks):
        for j, sh in enumerate(shapes):
            out.append(LayerProfile(f"l{b}.{j}", "mlp" if j else "attn", sh, b))
    return out


def _wmean(profiles, alloc):
    tot = sum(p.params for p in profiles)
    return sum(alloc[p.name] * p.params for p in profiles) / tot


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_depth_linear_meets_mean_and_ramps(target):
    ps = _profiles()
    alloc = get_policy("prune", "depth_linear", ramp=0.2).allocate(ps, target)
    assert _wmean(ps, alloc) == pytest.approx(target, abs=1e-6)
    assert alloc["l5.0"] > alloc["l0.0"]
    assert alloc["l5.0"] - alloc["l0.0"] == pytest.approx(0.2, abs=1e-6)


def _with_stats(ps, outlier_block, policy):
    """Run a policy's profile-walk steps on random layers: summarize each, then each block."""
    torch.manual_seed(0)
    weights = {}
    for p in ps:
        w = torch.randn(p.shape)
        st = LayerStats(p.shape[1], hessian=False)
        x = torch.randn(256, p.shape[1])
        if p.block == outlier_block:
            x[:, :3] *= 40  # a few outlier features, as in LLM activations
        st.add_batch(x)
        weights[p.name] = w
        policy.summarize(p.facts.setdefault(policy.stage, {}), w, st)
    for b in {p.block for p in ps}:
        block = [p for p in ps if p.block == b]
        policy.summarize_block({p.name: p.facts[policy.stage] for p in block},
                               lambda block=block: ((p.name, weights[p.name]) for p in block))
    return ps


def test_owl_meets_mean_and_spares_the_outlier_block():
    owl = get_policy("prune", "owl", owl_lambda=0.08, owl_m=5.0)
    ps = _with_stats(_profiles(), outlier_block=2, policy=owl)
    alloc = owl.allocate(ps, 0.7)
    assert _wmean(ps, alloc) == pytest.approx(0.7, abs=1e-6)
    assert alloc["l2.0"] == min(alloc.values())
    assert all(0.7 - 0.08 - 1e-9 <= v <= 0.7 + 0.08 + 1e-9 for v in alloc.values())


def test_greedy_ranks_respects_budget_and_is_optimal_on_small_case():
    torch.manual_seed(0)
    shapes = [(6, 4), (5, 5), (4, 8)]
    spectra = [torch.sort(torch.rand(min(s)) * (i + 1), descending=True).values
               for i, s in enumerate(shapes)]
    budget = 60
    ranks = greedy_ranks(spectra, shapes, budget)
    cost = lambda rs: sum(r * (o + i) for r, (o, i) in zip(rs, shapes))
    gain = lambda rs: sum(float((s[:r] ** 2).sum()) for r, s in zip(rs, spectra))
    assert cost(ranks) <= budget
    best = max((rs for rs in itertools.product(*[range(1, min(s) + 1) for s in shapes])
                if cost(rs) <= budget), key=gain)
    assert gain(ranks) >= 0.97 * gain(best)


def test_owl_ratio_counts_scores_above_m_times_the_block_mean():
    from ciuic_lab.compress.policies.owl import outlier_ratio

    w = [torch.tensor([[1.0, 2.0], [3.0, 30.0]]), torch.tensor([[0.5, 0.5]])]
    a = [torch.ones(2), torch.tensor([2.0, 2.0])]
    # scores 1, 2, 3, 30, 1, 1: mean 38/6, above 2 x mean = 12.67: one of six
    assert outlier_ratio(lambda: zip(w, a), 2.0) == pytest.approx(1 / 6)


def test_global_rank_policy_meets_parameter_budget():
    pol = get_policy("lowrank", "global")
    ps = _with_stats(_profiles(n_blocks=2), outlier_block=0, policy=pol)
    alloc = pol.allocate(ps, {"ratio": 0.2})
    used = sum(alloc[p.name]["rank"] * sum(p.shape) for p in ps)
    total = sum(p.params for p in ps)
    assert 0.18 * total <= used <= 0.2 * total


def test_kind_map():
    ps = _profiles(n_blocks=1)
    alloc = get_policy("quant", "kind_map", kind_bits={"attn": 6}, bits=3).allocate(ps, 4.0)
    assert alloc == {"l0.0": 6, "l0.1": 3, "l0.2": 3}


@pytest.mark.parametrize("target", [3.0, 3.5, 4.25])
def test_sensitivity_meets_mean_bits_and_beats_uniform(target):
    ps = _profiles(n_blocks=4)
    torch.manual_seed(1)
    pol = get_policy("quant", "sensitivity", group_size=32, sym=True, sensitivity="local")
    layers = {}
    for p in ps:
        st = LayerStats(p.shape[1], hessian=True)
        st.add_batch(torch.randn(128, p.shape[1]) * (10 if p.block == 1 else 1))
        layers[p.name] = (torch.randn(p.shape), st)
        pol.summarize(p.facts.setdefault("quant", {}), *layers[p.name])
    alloc = pol.allocate(ps, target)
    assert abs(_wmean(ps, alloc) - target) <= 0.05
    errs = [layer_errors(layers[p.name][0], layers[p.name][1].hessian, None, [2, 3, 4, 5, 6, 8],
                         32, True) for p in ps]
    ours = sum(e[alloc[p.name]] for e, p in zip(errs, ps))
    lo = int(target)
    uniform = sum(e[lo] for e in errs) if target == lo else None
    if uniform is not None:
        assert ours <= uniform
    assert alloc["l1.0"] >= max(alloc[p.name] for p in ps if p.block != 1 and p.shape == (64, 64))


def test_allocate_bits_never_exceeds_budget():
    errs = [{2: 10.0, 4: 1.0, 8: 0.0}, {2: 5.0, 4: 4.0, 8: 3.0}]
    bits = allocate_bits(errs, [100, 100], 3.0)
    assert bits == [4, 2]


def test_uniform_bits_meets_a_fractional_mean():
    ps = _profiles(n_blocks=4)
    alloc = get_policy("quant", "uniform").allocate(ps, 3.5)
    assert set(alloc.values()) == {3, 4}
    assert abs(_wmean(ps, alloc) - 3.5) <= 0.05
    assert set(get_policy("quant", "uniform").allocate(ps, 4.0).values()) == {4}


# ---- policies own their knobs -------------------------------------------------------------------
STAGE_METHODS = {"prune": PruneMethod, "lowrank": LowRankMethod, "quant": QuantMethod}


@pytest.mark.parametrize("overrides,key", [
    (["prune.owl_m=-1"], "prune.owl_m"),
    (["prune.owl_lambda=1.5"], "prune.owl_lambda"),
    (["prune.policy=depth_linear", "prune.ramp=3"], "prune.ramp"),
    (["quant.budget=bogus"], "quant.budget"),
    (["quant.sensitivity=hessian"], "quant.sensitivity"),
    (["quant.candidate_bits=[1,4]"], "quant.candidate_bits"),
    (["quant.candidate_groups=[0]"], "quant.candidate_groups"),
    (["quant.policy=kind_map", "quant.kind_bits={attn:9}"], "quant.kind_bits"),
    # A knob of a policy not in use is checked all the same (recipe=none: uniform everywhere),
    # so a typo fails now rather than on the day the policy is switched on.
    (["recipe=none", "quant.budget=bogus"], "quant.budget"),
    (["recipe=none", "prune.owl_m=0"], "prune.owl_m"),
])
def test_a_bad_policy_knob_fails_naming_its_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: "):
        build_methods(compose(overrides))


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


@pytest.mark.parametrize("stage", list(STAGE_METHODS))
def test_a_policy_knob_default_is_written_once(stage):
    """The policy's dataclass holds each default. The stage's Method declares the key with
    `knob` (taking that default), and conf/<stage>/_common.yaml must list the key for
    `<stage>.<knob>=v` to override it without a `+`: it has to say the same value."""
    common = yaml.safe_load((CONF_DIR / stage / "_common.yaml").read_text())
    method_fields = {f.name: f for f in fields(STAGE_METHODS[stage])}
    for name, cls in policy_classes(stage).items():
        if not cls.__module__.startswith("ciuic_lab."):
            continue  # registered by some other test or script
        for f in fields(cls):
            assert f.name in method_fields, f"{stage}.{f.name} ({name}) is no Method field"
            if f.default is MISSING and f.default_factory is MISSING:
                continue  # the Method's own knob, its default the Method's
            want = _default(f)
            assert _default(method_fields[f.name]) == want, f"{stage}.{f.name}: Method default"
            assert f.name in common, f"{stage}.{f.name} missing from conf/{stage}/_common.yaml"
            assert common[f.name] == want, (f"{stage}.{f.name}: _common.yaml says "
                                            f"{common[f.name]!r}, {cls.__name__} {want!r}")


def test_the_method_builds_its_policy_from_its_own_keys():
    cfg = compose(["prune.owl_m=3", "prune.owl_lambda=0.05", "quant.budget=stored",
                   "quant.group_size=64"])
    prune, quant, _ = build_methods(cfg)
    assert prune.bound_policy == OWL(owl_lambda=0.05, owl_m=3.0)
    assert quant.bound_policy == Sensitivity(group_size=64, sym=True, budget="stored")
    assert get_policy("prune", "owl") == OWL(owl_m=5.0)  # the one default
