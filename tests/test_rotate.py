"""Rotations (QuIP#, arXiv 2402.04396; QuaRot, arXiv 2404.00456): the maths, the fused
residual-stream rotation on every supported architecture, and online rotations in the walk."""

import copy
import math

import pytest
import torch
from torch import nn

from ciuic_lab.compress.rotate import apply_rotations
from ciuic_lab.compress.rotate.fused import RotationUnsupported, rotate_model, rotate_value_path
from ciuic_lab.compress.rotate.matrices import (
    HadamardRotation,
    RandomOrthogonal,
    fwht,
    hadamard_factor,
    kron_matmul,
    make_rotation,
    paley_hadamard,
)
from ciuic_lab.compress.rotate.online import (
    OnlineRotation,
    RotatedLinear,
    add_online_rotations,
    rotate_linear_input,
)
from ciuic_lab.compress.state import rtn_quantize
from ciuic_lab.compress.stats import LayerStats, relative_error
from ciuic_lab.models import tiny

ARCHS = ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-deepseek-v2",
         "tiny-random-deepseek-v2-qlora", "tiny-random-deepseek-v3"]


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# ---- maths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 16, 256])
def test_fwht_is_the_sylvester_product_on_any_leading_dims(n):
    x = torch.randn(3, 2, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ sylvester(n), atol=1e-12)
    assert torch.allclose(fwht(fwht(x)) / n, x, atol=1e-12)


def test_kron_matmul_is_the_kronecker_product():
    fs = [torch.randn(d, d, dtype=torch.float64) for d in (3, 4, 2)]
    x = torch.randn(5, 2, 24, dtype=torch.float64)
    full = torch.kron(torch.kron(fs[0], fs[1]), fs[2])
    assert torch.allclose(kron_matmul(x, fs), x @ full, atol=1e-12)
    with pytest.raises(ValueError, match="multiply"):
        kron_matmul(x, fs[:2])


@pytest.mark.parametrize("k", [2, 64, 256, 8192])
def test_sylvester_factors_in_any_grouping_are_the_same_hadamard(k):
    """H_k applied as narrow-first factors equals the butterfly fwht."""
    from ciuic_lab.compress.rotate.matrices import sylvester_factors

    x = torch.randn(3, k, dtype=torch.float64)
    assert torch.allclose(kron_matmul(x, sylvester_factors(k)), fwht(x) / math.sqrt(k), atol=1e-12)


def test_fwht_rejects_other_widths():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(4, 12))


@pytest.mark.parametrize("order", [4, 12, 20, 28, 36, 44, 60, 108])
def test_paley_matrices_are_hadamard(order):
    h = paley_hadamard(order)
    assert h is not None and set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=h.dtype))


@pytest.mark.parametrize("n", [576, 1536, 7168, 2048, 18432, 512, 64, 256])
def test_every_deepseek_and_smollm2_width_gets_a_true_hadamard(n):
    """No width of DeepSeek-V3 / MLA / SmolLM2 needs the Haar fallback."""
    p, k, kind = hadamard_factor(n)
    assert p * k == n and kind in ("sylvester", "paley") and k & (k - 1) == 0


@pytest.mark.parametrize("n", [64, 96, 576, 1536, 100])
def test_hadamard_rotation_is_orthogonal_and_incoherent(n):
    r = HadamardRotation(n, seed=3)
    q = r.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-12)
    assert torch.allclose(r.apply_t(torch.eye(n, dtype=torch.float64)), q.T, atol=1e-12)
    if r.kind != "haar":  # every entry ±1/√n: maximal incoherence
        assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(n)), atol=1e-12)
    else:
        assert q.abs().max() * math.sqrt(n) < math.sqrt(r.p)  # max entry ≤ 1/√k


@pytest.mark.parametrize("n", [7168, 18432])
def test_large_widths_round_trip_without_a_dense_matrix(n):
    r = HadamardRotation(n, seed=0)
    x = torch.randn(4, n, dtype=torch.float64)
    y = r.apply(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-10)
    assert torch.allclose(r.apply_t(y), x, atol=1e-10)
    e0 = torch.zeros(1, n, dtype=torch.float64)
    e0[0, 0] = 1
    assert torch.allclose(r.apply(e0).abs(), torch.full((1, n), n ** -0.5, dtype=torch.float64))


