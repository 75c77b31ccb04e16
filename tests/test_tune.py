"""tune=block: learned rounding and clipping inside the packed formats (compress/tune)."""

import copy
import hashlib

import pytest
import torch

from ciuic_lab.compress.lowrank.svdllm import SVDLLM
from ciuic_lab.compress.prune.sparsegpt import SparseGPT
from ciuic_lab.compress.quant.gptq import GPTQ
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.state import LayerState
from ciuic_lab.compress.stats import LayerStats
from ciuic_lab.compress.store import checkpoint
from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.compress.tune.block import BlockTune
from ciuic_lab.compress.tune.e2e import E2ETune, FullTune, split_tune
from ciuic_lab.compress.tune.rounding import TunableLinear
from ciuic_lab.compress.walk.pipeline import compress_model, compress_streamed
from ciuic_lab.config import build_tune, compose, validate
from ciuic_lab.errors import ConfigError
from ciuic_lab.eval.memory import stored_bytes
from ciuic_lab.eval.perplexity import perplexity
from ciuic_lab.models import tiny

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
EVAL = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))


def _recipe():
    return [SparseGPT(0.5), GPTQ(3, 32), SVDLLM(ratio=0.05, factor_bits=8)]


def _state(methods, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(48, 64, generator=g), torch.randn(256, 64, generator=g)
    stats = LayerStats(64, True, torch.device("cpu"))
    stats.add_batch(x)
    state = LayerState.from_linear(w)
    for m in methods:
        m.apply(state, stats, m.goal() if m.stage != "lowrank" else
                {"rule": "ratio", "ratio": 0.05, "energy": 0.9, "rank": None})
    return state


@pytest.mark.parametrize("methods", [
    lambda: [GPTQ(3, 32)], lambda: [RTN(4, 16, sym=False)], lambda: [SparseGPT(0.5)],
    _recipe, lambda: [SparseGPT(0.5), RTN(3, 32)]], ids=["gptq", "rtn-asym", "sparse16",
                                                        "recipe", "sparse-rtn"])
def test_an_untouched_tunable_layer_is_the_packed_layer(methods):
    """V = 0 and α = 1 must reproduce what the stages packed (GPTQ's codes included, through its
    recorded origin): tuning starts from the stages' solution, not from rounding to nearest."""
    state = _state(methods())
    packed = CompressedLinear.pack(state, torch.float32).dequantized_weight()
    t = TunableLinear(state)
    torch.testing.assert_close(t.weight().detach(), packed, rtol=0, atol=1e-5)
    again = CompressedLinear.pack(t.tuned_state(), torch.float32)
    torch.testing.assert_close(again.dequantized_weight(), packed, rtol=0, atol=1e-5)


@pytest.mark.parametrize("methods", [lambda: [GPTQ(3, 32)], lambda: [SparseGPT(0.5), GPTQ(4, 16)],
                                     lambda: [RTN(3, 32, sym=False)]],
                         ids=["gptq", "sparse-gptq", "rtn-asym"])
def test_start_rtn_is_round_to_nearest_of_the_base(methods):
    """tune.start=rtn: V = 0 and α = 1 give round-to-nearest of the unrounded base on a grid
    fitted to it (masked entries excluded), not GPTQ's codes; the mask and widths stay."""
    from ciuic_lab.compress.state import rtn_quantize
    state = _state(methods())
    q = state.quant
    rtn = rtn_quantize(state.base, q.bits, q.group_size, q.sym, state.mask)
    expect = rtn.dequantize() if state.mask is None else rtn.dequantize() * state.mask
    t = TunableLinear(state, start="rtn")
    torch.testing.assert_close(t.weight().detach(), expect, rtol=0, atol=1e-6)
    new = t.tuned_state()
    torch.testing.assert_close(new.base_weight(), expect, rtol=0, atol=1e-6)
    if isinstance(methods()[0], GPTQ):  # GPTQ's codes are not round-to-nearest ones
        assert not torch.equal(new.quant.codes, q.codes)


def test_keep_best_returns_the_lowest_loss_seen():
    """keep=best ends on the parameters of the step with the lowest loss (measured before that
    step moved them); keep=last on wherever the last step left them."""
    state = _state([GPTQ(3, 32)])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, 64, generator=g)
    target = x @ state.weight.T
    seen = []

    def loss_of(k):
        loss = torch.nn.functional.mse_loss(t(x[k]), target[k])
        return loss

    def run(keep):
        nonlocal t
        t = TunableLinear(state)
        tune = BlockTune(iters=12, lr=0.2, batch_size=4, keep=keep)  # big steps: overshoots

        def recorded(k):
            loss = loss_of(k)
            seen.append(float(loss))
            return loss
        seen.clear()
        tune.fit([t], recorded, 4, 4)
        with torch.no_grad():
            return sum(float(loss_of(k)) for k in range(4)) / 4, [sum(seen[i:i + 4]) / 4
                                                                  for i in range(0, 48, 4)]
    t = None
    best, per_step = run("best")
    assert best == pytest.approx(min(per_step), rel=1e-5)
    last, _ = run("last")
    assert best < last  # with these steps the last iterate is not the best one


