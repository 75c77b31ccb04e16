"""Joint refinement of sparse/quantised and low-rank parts (OATS arXiv 2409.13652, SLiM arXiv
2410.09615): on single layers with correlated calibration inputs, then as a stage in the walk."""

import itertools

import pytest
import torch

from ciuic_lab.compress.lowrank.alternating import (
    AlternatingRefine,
    alternate,
    base_step,
    output_error,
)
from ciuic_lab.compress.lowrank.svdllm import SVDLLM
from ciuic_lab.compress.policies import LayerProfile
from ciuic_lab.compress.prune.sparsegpt import SparseGPT
from ciuic_lab.compress.prune.wanda import Wanda
from ciuic_lab.compress.quant.gptq import GPTQ
from ciuic_lab.compress.stats import LayerStats, relative_error
from ciuic_lab.compress.store.linear import CompressedLinear, LayerState
from ciuic_lab.errors import ConfigError


def calib(seed=0, tokens=1024, cols=128, rows=96):
    """Weight and LayerStats of inputs with correlated columns and a few outlier features,
    like LLM activations (the generator of test_methods_calibrated, at another size)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, generator=g) @ mix
    x = x + 0.8 * torch.randn(tokens, 1, generator=g) * torch.randn(1, cols, generator=g)
    x[:, torch.randperm(cols, generator=g)[:4]] *= 15.0
    st = LayerStats(cols, hessian=True)
    st.add_batch(x)
    return torch.randn(rows, cols, generator=g), st


@pytest.fixture(scope="module")
def layer():
    return calib()


def one_pass(w, st, sparsity, bits, rank, factor_bits=16, pattern="unstructured", prune=SparseGPT):
    """The pipeline's prune → quant → SVD-LLM residual on one layer, as the walk applies it."""
    methods = []
    if sparsity or pattern != "unstructured":
        methods.append(prune(sparsity, pattern=pattern))
    if bits:
        methods.append(GPTQ(bits, 128))
    methods.append(SVDLLM(mode="residual", rule="rank", rank=rank, factor_bits=factor_bits))
    s = LayerState.from_linear(w)
    prof = [LayerProfile("l", "mlp", tuple(w.shape), 0)]
    for m in methods:
        m.apply(s, st, m.allocate(prof)["l"])
    return s


CASES = [  # (sparsity, bits, rank, factor_bits, N:M)
    (0.5, 3, 8, 16, None),  # the ciuic composition
    (0.5, 3, 4, 8, None),  # ... with 8-bit factors, as the recipe stores them
    (0.5, None, 16, 16, None),  # OATS: sparse + low rank
    (0.0, 2, 8, 16, None),  # quantisation + low rank only
    (0.5, 4, 8, 16, (2, 4)),  # 2:4
]


@pytest.mark.parametrize("sparsity,bits,rank,fb,nm", CASES)
def test_iteration_zero_is_the_one_pass_pipeline(layer, sparsity, bits, rank, fb, nm):
    w, st = layer
    pattern = "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"
    ref = relative_error(w, one_pass(w, st, sparsity, bits, rank, fb, pattern).reconstruct(), st)
    res = alternate(w, st.hessian, sparsity, bits, 128, rank, iters=0, nm=nm, factor_bits=fb)
    assert res.errors["onepass"][0] == pytest.approx(ref, rel=1e-4)
    assert res.best == ("onepass", 0)


@pytest.mark.parametrize("sparsity,bits,rank,fb,nm", CASES)
def test_refined_error_below_one_pass_at_the_same_budget(layer, sparsity, bits, rank, fb, nm):
    w, st = layer
    res = alternate(w, st.hessian, sparsity, bits, 128, rank, iters=3, nm=nm, factor_bits=fb)
    first = res.errors["onepass"][0]
    # the returned parts really have the reported error (the best iterate is what comes back)
    got = (output_error(w, res.reconstruct(), st.hessian)
           / output_error(w, torch.zeros_like(w), st.hessian)) ** 0.5
    assert got == pytest.approx(res.best_error, rel=1e-6)
    assert res.best_error == min(e for errs in res.errors.values() for e in errs)
    assert res.best_error < 0.95 * first, res.errors
    # the same stored budget: kept count / N:M, bits, grid, rank
    if sparsity or nm:
        assert int(res.base.mask.sum()) == round((1 - (0.5 if nm else sparsity)) * w.numel())
        assert bool((res.base.dense[~res.base.mask] == 0).all())
    if nm:
        assert bool((res.base.mask.view(w.shape[0], -1, nm[1]).sum(-1) == nm[0]).all())
    if bits:
        assert res.base.quant.bits == bits and res.base.quant.group_size == 128
    assert res.lowrank.u.shape[1] == rank
    assert (res.lowrank.u_quant is not None) == (fb != 16)


def test_chains_do_not_get_worse_where_they_should_improve(layer):
    """With pruning, each alternation from the one-pass start lowers the error here (the
    monotone case of block-coordinate descent); the best-iterate rule covers the others."""
    w, st = layer
    res = alternate(w, st.hessian, 0.5, None, 128, 16, iters=4, start="onepass", patience=0)
    e = res.errors["onepass"]
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(e)), e