def test_rotations_are_seeded():
    for kind in ("hadamard", "random"):
        a, b, c = (make_rotation(64, s, kind).matrix() for s in (5, 5, 6))
        assert torch.equal(a, b) and not torch.equal(a, c)
    q = RandomOrthogonal(48, 0).matrix()
    assert torch.allclose(q @ q.T, torch.eye(48, dtype=q.dtype), atol=1e-12)
    with pytest.raises(ValueError):
        make_rotation(64, 0, "identity")


def test_rotation_makes_rtn_better_on_outlier_columns():
    """The point of incoherence: W with a few huge input columns quantises badly per row; in
    the rotated basis the outliers are spread and the 3-bit grid fits them much better."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g, dtype=torch.float64)
    w[:, [3, 40, 77, 100]] *= 20
    st = LayerStats(128, hessian=True)
    st.add_batch(torch.randn(1024, 128, generator=g))
    r = HadamardRotation(128, seed=1)
    plain = rtn_quantize(w.float(), 3, -1, True).dequantize().double()
    rot = r.apply_t(rtn_quantize(r.apply(w).float(), 3, -1, True).dequantize().double())
    assert relative_error(w, rot, st) < 0.7 * relative_error(w, plain, st)


# ---- fused residual rotation ------------------------------------------------------------------
def scrambled(name, **cfg):
    """A tiny model with non-trivial norm scales, so that folding them is really tested."""
    m = tiny.build(name, vocab=256, **cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.5)
    return m


def logits_and_routes(model, ids):
    routes = []
    hooks = [mod.register_forward_hook(lambda _m, _a, out: routes.append(out[2].sort(-1).values))
             for n, mod in model.named_modules() if n.endswith("mlp.gate")]
    with torch.no_grad():
        out = model(ids).logits
    for h in hooks:
        h.remove()
    return out, routes


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("name", ARCHS)
def test_rotated_model_computes_the_same_function(name, kind):
    m = scrambled(name)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, ref_routes = logits_and_routes(m, ids)
    cfg = m.config.to_dict()
    shapes = {n: p.shape for n, p in m.named_parameters()}
    info = rotate_model(m, seed=7, kind=kind)
    out, routes = logits_and_routes(m, ids)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    # routers rotated, not changed: the same experts are picked for every token
    assert len(routes) == len(ref_routes) and all(torch.equal(a, b) for a, b in zip(routes, ref_routes))
    assert m.config.to_dict() == cfg and {n: p.shape for n, p in m.named_parameters()} == shapes
    for n, p in m.named_parameters():
        if n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")):
            assert torch.equal(p, torch.ones_like(p)), n
        if n.endswith(("q_a_layernorm.weight", "kv_a_layernorm.weight")):  # latents: untouched
            assert not torch.equal(p, torch.ones_like(p)), n
    assert info["runtime_bytes"] == 0 and info["rotated"][0] == "embed"
    # the rotation really happened: embeddings changed
    assert not torch.allclose(m.model.embed_tokens.weight, scrambled(name).model.embed_tokens.weight)


def test_non_power_of_two_hidden_size():
    """hidden 96 = 12·8: the Paley-12 ⊗ H8 rotation on a whole model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
    info = rotate_model(m, seed=0)
    assert "paley12 ⊗ H8" in info["construction"]
    with torch.no_grad():
        assert ((m(ids).logits - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_tied_embeddings_are_untied_counted_and_survive_a_checkpoint(tmp_path, kind):
    """SmolLM2's layout: the head shares the embedding. Rotating unties it (E Q at the input,
    E diag(g_final) Q at the head), the function is kept, the copy's bytes are counted once in
    `stored_bytes`, and save -> load keeps the two apart."""
    from ciuic_lab.compress.store import checkpoint
    from ciuic_lab.eval.memory import stored_bytes

    m = scrambled("tiny-random-llama", tied=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, _ = logits_and_routes(m, ids)
    before = stored_bytes(m)
    info = apply_rotations(m, kind, value_path=True, seed=5)
    out, _ = logits_and_routes(m, ids)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    head, embed = m.lm_head.weight, m.model.embed_tokens.weight
    assert head.data_ptr() != embed.data_ptr() and not torch.allclose(head, embed)
    assert info["untied_head_bytes"] == 256 * 64 * 4 == head.numel() * head.element_size()
    assert stored_bytes(m) == before + info["untied_head_bytes"]
    assert m.config.tie_word_embeddings is False
    m.tie_weights()  # transformers' re-tying (from_pretrained, resize) must leave them apart
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    checkpoint.save(m, tmp_path / "ckpt")
    assert checkpoint.stored_bytes(tmp_path / "ckpt") == stored_bytes(m)
    back = checkpoint.load(tmp_path / "ckpt")
    assert back.lm_head.weight.data_ptr() != back.model.embed_tokens.weight.data_ptr()
    assert torch.equal(back.lm_head.weight, head) and torch.equal(back.model.embed_tokens.weight,
                                                                  embed)
    assert torch.equal(logits_and_routes(back, ids)[0], out)


def test_an_untied_model_gets_no_extra_head():
    from ciuic_lab.eval.memory import stored_bytes

    m = scrambled("tiny-random-llama")
    before = stored_bytes(m)
    assert apply_rotations(m, "hadamard", seed=0)["untied_head_bytes"] == 0
    assert stored_bytes(m) == before


def test_unknown_block_parameters_are_refused():
    m = tiny.build("tiny-random-llama", vocab=256)
    m.model.layers[1].self_attn.extra = nn.Linear(64, 64)
    with pytest.raises(RotationUnsupported, match="layers.1.self_attn.extra"):
        rotate_model(m)


def test_a_norm_that_does_not_commute_is_refused():
    m = tiny.build("tiny-random-qwen2", vocab=256)
    ln = nn.LayerNorm(64, bias=False)  # mean subtraction: not rotation-invariant
    m.model.norm = ln
    with pytest.raises(RotationUnsupported):
        rotate_model(m)


def test_unsupported_architecture():
    m = tiny.build("tiny-random-llama", vocab=256)
    m.config.model_type = "gemma"
    with pytest.raises(RotationUnsupported, match="gemma"):
        rotate_model(m)


def test_every_adapter_has_its_rotation_layouts():
    """Every supported architecture's adapter has a residual-stream layout or a stated reason why
    it cannot, and a value path; the config check's views are read from the adapters."""
    from ciuic_lab.compress.rotate.fused import NO_RESIDUAL, RESIDUAL, VALUE_PATH
    from ciuic_lab.models.adapters import ADAPTERS, SUPPORTED

    for mt in SUPPORTED:
        ad = ADAPTERS[mt]
        assert (ad.residual is None) == (ad.no_residual is not None), mt
        assert ad.value_path is not None, mt
    assert set(SUPPORTED) == set(RESIDUAL) | set(NO_RESIDUAL) and not set(RESIDUAL) & set(NO_RESIDUAL)
    assert set(SUPPORTED) == set(VALUE_PATH)


# ---- Gemma 3: its post-norms stop a residual rotation, not the value path or online ones ------
def test_gemma3_residual_rotation_is_refused_naming_the_post_norms():
    m = scrambled("tiny-random-gemma3")
    with pytest.raises(RotationUnsupported, match="post_attention_layernorm"):
        rotate_model(m)


def test_gemma3_value_path_and_online_rotations_keep_the_model():
    from ciuic_lab.eval.memory import stored_bytes

    m = scrambled("tiny-random-gemma3")
    ids = torch.randint(0, 256, (2, 24))  # longer than the sliding window
    with torch.no_grad():
        ref = m(ids).logits
    before = stored_bytes(m)
    info = apply_rotations(m, None, value_path=True, online=("down_proj", "o_proj"), seed=5)
    with torch.no_grad():
        assert ((m(ids).logits - ref).norm() / ref.norm()).item() < 1e-4
    assert len(info["value_path"]["rotated"]) == m.config.num_hidden_layers
    assert stored_bytes(m) == before + info["runtime_bytes"] > before


# ---- online rotations -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [128, 96])
def test_rotated_linear_keeps_outputs_and_counts_its_bytes(n):
    lin = nn.Linear(n, 32, bias=True)
    x = torch.randn(5, 7, n)
    ref = lin(x)
    rl = rotate_linear_input(copy.deepcopy(lin), seed=0)
    assert torch.allclose(rl(x), ref, atol=1e-5)
    assert not torch.allclose(rl.linear.weight, lin.weight)  # W Q is stored
    extra = n + (0 if n == 128 else 4 * rl.rotation.p ** 2)  # int8 signs (+ fp32 Paley block)
    assert rl.rotation.nbytes() == extra
    assert rl.nbytes() == extra + 4 * (n * 32 + 32)
    assert rl.rotation(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-deepseek-v3"])
def test_online_rotations_keep_the_model_and_show_in_stored_bytes(name):
    from ciuic_lab.eval.memory import stored_bytes

    m = scrambled(name)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
    before = stored_bytes(m)
    rotate_model(m, seed=1)
    info = add_online_rotations(m, seed=2, sites=("down_proj", "o_proj"))
    with torch.no_grad():
        out = m(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    assert info["runtime_bytes"] > 0 and stored_bytes(m) == before + info["runtime_bytes"]
    n_blocks = m.config.num_hidden_layers
    dense_mlps = n_blocks if name == "tiny-random-llama" else 1
    shared = 0 if name == "tiny-random-llama" else n_blocks - 1
    assert len(info["wrapped"]) == n_blocks + dense_mlps + shared  # o_proj + down projections
    assert len(info["skipped"]) == (0 if name == "tiny-random-llama" else n_blocks - 1)
    signs = [b for mod in m.modules() if isinstance(mod, OnlineRotation) for b in [mod.signs]]
    assert len({tuple(s.tolist()) for s in signs}) == len(signs)  # a fresh Q per module


def test_every_stage_runs_in_the_rotated_basis():
    """The walk finds `<site>.linear` inside RotatedLinear, calibrates it on rotated inputs and
    replaces it by a CompressedLinear; the rotation stays in front."""
    from ciuic_lab.compress.lowrank.svdllm import SVDLLM
    from ciuic_lab.compress.prune.sparsegpt import SparseGPT
    from ciuic_lab.compress.quant.gptq import GPTQ
    from ciuic_lab.compress.store.linear import CompressedLinear
    from ciuic_lab.compress.walk.pipeline import compress_model

    m = tiny.build("tiny-random-deepseek-v3", vocab=256)
    rotate_model(m, seed=0)
    add_online_rotations(m, seed=0)
    report = compress_model(m, torch.randint(0, 256, (4, 32)),
                            [SparseGPT(0.5), GPTQ(4, 32), SVDLLM(ratio=0.05)], batch_size=2,
                            progress=False)
    names = [r["name"] for r in report.layers]
    assert "model.layers.0.mlp.down_proj.linear" in names
    assert "model.layers.1.mlp.shared_experts.down_proj.linear" in names
    down = m.model.layers[0].mlp.down_proj
    assert isinstance(down, RotatedLinear) and isinstance(down.linear, CompressedLinear)
    assert all(r["rel_error"] < 0.9 for r in report.layers)
    with torch.no_grad():
        assert bool(torch.isfinite(m(torch.randint(0, 256, (1, 8))).logits).all())


# ---- value path ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
def test_value_path_rotation_is_fused_and_exact(name):
    m = scrambled(name)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
    attn = m.model.layers[0].self_attn
    o_before = attn.o_proj.weight.clone()
    src = attn.v_proj if hasattr(attn, "v_proj") else attn.kv_b_proj
    w_before = src.weight.clone()
    info = rotate_value_path(m, seed=3)
    rotate_model(m, seed=1)  # composes with the residual rotation
    with torch.no_grad():
        assert ((m(ids).logits - ref).norm() / ref.norm()).item() < 1e-4
    assert info["runtime_bytes"] == 0 and not torch.allclose(attn.o_proj.weight, o_before)
    if hasattr(attn, "kv_b_proj"):  # only the value rows of each head move, the key rows stay
        cfg = m.config
        rows = src.weight.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
        old = w_before.view_as(rows)
        assert torch.equal(rows[:, :cfg.qk_nope_head_dim], old[:, :cfg.qk_nope_head_dim])
        assert not torch.allclose(rows[:, cfg.qk_nope_head_dim:], old[:, cfg.qk_nope_head_dim:])


@pytest.mark.parametrize("name", ["tiny-random-qwen2", "tiny-random-deepseek-v3"])
def test_all_transforms_together(name):
    from ciuic_lab.eval.memory import stored_bytes

    m = scrambled(name)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
    before = stored_bytes(m)
    info = apply_rotations(m, "hadamard", value_path=True, online=("down_proj", "o_proj"), seed=5)
    with torch.no_grad():
        assert ((m(ids).logits - ref).norm() / ref.norm()).item() < 1e-4
    assert stored_bytes(m) == before + info["runtime_bytes"]
    assert set(info) == {"runtime_bytes", "untied_head_bytes", "value_path", "residual", "online"}
    assert info["untied_head_bytes"] == 0  # these layouts have a head of their own


# ---- wired into a run: `rotate=...` and `lowrank=alternating` ---------------------------------
RUN_QUICK = ["model=tiny-random-deepseek-v3", "eval.max_windows=2", "eval.seqlen=64",
             "data.calib_samples=4", "data.calib_seqlen=32", "eval.speed=false", "progress=false",
             "eval.lm_eval.enabled=false", "eval.generate.max_new_tokens=2", "tracker=none",
             "device=cpu", "eval.serve_memory=false"]


def _run(*overrides, tmp_path=None):
    from ciuic_lab.config import compose
    from ciuic_lab.runner import run

    return run(compose([*RUN_QUICK, *overrides]), out_dir=tmp_path)


@pytest.mark.parametrize("rotation", ["hadamard", "hadamard_online"])
def test_rotate_config_keeps_the_model_and_counts_run_time_bytes(rotation):
    """With every stage off, the rotated model is the published one up to rounding: the run's
    compressed perplexity equals its dense one, and online rotations add exactly their bytes."""
    out = _run(f"rotate={rotation}", "recipe=none", "prune=none", "quant=none", "lowrank=none")
    m = out.metrics
    assert m["ppl/wikitext2"] == pytest.approx(m["ppl/wikitext2_dense"], rel=1e-4)
    extra = m["rotate/runtime_bytes"]
    assert (extra > 0) == (rotation == "hadamard_online")
    assert m["mem/weight_bytes"] == m["mem/weight_bytes_dense"] + extra
    rotated = [mod for mod in out.model.modules() if isinstance(mod, RotatedLinear)]
    assert bool(rotated) == (rotation == "hadamard_online")


def test_recipe_runs_in_the_rotated_basis():
    out = _run("rotate=hadamard_online", "lowrank.ratio=0.01")
    names = [r["name"] for r in out.report.layers]
    assert "model.layers.0.mlp.down_proj.linear" in names  # calibrated behind its rotation
    assert out.metrics["ppl/wikitext2"] < 2 * out.metrics["ppl/wikitext2_dense"]


@pytest.mark.parametrize("override, key", [
    (["rotate=hadamard", "rotate.residual=spin"], "rotate.residual"),
    (["rotate=hadamard", "rotate.online=[q_proj]"], "rotate.online"),
    (["rotate=hadamard_online", "save=true"], "rotate.online"),
    (["model=tiny-random-gemma3", "rotate=hadamard"], "rotate.residual: gemma3_text .*post_attention_layernorm"),
])
def test_rotate_config_errors_come_before_any_work(override, key):
    from ciuic_lab.config import compose, validate
    from ciuic_lab.errors import ConfigError

    cfg = compose([*RUN_QUICK, *override])
    with pytest.raises(ConfigError, match=key):
        validate(cfg)


def test_gemma3_value_path_rotation_runs_without_the_residual_one(tmp_path):
    """rotate=hadamard with rotate.residual=null on Gemma 3: with every stage off the rotated
    model is the published one; with RTN, a streamed run (rotating each block as it loads from a
    saved checkpoint) gets the in-memory run's perplexity."""
    from ciuic_lab.config import compose, validate
    from ciuic_lab.models.loader import load_tokenizer
    from ciuic_lab.runner import run

    tok = load_tokenizer("tiny-random-gemma3")
    src = tmp_path / "src"
    tiny.build("tiny-random-gemma3", vocab=len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    base = [*RUN_QUICK, f"model.name_or_path={src}", "rotate=hadamard", "rotate.residual=null",
            "recipe=none", "prune=none", "lowrank=none"]

    def metrics(*more, name):
        cfg = compose([*base, *more])
        validate(cfg)
        return run(cfg, out_dir=tmp_path / name).metrics

    off = metrics("quant=none", name="off")
    assert off["ppl/wikitext2"] == pytest.approx(off["ppl/wikitext2_dense"], rel=1e-4)
    rtn = ["quant=rtn", "quant.bits=4", "quant.group_size=16"]
    memory = metrics(*rtn, name="memory")
    streamed = metrics(*rtn, "compress.stream=true", name="streamed")
    assert memory["ppl/wikitext2"] != pytest.approx(memory["ppl/wikitext2_dense"], rel=1e-4)
    assert streamed["ppl/wikitext2"] == pytest.approx(memory["ppl/wikitext2"], rel=1e-5)


def test_a_tied_model_rotates_in_a_run_and_its_head_is_counted():
    """Once refused in the config check; now the run unties the head, keeps the function (every
    stage off: compressed perplexity = dense) and counts the head in mem/weight_bytes."""
    from ciuic_lab.config import compose, validate
    from ciuic_lab.models.loader import load_tokenizer
    from ciuic_lab.runner import run

    tok = load_tokenizer("tiny-random-llama")
    m = tiny.build("tiny-random-llama", vocab=len(tok), tied=True)
    cfg = compose([*RUN_QUICK, "model=tiny-random-llama", "rotate=hadamard", "recipe=none",
                   "prune=none", "quant=none", "lowrank=none"])
    validate(cfg, m.config)
    out = run(cfg, model=m, tokenizer=tok).metrics
    assert out["ppl/wikitext2"] == pytest.approx(out["ppl/wikitext2_dense"], rel=1e-4)
    head = out["rotate/untied_head_bytes"]
    assert head == len(tok) * 64 * 4
    assert out["mem/weight_bytes"] == out["mem/weight_bytes_dense"] + head


def test_alternating_refine_as_a_config_keeps_the_budget():
    """`lowrank=alternating` stores what `lowrank=svdllm` stores (same masks, grid and rank), and
    on the first block, whose inputs both runs share, no layer ends worse."""
    base = _run("lowrank=svdllm", "lowrank.ratio=0.05", "quant.policy=uniform",
                "prune.policy=uniform")
    alt = _run("lowrank=alternating", "lowrank.ratio=0.05", "lowrank.iters=1",
               "quant.policy=uniform", "prune.policy=uniform")
    assert alt.metrics["size/bits_per_param"] == pytest.approx(base.metrics["size/bits_per_param"])
    first = {r["name"]: r["rel_error"] for r in base.report.layers
             if r["name"].startswith("model.layers.0.")}
    refined = {r["name"]: r["rel_error"] for r in alt.report.layers if r["name"] in first}
    assert first and refined.keys() == first.keys()
    assert all(refined[n] <= first[n] * (1 + 1e-4) for n in first), (first, refined)
    assert any(refined[n] < first[n] * 0.999 for n in first)
