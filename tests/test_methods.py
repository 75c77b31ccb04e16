"""Each method's defining property on single layers (pure maths, no model)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ciuic_lab.compress.lowrank.svd import SVD, svd_factors
from ciuic_lab.compress.policies import LayerProfile
from ciuic_lab.compress.policies.rank import rank_for
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.prune.masks import mask_from_scores
from ciuic_lab.compress.quant import grid
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.state import LayerState, rtn_quantize
from ciuic_lab.errors import ConfigError


def _apply(methods, w):
    st_ = LayerState.from_linear(w)
    prof = [LayerProfile("l", "mlp", tuple(w.shape), 0)]
    for m in methods:
        m.apply(st_, None, m.allocate(prof)["l"])
    return st_


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_magnitude_exact_sparsity_and_keeps_largest(sparsity):
    w = torch.randn(64, 96)
    s = _apply([Magnitude(sparsity)], w)
    kept = int(s.mask.sum())
    assert kept == round((1 - sparsity) * w.numel())
    if 0 < kept < w.numel():
        assert w[s.mask].abs().min() >= w[~s.mask].abs().max()
    assert torch.equal(s.base_weight(), w * s.mask)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_pattern_exact(pattern):
    n, m = map(int, pattern.split(":"))
    w = torch.randn(32, 64)
    s = _apply([Magnitude(pattern=pattern)], w)
    assert bool((s.mask.view(32, -1, m).sum(-1) == n).all())
    assert s.info["sparsity"] == pytest.approx(1 - n / m)


def test_nm_needs_divisible_input():
    with pytest.raises(ValueError, match="divisible"):
        mask_from_scores(torch.rand(4, 10), 0.5, (2, 4))


@pytest.mark.parametrize("bad", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"pattern": "4:4"},
                                 {"pattern": "5:4"}, {"pattern": "0:4"}, {"pattern": "dense"},
                                 {"policy": "nope"}])
def test_prune_config_rejected(bad):
    with pytest.raises(ConfigError):
        Magnitude(**bad)


@pytest.mark.parametrize("bad", [{"bits": 1}, {"bits": 9}, {"group_size": 0}, {"group_size": -2}])
def test_quant_config_rejected(bad):
    with pytest.raises(ConfigError):
        RTN(**bad)


def test_svd_is_optimal_rank_r():
    """Eckart–Young: truncated SVD error equals the tail of the spectrum."""
    w = torch.randn(40, 60, dtype=torch.float64).float()
    for r in (1, 5, 20):
        u, v = svd_factors(w, r)
        assert u.shape == (40, r) and v.shape == (r, 60)
        s = torch.linalg.svdvals(w.double())
        err = (w.double() - (u @ v).double()).norm()
        assert err == pytest.approx(s[r:].pow(2).sum().sqrt().item(), rel=1e-4)


def test_rank_rules():
    sv = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert rank_for((4, 4), sv, {"rule": "energy", "energy": 16 / 22}) == 1
    assert rank_for((4, 4), sv, {"rule": "energy", "energy": 0.9}) == 2
    assert rank_for((4, 4), sv, {"rule": "energy", "energy": 1.0}) == 4
    assert rank_for((100, 300), sv, {"rule": "ratio", "ratio": 0.1}) == 7  # 7*(400) <= 3000
    assert rank_for((100, 300), sv, {"rule": "rank", "rank": 500}) == 100


def test_lowrank_factorize_replaces_weight_and_ratio_budget():
    w = torch.randn(64, 128)
    s = _apply([SVD(mode="factorize", ratio=0.25)], w)
    assert s.base is None and s.u.shape[1] == int(0.25 * 64 * 128 // 192)
    assert s.u.numel() + s.v.numel() <= 0.25 * w.numel()


def test_lowrank_residual_corrects_pruning_error():
    w = torch.randn(64, 128)
    pruned = _apply([Magnitude(0.5)], w).reconstruct()
    both = _apply([Magnitude(0.5), SVD(mode="residual", ratio=0.2)], w).reconstruct()
    assert (w - both).norm() < (w - pruned).norm()


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([-1, 16, 32, 48, 100]),
       sym=st.booleans(), cols=st.sampled_from([64, 96, 192, 576 // 4]), seed=st.integers(0, 99))
def test_rtn_codes_in_range_and_error_bounded(bits, group, sym, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, cols, generator=g)
    q = rtn_quantize(w, bits, group, sym)
    assert q.codes.min() >= 0 and q.codes.max() <= 2**bits - 1
    assert q.scale.shape == (8, grid.n_groups(cols, group))  # tail group when cols % group
    step = grid.expand_groups(q.scale, cols, group).abs()  # sym scales carry a sign
    err = (q.dequantize() - w).abs()
    # round-to-nearest: half a step inside the range; the range ends may clip: the full-range
    # sym grid's short side by up to a step, asym zero rounding by half a step
    assert bool((err <= step + 1e-5).all())
    if sym:  # full range: the group's largest-magnitude entry sits exactly on code 0
        g_of = torch.arange(cols) // (cols if group == -1 else group)
        for j in range(int(g_of.max()) + 1):
            cols_j = g_of == j
            worst = w[:, cols_j].abs().argmax(1)
            assert bool((q.codes[:, cols_j].gather(1, worst[:, None]) == 0).all())


def test_rtn_more_bits_less_error_and_8bit_near_exact():
    w = torch.randn(32, 256)
    errs = [(rtn_quantize(w, b, 128, False).dequantize() - w).norm().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] / w.norm().item() < 0.01


def test_quant_with_mask_ignores_pruned_and_keeps_zeros():
    w = torch.randn(16, 64)
    w[:, 0] = 100.0  # pruned outliers must not stretch the grid
    s = _apply([Magnitude(0.5), RTN(4, 32)], w)
    mask = s.mask.clone()
    mask[:, 0] = False
    s.mask = mask
    s2 = LayerState.from_linear(w)
    s2.base, s2.mask = w, mask
    RTN(4, 32).apply(s2, None, 4)
    out = s2.reconstruct()
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert (out - w * mask).abs().max() < 0.5
