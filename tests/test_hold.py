"""How a run holds its model is chosen once (ciuic_lab/hold.py): the provider and sink `hold`
picks are the ones the dense evaluation, the one compress entry and its walks get, and a
streamed run builds its skeleton once."""

import torch

from ciuic_lab import hold as hold_mod
from ciuic_lab import runner
from ciuic_lab.compress.walk import pipeline
from ciuic_lab.compress.walk.blocks import Offloaded, Resident, Streamed
from ciuic_lab.compress.walk.pipeline import InPlace, ToCheckpoint
from ciuic_lab.config import compose
from ciuic_lab.eval.suite import Suite
from ciuic_lab.models import loader, tiny
from ciuic_lab.models.loader import load_tokenizer

QUICK = ["eval.max_windows=2", "eval.seqlen=64", "data.calib_samples=4", "data.calib_seqlen=32",
         "progress=false", "eval.lm_eval.enabled=false", "eval.generate.enabled=false",
         "eval.speed=false", "eval.serve_memory=false", "tracker=none"]
CPU = torch.device("cpu")


def _saved(tmp_path):
    tok = load_tokenizer("tiny-random-deepseek-v3")
    torch.manual_seed(0)
    model = tiny.build("tiny-random-deepseek-v3", vocab=len(tok))
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    return model, tmp_path / "src"


def test_hold_picks_the_provider_and_sink_of_each_mode(tmp_path):
    held = hold_mod.hold(compose(["model=tiny-random-deepseek-v3", *QUICK]), CPU, torch.float32)
    assert type(held.provider) is Resident and isinstance(held.sink, InPlace)
    assert held.walk_why is None and held.on_device
    walked = hold_mod.hold(compose(["model=tiny-random-deepseek-v3", *QUICK, "eval.stream=true"]),
                           CPU, torch.float32)
    assert walked.walk_why == "eval.stream=true" and walked.walk_compressed
    # a live model held elsewhere than the device the blocks compute on: one block at a time
    meta = hold_mod.hold(compose(["model=tiny-random-deepseek-v3", *QUICK]), torch.device("meta"),
                         torch.float32, model=held.model, tokenizer=held.tokenizer)
    assert type(meta.provider) is Offloaded
    model, src = _saved(tmp_path)
    s = hold_mod.hold(compose(["model=hub", f"model.name_or_path={src}", "compress.stream=true",
                               *QUICK]), CPU, torch.float32, out_dir=tmp_path / "run")
    assert isinstance(s.provider, Streamed) and isinstance(s.sink, ToCheckpoint)
    assert s.walk_why == "compress.stream=true" and not s.on_device
    assert s.dense_params == sum(p.numel() for p in model.parameters())


def test_a_streamed_run_hands_every_step_the_one_provider_it_held(tmp_path, monkeypatch):
    """The dense walk, the compress entry (called once) and the sink share the provider `hold`
    built, over the one skeleton the run builds; the compressed walk reads the written
    checkpoint (Stored)."""
    _, src = _saved(tmp_path)
    seen = {"skeleton": 0, "compress": [], "walks": []}
    helds = []
    real_skeleton, real_hold, real_compress = loader.skeleton, runner.hold, runner.compress
    real_walk = Suite.run_streamed

    def skeleton(*a, **k):
        seen["skeleton"] += 1
        return real_skeleton(*a, **k)

    def hold(*a, **k):
        helds.append(real_hold(*a, **k))
        return helds[-1]

    def compress(provider, windows, methods, sink, **k):
        seen["compress"].append((provider, sink))
        return real_compress(provider, windows, methods, sink, **k)

    def run_streamed(self, provider, which, notes, why):
        seen["walks"].append((which, provider))
        return real_walk(self, provider, which, notes, why)

    monkeypatch.setattr(loader, "skeleton", skeleton)
    monkeypatch.setattr(runner, "hold", hold)
    monkeypatch.setattr(runner, "compress", compress)
    monkeypatch.setattr(Suite, "run_streamed", run_streamed)
    cfg = compose(["model=hub", f"model.name_or_path={src}", "compress.stream=true",
                   "eval.stream=true", *QUICK])
    out = runner.run(cfg, out_dir=tmp_path / "run")
    (held,) = helds
    assert seen["skeleton"] == 1
    assert seen["compress"] == [(held.provider, held.sink)]
    (dense, dense_p), (comp, comp_p) = seen["walks"]
    assert (dense, comp) == ("dense", "compressed") and dense_p is held.provider
    from ciuic_lab.compress.store.checkpoint import Stored

    assert isinstance(comp_p, Stored) and comp_p.path == held.sink.path == tmp_path / "run" / \
        "compressed"
    assert out.model is None and "ppl/wikitext2" in out.metrics


def test_pipeline_has_one_compress_entry_the_shorthands_go_through(monkeypatch):
    """compress_model is `compress` over a Resident provider with the InPlace sink."""
    calls = []
    real = pipeline.compress

    def compress(provider, windows, methods, sink, *a, **k):
        calls.append((type(provider), type(sink)))
        return real(provider, windows, methods, sink, *a, **k)

    monkeypatch.setattr(pipeline, "compress", compress)
    from ciuic_lab.compress.quant.rtn import RTN

    model = tiny.build("tiny-random-llama", vocab=256)
    pipeline.compress_model(model, torch.randint(0, 256, (1, 8)), [RTN(4, 32)], progress=False)
    assert calls == [(Resident, InPlace)]
