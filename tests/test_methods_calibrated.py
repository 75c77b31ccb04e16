"""Calibration-aware methods (Wanda, SparseGPT, GPTQ, SVD-LLM) on single layers, then in the walk.

Calibration inputs X have correlated columns and a few outlier features, as LLM activations do,
so that using them really matters: each method must beat its data-free counterpart on the output
error ‖(W − Ŵ)X‖ / ‖WX‖. GPTQ and SparseGPT are also checked against a naive sequential OBS
(explicit inverses of the free block, no Cholesky, no lazy batches).
"""

import pytest
import torch

from ciuic_lab.compress.lowrank.svd import SVD
from ciuic_lab.compress.lowrank.svdllm import SVDLLM, whitened_svd, whitening
from ciuic_lab.compress.policies import LayerProfile
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.prune.sparsegpt import SparseGPT, sparsegpt_prune
from ciuic_lab.compress.prune.wanda import Wanda, row_mask_from_scores, wanda_scores
from ciuic_lab.compress.quant import grid
from ciuic_lab.compress.quant.gptq import GPTQ, gptq_quantize
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.state import LayerState, rtn_quantize
from ciuic_lab.compress.stats import LayerStats, relative_error
from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.errors import ConfigError


def calib(seed=0, tokens=512, cols=128, rows=64, dead=()):
    """Weight (rows, cols) and LayerStats of X (tokens, cols): correlated, 4 outlier features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, generator=g) @ mix
    x = x + 0.8 * torch.randn(tokens, 1, generator=g) * torch.randn(1, cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[:4]] *= 15.0
    x[:, list(dead)] = 0.0
    st = LayerStats(cols, hessian=True)
    st.add_batch(x)
    return torch.randn(rows, cols, generator=g), st


@pytest.fixture(scope="module")
def layer():
    return calib()


def run(methods, w, stats):
    s = LayerState.from_linear(w)
    prof = [LayerProfile("l", "mlp", tuple(w.shape), 0)]
    for m in methods:
        m.apply(s, stats, m.allocate(prof)["l"])
    return s


def err(methods, w, stats):
    return relative_error(w, run(methods, w, stats).reconstruct(), stats)


# ---- naive references: sequential OBS with explicit inverses ------------------------------
def _damped(h, percdamp=0.01):
    h = h.double()
    return h + percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def _compensate(W, H, j, target):
    """Fix column j to `target`; the free columns j+1.. take the least-squares optimal update."""
    f = slice(j + 1, W.shape[1])
    if j + 1 < W.shape[1]:
        W[:, f] += (W[:, j] - target)[:, None] * (H[j, f] @ torch.linalg.inv(H[f, f]))[None, :]
    W[:, j] = target


def naive_gptq(w, h, bits, gs, sym, mask=None):
    W, H, (rows, cols) = w.double().clone(), _damped(h), w.shape
    maxq = 2**bits - 1
    scale, zero = grid.fit_grid(w, bits, gs, sym, mask)
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    for j in range(cols):
        g = 0 if gs == -1 else j // gs
        if gs != -1 and j % gs == 0:  # grid fitted on the current weights when a group starts
            m = None if mask is None else mask[:, j:j + gs]
            s, z = grid.fit_grid(W[:, j:j + gs].float(), bits, -1, sym, m)
            scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
        s, z = scale[:, g].double(), zero[:, g].double()
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        if mask is not None:
            q = torch.where(mask[:, j], q, z)
        codes[:, j] = q.int()
        _compensate(W, H, j, (q - z) * s)
    return codes, scale


def naive_sparsegpt(w, h, sparsity, nm, blocksize):
    W, H, (rows, cols) = w.double().clone(), _damped(h), w.shape
    # [H_F⁻¹]_jj over the columns still free when column j is reached
    d2 = torch.stack([torch.linalg.inv(H[k:, k:])[0, 0] for k in range(cols)])
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    kept = 0
    for j in range(cols):
        if nm is None and j % blocksize == 0:
            e = min(j + blocksize, cols)
            sc = (W[:, j:e] ** 2 / d2[j:e]).flatten()
            k = round((1 - sparsity) * rows * e) - kept
            blk = torch.zeros_like(sc, dtype=torch.bool)
            blk[sc.topk(k).indices] = True
            keep[:, j:e], kept = blk.view(rows, -1), kept + k
        if nm is not None and j % nm[1] == 0:
            sc = W[:, j:j + nm[1]] ** 2 / d2[j:j + nm[1]]
            keep[:, j:j + nm[1]].scatter_(1, sc.topk(nm[0], dim=1).indices, True)
        _compensate(W, H, j, W[:, j] * keep[:, j])
    return W.float(), keep


# ---- Wanda ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_wanda_keeps_top_scores_of_every_row(layer, sparsity):
    w, st = layer
    s = run([Wanda(sparsity)], w, st)
    score = wanda_scores(w, st.act_norm)
    assert bool((s.mask.sum(1) == round((1 - sparsity) * w.shape[1])).all())
    for r in range(w.shape[0]):
        assert score[r][s.mask[r]].min() >= score[r][~s.mask[r]].max()
    assert torch.equal(s.base_weight(), w * s.mask)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_wanda_nm_keeps_top_scores_of_every_group(layer, pattern):
    w, st = layer
    n, m = map(int, pattern.split(":"))
    s = run([Wanda(pattern=pattern)], w, st)
    sc = wanda_scores(w, st.act_norm).view(w.shape[0], -1, m)
    mk = s.mask.view(w.shape[0], -1, m)
    assert bool((mk.sum(-1) == n).all())
    kept_min = sc.masked_fill(~mk, float("inf")).amin(-1)
    pruned_max = sc.masked_fill(mk, float("-inf")).amax(-1)
    assert bool((kept_min >= pruned_max).all())


def test_row_mask_differs_from_layer_mask():
    """Per-row comparison: a row of tiny weights still keeps its share."""
    sc = torch.cat([torch.full((1, 8), 0.01), torch.ones(1, 8)])
    assert row_mask_from_scores(sc, 0.5).sum(1).tolist() == [4, 4]


# ---- SparseGPT --------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity,blocksize", [(0.3, 128), (0.5, 48), (0.77, 32)])
def test_sparsegpt_exact_sparsity_and_zeros(layer, sparsity, blocksize):
    w, st = layer
    s = run([SparseGPT(sparsity, blocksize=blocksize)], w, st)
    assert int(s.mask.sum()) == round((1 - sparsity) * w.numel())
    assert bool((s.base[~s.mask] == 0).all())
    assert s.info["sparsity"] == pytest.approx(sparsity, abs=1e-3)


@pytest.mark.parametrize("pattern,blocksize", [("2:4", 128), ("4:8", 30), ("1:4", 6)])
def test_sparsegpt_nm_pattern_exact(layer, pattern, blocksize):
    w, st = layer
    n, m = map(int, pattern.split(":"))
    s = run([SparseGPT(pattern=pattern, blocksize=blocksize)], w, st)
    assert bool((s.mask.view(w.shape[0], -1, m).sum(-1) == n).all())
    assert bool((s.base[~s.mask] == 0).all())


@pytest.mark.parametrize("sparsity,nm,blocksize", [(0.5, None, 8), (0.3, None, 10), (0.5, (2, 4), 8),
                                                   (0.5, (2, 4), 128)])
def test_sparsegpt_equals_naive_sequential_obs(sparsity, nm, blocksize):
    w, st = calib(seed=3, tokens=200, cols=24, rows=8)
    ref_w, ref_keep = naive_sparsegpt(w, st.hessian, sparsity, nm, blocksize)
    got_w, got_keep = sparsegpt_prune(w, st.hessian, sparsity, nm, blocksize)
    assert torch.equal(got_keep, ref_keep)
    assert torch.allclose(got_w, ref_w, atol=1e-4, rtol=1e-4)


def test_sparsegpt_prunes_dead_inputs_first():
    w, st = calib(dead=(5, 77))
    s = run([SparseGPT(0.5)], w, st)
    assert not bool(s.mask[:, [5, 77]].any())
    assert bool(torch.isfinite(s.base).all())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_calibrated_pruning_beats_magnitude(layer, pattern):
    w, st = layer
    mag = err([Magnitude(0.5, pattern=pattern)], w, st)
    wanda = err([Wanda(0.5, pattern=pattern)], w, st)
    sgpt = err([SparseGPT(0.5, pattern=pattern)], w, st)
    assert wanda < 0.9 * mag and sgpt < 0.9 * mag
    assert sgpt < wanda  # the weight update is worth having


# ---- GPTQ -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gs", [-1, 8, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_gptq_equals_naive_sequential_obs(gs, masked):
    """Codes and on-the-fly grids equal a column-by-column OBS with explicit inverses, for any
    blocksize (groups of 5 straddle blocks of 7), with and without a mask."""
    w, st = calib(seed=1, tokens=200, cols=24, rows=8)
    mask = (torch.rand(8, 24, generator=torch.Generator().manual_seed(0)) > 0.5) if masked else None
    ref_codes, ref_scale = naive_gptq(w, st.hessian, 3, gs, False, mask)
    for bs in (1, 7, 128):
        q = gptq_quantize(w, st.hessian, 3, gs, False, mask, blocksize=bs)
        assert torch.equal(q.codes, ref_codes), bs
        assert torch.equal(q.scale, ref_scale), bs


@pytest.mark.parametrize("gs", [32, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_is_rtn_when_inputs_are_uncorrelated(gs, sym):
    """With H ∝ I there is nothing to feed the error into: GPTQ reduces to round-to-nearest."""
    w = torch.randn(16, 64)
    st = LayerStats(64, hessian=True)
    st.add_batch(torch.eye(64) * 3.0)
    rtn = rtn_quantize(w, 3, gs, sym)
    for act_order in (False, True):
        q = gptq_quantize(w, st.hessian, 3, gs, sym, act_order=act_order)
        assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scale, rtn.scale)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("gs", [32, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(layer, bits, gs, act_order):
    w, st = layer
    rtn = err([RTN(bits, gs)], w, st)
    gptq = err([GPTQ(bits, gs, act_order=act_order)], w, st)
    assert gptq < 0.9 * rtn


def test_gptq_act_order_static_groups_in_original_order(layer):
    """act_order keeps the packed layout: grids per contiguous group, fitted on the original
    weights; codes in the original column order (packing round-trips the same weight)."""
    w, st = layer
    w = w[:, :120]  # tail group of 24 columns
    st2 = LayerStats(120, hessian=True)
    st2.hessian = st.hessian[:120, :120].clone()
    q = gptq_quantize(w, st2.hessian, 4, 32, False, act_order=True)
    scale, zero = grid.fit_grid(w, 4, 32, False)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
    assert q.codes.shape == (64, 120) and q.scale.shape == (64, 4)
    s = LayerState.from_linear(w)
    s.quant = q
    packed = CompressedLinear.pack(s)
    assert torch.equal(packed.dequantized_weight(), q.dequantize())
    assert relative_error(w, q.dequantize(), st2) < relative_error(
        w, rtn_quantize(w, 4, 32, False).dequantize(), st2)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_gptq_any_bits_with_tail_group(bits):
    w, st = calib(seed=2, tokens=256, cols=96, rows=16)
    q = gptq_quantize(w, st.hessian, bits, 40, True)
    assert q.codes.min() >= 0 and q.codes.max() <= 2**bits - 1
    assert q.scale.shape == (16, 3)
    e = relative_error(w, q.dequantize(), st)
    assert e < relative_error(w, rtn_quantize(w, bits, 40, True).dequantize(), st)
    assert e < {2: 0.8, 5: 0.05, 8: 0.006}[bits]


@pytest.mark.parametrize("prune", [Magnitude(0.5), Wanda(0.5), SparseGPT(0.5), SparseGPT(pattern="2:4")])
@pytest.mark.parametrize("gs", [32, -1])
def test_gptq_on_mask_keeps_zeros_and_beats_rtn_on_mask(layer, prune, gs):
    w, st = layer
    s = run([prune, GPTQ(4, gs)], w, st)
    out = s.reconstruct()
    assert torch.equal(out[~s.mask], torch.zeros_like(out[~s.mask]))
    packed = CompressedLinear.pack(s)
    assert torch.equal(packed.dequantized_weight(), out)
    # RTN after SparseGPT already quantises SparseGPT's reconstructed weights, so the margin
    # there is smaller than after data-free masks.
    margin = 1.0 if isinstance(prune, SparseGPT) else 0.95
    assert relative_error(w, out, st) < margin * err([prune, RTN(4, gs)], w, st)


def test_gptq_on_factorized_layer_quantises_both_factors(layer):
    w, st = layer
    lr = SVDLLM(mode="factorize", rule="rank", rank=32)
    s = run([lr, GPTQ(3, 32)], w, st)
    assert s.base is None and s.u_quant is not None and s.v_quant is not None
    fp = relative_error(w, run([lr], w, st).reconstruct(), st)
    gptq, rtn = relative_error(w, s.reconstruct(), st), err([lr, RTN(3, 32)], w, st)
    assert fp < gptq < rtn


def test_dead_inputs_are_handled():
    w, st = calib(dead=(0, 64, 127))
    for methods in ([GPTQ(4, 32, act_order=True)], [SparseGPT(pattern="2:4"), GPTQ(3, -1)],
                    [SVDLLM(mode="factorize", rule="rank", rank=16)]):
        out = run(methods, w, st).reconstruct()
        assert bool(torch.isfinite(out).all())


# ---- SVD-LLM ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [8, 16, 32])
def test_whitened_svd_beats_plain_svd(layer, rank):
    w, st = layer
    plain = err([SVD(mode="factorize", rule="rank", rank=rank)], w, st)
    white = err([SVDLLM(mode="factorize", rule="rank", rank=rank)], w, st)
    assert white < 0.8 * plain


def test_whitened_error_is_the_truncated_spectrum(layer):
    """Eckart–Young in the whitened space: ‖(W − U'V')S‖ = √Σ_{i≥r} σ_i(WS)²."""
    w, st = layer
    s_fac = whitening(st.hessian, 0.01)
    _, sv, _ = whitened_svd(w, s_fac)
    for r in (4, 20):
        s = run([SVDLLM(mode="factorize", rule="rank", rank=r)], w, st)
        got = ((w.double() - s.reconstruct().double()) @ s_fac).norm()
        assert got.item() == pytest.approx(sv[r:].pow(2).sum().sqrt().item(), rel=1e-3)


def test_svdllm_residual_corrects_pruning_error_better(layer):
    w, st = layer
    plain = err([Magnitude(0.5), SVD(mode="residual", ratio=0.2)], w, st)
    white = err([Magnitude(0.5), SVDLLM(mode="residual", ratio=0.2)], w, st)
    assert white < plain < err([Magnitude(0.5)], w, st)


def test_svdllm_rank_rules_and_factor_bits(layer):
    w, st = layer
    s = run([SVDLLM(mode="factorize", ratio=0.25)], w, st)
    assert s.u.shape[1] == int(0.25 * 64 * 128 // 192)
    s = run([SVDLLM(mode="factorize", rule="energy", energy=0.9, factor_bits=4)], w, st)
    _, sv, _ = whitened_svd(w, whitening(st.hessian, 0.01))
    share = sv.pow(2).cumsum(0) / sv.pow(2).sum()
    r = s.u.shape[1]
    assert share[r - 1] >= 0.9 - 1e-9 and (r == 1 or share[r - 2] < 0.9)
    assert s.u_quant is not None and s.u_quant.bits == 4


# ---- config and errors --------------------------------------------------------------------------
@pytest.mark.parametrize("override,cls", [("prune=wanda", Wanda), ("prune=sparsegpt", SparseGPT),
                                          ("quant=gptq", GPTQ), ("lowrank=svdllm", SVDLLM)])
def test_yaml_composes(override, cls):
    from ciuic_lab.config import build_methods, compose

    stages = build_methods(compose([override]))
    assert any(type(m) is cls for m in stages)


@pytest.mark.parametrize("cls,bad", [(GPTQ, {"blocksize": 0}), (GPTQ, {"percdamp": -0.1}),
                                     (GPTQ, {"act_order": "yes"}), (SparseGPT, {"blocksize": -4}),
                                     (SparseGPT, {"percdamp": 2.0}), (SVDLLM, {"percdamp": -1})])
def test_bad_values_rejected(cls, bad):
    with pytest.raises(ConfigError):
        cls(**bad)


@pytest.mark.parametrize("method", [Wanda(), SparseGPT(), GPTQ(), SVDLLM()])
def test_missing_statistics_is_an_error(method):
    with pytest.raises(ValueError, match="needs"):
        run([method], torch.randn(8, 16), None)


def test_needs_declared():
    assert Wanda.needs == {"act_norm"}
    assert SparseGPT.needs == GPTQ.needs == SVDLLM.needs == {"hessian"}


# ---- in the block walk ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch,stages", [
    ("tiny-random-llama", lambda: [SparseGPT(0.5), GPTQ(4, 32)]),
    ("tiny-random-llama", lambda: [Wanda(pattern="2:4"), SVDLLM(ratio=0.1), GPTQ(3, -1, act_order=True)]),
    ("tiny-random-deepseek-v3", lambda: [SparseGPT(pattern="2:4"), GPTQ(4, 32, sym=False)]),
])
def test_pipeline_smoke(arch, stages):
    from ciuic_lab.compress.walk.pipeline import compress_model
    from ciuic_lab.models import tiny

    model = tiny.build(arch, vocab=256)
    windows = torch.randint(0, 256, (4, 32))
    report = compress_model(model, windows, stages(), batch_size=2, progress=False)
    assert report.layers and all(r["sparsity"] == pytest.approx(0.5, abs=0.01)
                                 for r in report.layers)
    assert all(r["rel_error"] < 0.9 for r in report.layers)
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (2, 16))).logits
    assert bool(torch.isfinite(logits).all())
