"""Serving memory measured in a fresh process (ciuic_lab.eval.serve_memory): load the saved
model, prepare its kernels, run a few evaluation windows."""

import json

import pytest
from test_run import QUICK

from ciuic_lab.config import compose

OFF = ["tracker=none", "eval.speed=false", "eval.generate.enabled=false",
       "eval.lm_eval.enabled=false", "eval.serve_memory=true"]  # QUICK turns it off


@pytest.mark.slow
def test_a_4bit_model_serves_in_less_memory_than_the_dense_one(tmp_path):
    """The issue's done-when, on the bundled trained model (its 4-bit layers are a fifth of the
    dense model's bytes; a tiny random model is mostly embeddings)."""
    from ciuic_lab.runner import run

    cfg = compose(["model=deepseek-v3-tiny", "recipe=none", "prune=none", "lowrank=none",
                   "quant=rtn", "quant.bits=4", "eval.max_windows=2", "eval.seqlen=128",
                   "eval.dense_baseline=false", "data.calib_samples=2", "data.calib_seqlen=64",
                   "progress=false", *OFF])
    m = run(cfg, out_dir=tmp_path).metrics
    comp, dense = m["mem/serve_peak_bytes"], m["mem/serve_peak_bytes_dense"]
    assert m["mem/serve_peak_kind"] == m["mem/serve_peak_kind_dense"] == \
        "cpu_peak_rss_above_imports"
    assert 0 < comp < dense
    # Most of what the packed layers save shows: the rest is the same activations either way.
    saved = m["mem/weight_bytes_dense"] - m["mem/weight_bytes"]
    assert dense - comp > 0.5 * saved, (dense, comp, saved)
    # save=false: the checkpoint the child loaded was temporary, and is gone
    assert not any(p.name.startswith("serve_memory_") for p in tmp_path.iterdir())
    assert not (tmp_path / "compressed").exists()


@pytest.mark.slow
def test_a_failing_child_is_recorded_and_the_run_keeps_its_metrics(tmp_path, monkeypatch):
    from ciuic_lab.compress.store import checkpoint
    from ciuic_lab.job import run_job

    real_save = checkpoint.save

    def save_then_corrupt(model, path, **kw):
        out = real_save(model, path, **kw)
        shard = min(out.glob("blocks-*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)  # the sha256 no longer matches
        return out

    monkeypatch.setattr(checkpoint, "save", save_then_corrupt)
    cfg = compose([*QUICK, *OFF, "save=true", "eval.dense_baseline=false"])
    run_job(cfg, tmp_path)
    res = json.loads((tmp_path / "result.json").read_text())
    m = res["metrics"]
    assert res["status"] == "ok"
    assert "mem/serve_peak_bytes" not in m
    assert "measuring process failed" in m["mem/serve_error"]
    assert "CheckpointError" in m["mem/serve_error"] and "sha256" in m["mem/serve_error"]
    assert m["mem/serve_error"] in res["notes"]
    for k in ("ppl/wikitext2", "mem/peak_bytes", "mem/weight_bytes", "mem/serve_peak_bytes_dense"):
        assert k in m, k


def test_the_knob_off_skips_it_and_a_bad_window_count_is_refused():
    from ciuic_lab.errors import ConfigError
    from ciuic_lab.runner import run

    quick = [*QUICK, *OFF, "recipe=none", "prune=none", "lowrank=none", "quant=none"]
    m = run(compose([*quick, "eval.serve_memory=false"])).metrics
    assert "ppl/wikitext2" in m and not [k for k in m if k.startswith("mem/serve")]
    with pytest.raises(ConfigError, match="eval.serve_windows"):
        run(compose([*quick, "eval.serve_windows=0"]))