def _tiny(arch="tiny-random-deepseek-v3"):
    torch.manual_seed(0)
    return tiny.build(arch, vocab=256)


def _tuned(model, methods, tune, **kw):
    return compress_model(model, CALIB, methods, batch_size=2, progress=False, tune=tune, **kw)


@pytest.mark.parametrize("arch", ["tiny-random-deepseek-v3", "tiny-random-llama"])
def test_tuning_lowers_the_loss_it_minimises_and_never_raises_it(arch):
    model = _tiny(arch)
    report = _tuned(model, _recipe(), BlockTune(iters=15, batch_size=4))
    assert report.tuned, "nothing was tuned"
    assert all(u["loss_after"] <= u["loss_before"] for u in report.tuned)
    # it does something: most blocks and experts end below where the stages left them
    assert sum(u["loss_after"] < u["loss_before"] for u in report.tuned) > len(report.tuned) / 2
    if arch == "tiny-random-deepseek-v3":  # routed experts tuned one at a time
        assert any(".mlp.experts." in u["unit"] for u in report.tuned)
    assert report.tune_seconds > 0
    assert torch.isfinite(torch.tensor(perplexity(model, EVAL, 2, False)))


def test_a_tuning_that_hurts_is_undone(monkeypatch):
    """When the tuned parts raise the block's loss, the block keeps the stages' packed layers:
    the model is then bit-identical to an untuned run."""
    def scramble(self, layers, loss_of, units, per_step):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for t in layers:
                for v in t.rounding:
                    v.copy_(torch.rand(v.shape, generator=g) - 0.5)
                for a in t.clip:
                    a.fill_(0.5)
                for p in t.continuous:
                    p.mul_(-1)

    monkeypatch.setattr(BlockTune, "fit", scramble)
    plain, tuned = _tiny(), _tiny()
    _tuned(plain, _recipe(), None)
    report = _tuned(tuned, _recipe(), BlockTune(iters=1))
    assert report.tuned and not any(u["kept"] for u in report.tuned)
    a, b = plain.state_dict(), tuned.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tuning_changes_values_not_bytes():
    plain, tuned = _tiny(), _tiny()
    ref = _tuned(plain, [GPTQ(3, 32)], None)
    report = _tuned(tuned, [GPTQ(3, 32)], BlockTune(iters=10, batch_size=4))
    assert [r["bytes"] for r in report.layers] == [r["bytes"] for r in ref.layers]
    assert stored_bytes(tuned) == stored_bytes(plain)
    assert report.totals()["bits_per_param"] == ref.totals()["bits_per_param"]
    # and the values did change somewhere (a tuning that changed nothing would pass the above)
    a, b = plain.state_dict(), tuned.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("codes"))


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.glob("*.safetensors"))}


