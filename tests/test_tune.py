"""tune=block: learned rounding and clipping inside the packed formats (compress/tune)."""

import copy
import hashlib

import pytest
import torch

from ciuic_lab.compress import checkpoint
from ciuic_lab.compress.linear import CompressedLinear
from ciuic_lab.compress.lowrank.svdllm import SVDLLM
from ciuic_lab.compress.pipeline import compress_model, compress_streamed
from ciuic_lab.compress.prune.sparsegpt import SparseGPT
from ciuic_lab.compress.quant.gptq import GPTQ
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.state import LayerState
from ciuic_lab.compress.stats import LayerStats
from ciuic_lab.compress.tune.block import BlockTune
from ciuic_lab.compress.tune.rounding import TunableLinear
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
    with pytest.raises(ConfigError, match="tune.itres"):
        validate(compose(["tune=block", "+tune.itres=3", "model=tiny-random-llama"]))
    with pytest.raises(ConfigError, match="nothing to tune"):
        validate(compose(["tune=block", "recipe=none", "prune=none", "lowrank=none",
                          "quant=none", "model=tiny-random-llama"]))