def test_quantisation_alone_from_one_pass_is_the_failure_case(layer):
    """Documented behaviour: without pruning, alternating from the one-pass start makes the
    error grow; the L-first start does not, and the best iterate is never the worse one."""
    w, st = layer
    res = alternate(w, st.hessian, 0.0, 2, 128, 8, iters=3, start="both", patience=0)
    assert res.errors["onepass"][-1] > res.errors["onepass"][0]
    assert res.errors["lowrank"][-1] < res.errors["onepass"][0]
    assert res.best[0] == "lowrank"


def test_a_start_that_never_improves_returns_the_one_pass_result(layer):
    w, st = layer
    res = alternate(w, st.hessian, 0.0, 2, 128, 8, iters=3, start="onepass")
    assert res.best == ("onepass", 0)
    assert len(res.errors["onepass"]) == 3  # patience 2: stopped after two worse iterates
    ref = one_pass(w, st, 0.0, 2, 8).reconstruct()
    assert torch.allclose(res.reconstruct(), ref, atol=1e-5)


def test_fixed_mask_keeps_the_first_mask(layer):
    w, st = layer
    first = base_step(w, st.hessian, 0.5, None, 3, 128, True)
    res = alternate(w, st.hessian, 0.5, 3, 128, 8, iters=2, remask=False, init=first)
    assert torch.equal(res.base.mask, first.mask)
    assert res.best_error < res.errors["onepass"][0]


def test_bad_start_rejected(layer):
    w, st = layer
    with pytest.raises(ValueError, match="start"):
        alternate(w, st.hessian, start="random")


# ---- the Method -----------------------------------------------------------------------------
def run_stage(w, st, methods):
    s = LayerState.from_linear(w)
    prof = [LayerProfile("l", "mlp", tuple(w.shape), 0)]
    for m in methods:
        m.apply(s, st, m.allocate(prof)["l"])
    return s


@pytest.mark.parametrize("prune", [SparseGPT(0.5), Wanda(0.5), SparseGPT(pattern="2:4")])
def test_method_keeps_the_budget_and_beats_one_pass(layer, prune):
    w, st = layer
    plain = run_stage(w, st, [prune, GPTQ(3, 32), SVDLLM(rule="rank", rank=8, factor_bits=8)])
    refined = run_stage(w, st, [prune, GPTQ(3, 32),
                                AlternatingRefine(rule="rank", rank=8, factor_bits=8)])
    e_plain = relative_error(w, plain.reconstruct(), st)
    e_ref = relative_error(w, refined.reconstruct(), st)
    assert refined.info["refine_errors"]["onepass"][0] == pytest.approx(e_plain, rel=1e-4)
    assert e_ref < 0.95 * e_plain
    assert refined.info["refine_gain"] == pytest.approx(1 - e_ref / e_plain, abs=1e-4)
    a, b = CompressedLinear.pack(plain), CompressedLinear.pack(refined)
    assert a.nbytes() == b.nbytes() and a.meta == b.meta  # identical stored formats and sizes
    assert torch.allclose(b.dequantized_weight(), refined.reconstruct(), atol=1e-5)


def test_method_config_checks():
    with pytest.raises(ConfigError, match="mode"):
        AlternatingRefine(mode="factorize")
    with pytest.raises(ConfigError, match="iters"):
        AlternatingRefine(iters=-1)
    with pytest.raises(ConfigError, match="start"):
        AlternatingRefine(start="x")
    with pytest.raises(ValueError, match="needs"):
        run_stage(torch.randn(8, 16), None, [AlternatingRefine()])


@pytest.mark.slow
def test_method_in_the_walk():
    """In compress_model: same stored bytes as the one-pass recipe; block 0 (whose inputs are
    the same in both runs) is never worse per layer."""
    from ciuic_lab.compress.walk.pipeline import compress_model
    from ciuic_lab.models import tiny

    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    reports = {}
    for name, low in (("one", SVDLLM(ratio=0.1, factor_bits=8)),
                      ("ref", AlternatingRefine(ratio=0.1, factor_bits=8, iters=1))):
        model = tiny.build("tiny-random-llama", vocab=256)
        reports[name] = compress_model(model, windows, [SparseGPT(0.5), GPTQ(3, 32), low],
                                       batch_size=2, progress=False)
        with torch.no_grad():
            assert bool(torch.isfinite(model(windows[:1]).logits).all())
    one, ref = reports["one"], reports["ref"]
    assert one.totals()["bytes"] == ref.totals()["bytes"]
    block0 = [(a, b) for a, b in zip(one.layers, ref.layers) if ".layers.0." in a["name"]]
    assert block0 and all(b["rel_error"] <= a["rel_error"] * (1 + 1e-4) for a, b in block0)
    assert sum(b["rel_error"] for _, b in block0) < sum(a["rel_error"] for a, _ in block0)