def test_a_streamed_tuned_run_stores_what_the_in_memory_tuned_run_stores(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "src")
    tune = BlockTune(iters=5, batch_size=4)
    compress_streamed(str(tmp_path / "src"), tmp_path / "streamed", CALIB, _recipe(),
                      torch.device("cpu"), torch.float32, batch_size=2, progress=False,
                      tune=tune)
    in_memory = copy.deepcopy(model)
    _tuned(in_memory, _recipe(), tune)
    checkpoint.save(in_memory, tmp_path / "memory")
    assert _digests(tmp_path / "streamed") == _digests(tmp_path / "memory")


def test_tune_config_is_checked_before_any_model_loads():
    assert build_tune(compose(["tune=none"])) is None
    tune = build_tune(compose(["tune=block", "tune.iters=7"]))
    assert isinstance(tune, BlockTune) and tune.iters == 7
    with pytest.raises(ConfigError, match="tune.iters"):
        build_tune(compose(["tune=block", "tune.iters=0"]))
    with pytest.raises(ConfigError, match="tune.lr"):
        build_tune(compose(["tune=block", "tune.lr=2"]))
    with pytest.raises(ConfigError, match="tune.start"):
        build_tune(compose(["tune=block", "tune.start=gptq"]))
    with pytest.raises(ConfigError, match="tune.keep"):
        build_tune(compose(["tune=block", "tune.keep=first"]))
    with pytest.raises(ConfigError, match="tune.itres"):
        validate(compose(["tune=block", "+tune.itres=3", "model=tiny-random-llama"]))
    with pytest.raises(ConfigError, match="nothing to tune"):
        validate(compose(["tune=block", "recipe=none", "prune=none", "lowrank=none",
                          "quant=none", "model=tiny-random-llama"]))


# ---- tune=e2e: end-to-end distillation of the continuous parameters -------------------------
def _distilled(arch, methods, e2e):
    """(teacher from the dense model, the model compressed by `methods`) — never both models."""
    model = _tiny(arch)
    teacher = e2e.teacher(model, CALIB)
    _tuned(model, methods, None)
    return teacher, model


def _may_change(name: str) -> bool:
    """What e2e trains: base scales, low-rank factors (re-quantised in their format), norms."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("scale", "u", "v", "u_codes", "u_scale", "u_zero", "v_codes", "v_scale",
                "v_zero"):
        return True
    return "norm" in name and leaf == "weight"


@pytest.mark.parametrize("arch", ["tiny-random-llama", "tiny-random-deepseek-v3"])
def test_e2e_lowers_the_kl_it_minimises(arch):
    e2e = E2ETune(iters=8, batch_size=4, topk=16, lr=1e-2)
    teacher, model = _distilled(arch, [GPTQ(3, 32), SVDLLM(ratio=0.05, factor_bits=8)], e2e)
    info = e2e.run(model, teacher)
    assert info["kept"] and info["kl_after"] < info["kl_before"]
    # measured on the packed model (fp16 scales, re-quantised factors), not the trained copy
    assert e2e.kl(model, teacher) == pytest.approx(info["kl_after"], rel=1e-6)
    assert torch.isfinite(torch.tensor(perplexity(model, EVAL, 2, False)))


@pytest.mark.parametrize("factor_bits", [8, 16], ids=["factors8", "factors16"])
def test_e2e_changes_scales_factors_and_norms_only(factor_bits):
    """Codes, masks, zero points, kept 16-bit values, biases, embeddings, head: bit-identical;
    the packed bytes and every buffer's dtype and shape unchanged."""
    e2e = E2ETune(iters=4, batch_size=4, topk=16, lr=1e-2)
    methods = [SparseGPT(0.5), GPTQ(3, 32), SVDLLM(ratio=0.05, factor_bits=factor_bits)]
    teacher, model = _distilled("tiny-random-llama", methods, e2e)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nbytes = stored_bytes(model)
    assert e2e.run(model, teacher)["kept"]
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert stored_bytes(model) == nbytes
    changed = set()
    for k, v in before.items():
        assert (after[k].dtype, after[k].shape) == (v.dtype, v.shape), k
        if not torch.equal(after[k], v):
            changed.add(k)
    assert not {k for k in changed if not _may_change(k)}
    # and it did train each kind of tensor it may
    for leaf in ("scale", "u_scale" if factor_bits == 8 else "u", "norm.weight"):
        assert any(k.endswith(leaf) for k in changed), leaf
    assert not any(k.endswith((".codes", ".zero", ".mask_code")) for k in changed)


def test_e2e_that_hurts_is_undone(monkeypatch):
    """When the trained values raise the KL, the walk's packed model is kept bit for bit."""
    def scramble(self, model, teacher, trainables, norms, progress):
        with torch.no_grad():
            for t in trainables:
                for p in t.parameters():
                    p.mul_(-3)
            for p in norms:
                p.mul_(-1)

    monkeypatch.setattr(E2ETune, "_fit", scramble)
    e2e = E2ETune(iters=1, topk=16)
    teacher, model = _distilled("tiny-random-llama", _recipe(), e2e)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = e2e.run(model, teacher)
    assert not info["kept"] and info["kl_after"] == info["kl_before"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_teacher_is_the_dense_distribution_coarsened(tmp_path):
    """Top-k plus the bucket is a distribution; the dense model is at KL 0 from its own teacher;
    the cache round-trips through its file."""
    model = _tiny("tiny-random-llama")
    e2e = E2ETune(topk=16, samples=6, batch_size=4)
    teacher = e2e.teacher(model, CALIB)
    assert teacher.logp.shape == (6, 32, 16) and teacher.rest.shape == (6, 32)
    mass = torch.cat([teacher.logp, teacher.rest[..., None]], -1).logsumexp(-1)
    torch.testing.assert_close(mass, torch.zeros_like(mass), atol=1e-5, rtol=0)
    assert (teacher.logp[..., :-1] >= teacher.logp[..., 1:]).all()
    assert abs(e2e.kl(model, teacher)) < 1e-6
    teacher.save(tmp_path / "teacher.safetensors")
    again = type(teacher).load(tmp_path / "teacher.safetensors")
    assert all(torch.equal(getattr(teacher, k), getattr(again, k))
               for k in ("windows", "logp", "index", "rest"))


def test_e2e_config_is_checked_before_any_model_loads():
    e2e = build_tune(compose(["tune=e2e", "tune.topk=8"]))
    assert isinstance(e2e, E2ETune) and e2e.topk == 8
    full = build_tune(compose(["tune=full", "tune.block.iters=3", "tune.e2e.iters=5"]))
    assert isinstance(full, FullTune)
    assert split_tune(full) == (full.block, full.e2e)
    assert (full.block.iters, full.e2e.iters) == (3, 5)
    assert split_tune(e2e) == (None, e2e)
    for override, key in (("tune.topk=0", "tune.topk"), ("tune.lr=1.5", "tune.lr"),
                          ("tune.samples=-1", "tune.samples"), ("tune.iters=0", "tune.iters")):
        with pytest.raises(ConfigError, match=key):
            build_tune(compose(["tune=e2e", override]))
    for override, key in (("tune.block.iters=0", "tune.block.iters"),
                          ("tune.e2e.batch_size=0", "tune.e2e.batch_size"),
                          ("+tune.e2e.itres=3", "tune.e2e.itres")):
        with pytest.raises(ConfigError, match=key):
            validate(compose(["tune=full", override, "model=tiny-random-llama"]))
    for tune in ("e2e", "full"):  # a model that is not resident is distilled block by block
        validate(compose([f"tune={tune}", "compress.offload=true", "model=tiny-random-llama"]))


def test_a_run_with_tune_full_records_both_parts():
    from ciuic_lab.runner import run

    out = run(compose(["model=tiny-random-llama", "tune=full", "tune.block.iters=2",
                       "tune.e2e.iters=3", "tune.e2e.topk=8", "data.calib_samples=4",
                       "data.calib_seqlen=32", "progress=false", "tracker=none",
                       "device=cpu"]), evaluate=False)
    m = out.metrics
    assert m["tune/e2e_kl_after"] <= m["tune/e2e_kl_before"]
    assert m["time/tune_s"] > out.report.tune_seconds > 0
    assert out.report.tuned  # the block part ran inside the walk
