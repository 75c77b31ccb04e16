"""End to end through the CLI and the Python API on a tiny random DeepSeek-V3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["model=tiny-random-deepseek-v3", "eval.max_windows=2", "eval.seqlen=128", "data.calib_samples=4", "data.calib_seqlen=64",
         "eval.speed_windows=1", "progress=false", "eval.lm_eval.enabled=false",
         "eval.generate.max_new_tokens=4",
         # a fresh process per run measuring serving memory: tests/test_serve_memory.py does
         "eval.serve_memory=false"]
METRICS = ["ppl/wikitext2", "ppl/wikitext2_dense", "mem/weight_bytes", "mem/peak_bytes",
           "size/bits_per_param", "size/ratio_vs_fp16", "time/compress_s", "time/eval_s",
           "speed/tokens_per_s"]


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "ciuic_lab.run", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


def test_single_run_writes_result_with_every_metric(tmp_path):
    r = _cli(*QUICK, f"hydra.run.dir={tmp_path}", "tracker.mode=offline", "save=true")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["status"] == "ok" and res["error"] is None
    for k in METRICS:
        assert k in res["metrics"], k
    m = res["metrics"]
    assert 0 < m["ppl/wikitext2"] < float("inf")
    # Like with like: the model shrinks by exactly what its compressed layers stopped storing
    # (their fp32 dense bytes on this CPU run) minus what the packed layers store, and those
    # store far less than the same layers would in fp16.
    dense_layer_bytes = sum(row["params"] * 4 for row in res["layers"])
    assert m["mem/weight_bytes_dense"] - m["mem/weight_bytes"] == \
        dense_layer_bytes - m["size/compressed_bytes"]
    assert m["size/compressed_bytes"] < 0.3 * sum(row["params"] * 2 for row in res["layers"])
    assert m["size/ratio_vs_fp16"] == pytest.approx(16 / m["size/bits_per_param"])
    assert res["config"]["prune"]["sparsity"] == 0.5
    # OWL gives layers different sparsities; their parameter-weighted mean is the target
    assert len({row["sparsity"] for row in res["layers"]}) > 1
    assert m["alloc/prune"] == pytest.approx(0.5, abs=1e-6)
    assert m["alloc/quant"] == pytest.approx(4.0, abs=0.05)
    kinds = {row["kind"] for row in res["layers"]}
    assert {"attn", "mlp", "shared_expert", "expert"} <= kinds
    assert {"name", "kind", "sparsity", "rank", "bits", "rel_error"} <= set(res["layers"][0])
    assert "bits/param" in r.stdout or "bits/param" in r.stderr  # the summary table
    # the saved checkpoint reloads to the same perplexity on the same windows
    from ciuic_lab.compress.store.checkpoint import load
    from ciuic_lab.data.wikitext import test_windows
    from ciuic_lab.eval.perplexity import perplexity
    from ciuic_lab.models.loader import load_tokenizer

    model = load(tmp_path / "compressed")
    windows = test_windows(load_tokenizer("tiny-random-deepseek-v3"), 128)[:2]
    # same windows, same batching (eval.batch_size=4): the same number to the last digit
    assert perplexity(model, windows, batch_size=4, progress=False) == m["ppl/wikitext2"]


def test_gemma3_default_recipe_runs_streamed_and_its_checkpoint_reloads(tmp_path):
    """Gemma 3 (sliding-window and global layers, tied scaled embeddings) through the CLI: the
    default recipe in memory with save=true, then streamed from the saved dense model; both
    checkpoints reload to their runs' perplexity. Windows (128) are longer than the tiny model's
    sliding window (8), so the two kinds of layer really differ."""
    from ciuic_lab.compress.store.checkpoint import load
    from ciuic_lab.data.wikitext import test_windows
    from ciuic_lab.eval.perplexity import perplexity
    from ciuic_lab.models import tiny
    from ciuic_lab.models.loader import load_tokenizer

    quick = ["model=tiny-random-gemma3", *QUICK[1:], "tracker=none", "eval.speed=false"]
    r = _cli(*quick, f"hydra.run.dir={tmp_path / 'memory'}", "save=true")
    assert r.returncode == 0, r.stderr[-3000:]
    tok = load_tokenizer("tiny-random-gemma3")
    src = tmp_path / "src"  # the same random model, saved, for the streamed run to read
    tiny.build("tiny-random-gemma3", vocab=len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    r = _cli(*quick, f"model.name_or_path={src}", f"hydra.run.dir={tmp_path / 'streamed'}",
             "compress.stream=true")
    assert r.returncode == 0, r.stderr[-3000:]
    windows = test_windows(tok, 128)[:2]
    runs = {k: json.loads((tmp_path / k / "result.json").read_text()) for k in ("memory", "streamed")}
    for k, res in runs.items():
        m = res["metrics"]
        assert res["status"] == "ok" and 0 < m["ppl/wikitext2"] < float("inf"), k
        assert {"attn", "mlp"} == {row["kind"] for row in res["layers"]}
        model = load(tmp_path / k / "compressed")
        assert perplexity(model, windows, batch_size=4, progress=False) == \
            pytest.approx(m["ppl/wikitext2"], rel=1e-6), k
    mem, st = (runs[k]["metrics"] for k in ("memory", "streamed"))
    assert st["ppl/wikitext2_dense"] == pytest.approx(mem["ppl/wikitext2_dense"], rel=1e-5)
    assert st["ppl/wikitext2"] == pytest.approx(mem["ppl/wikitext2"], rel=1e-3)


def test_sweep_records_failures_and_writes_pareto(tmp_path):
    sweep = tmp_path / "sweep"
    r = _cli("-m", "prune.sparsity=0.3,0.5", "quant.bits=4,9", *QUICK, "tracker=none",
             f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    results = sorted(sweep.glob("*/result.json"))
    assert len(results) == 4
    status = {json.loads(p.read_text())["status"] for p in results}
    assert status == {"ok", "failed"}
    failed = [json.loads(p.read_text()) for p in results]
    failed = [f for f in failed if f["status"] == "failed"]
    assert len(failed) == 2 and all("quant.bits" in f["error"] for f in failed)
    for name in ("results.parquet", "pareto.parquet", "pareto.png"):
        assert (sweep / name).exists(), name
    df = pd.read_parquet(sweep / "results.parquet")
    assert len(df) == 4 and (df["status"] == "ok").sum() == 2
    front = pd.read_parquet(sweep / "pareto.parquet")
    assert 1 <= len(front) <= 2 and (front["status"] == "ok").all()


def test_shape_error_fails_before_the_dense_baseline(tmp_path):
    """An N:M pattern the dims do not divide (MLA's 576-wide input with 5:7... here 3:7 on 64-wide
    inputs) is known once the model is loaded: no dense perplexity, lm-eval or calibration first."""
    r = _cli(*QUICK, "prune.pattern=3:7", "tracker=none", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2, r.stderr[-2000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["status"] == "failed" and "prune.pattern: 3:7 needs every input dim" in res["error"]
    assert "ppl/wikitext2_dense" not in res["metrics"]


def test_all_stages_none_measures_the_model_without_calibrating(tmp_path):
    r = _cli(*QUICK, "recipe=none", "prune=none", "lowrank=none", "quant=none", "tracker=none",
             f"hydra.run.dir={tmp_path}", "eval.generate.enabled=false")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "result.json").read_text())["metrics"]
    assert m["time/compress_s"] == 0.0 and "calib/tokens" not in m
    assert m["ppl/wikitext2"] == m["ppl/wikitext2_dense"]
    assert m["mem/weight_bytes"] == m["mem/weight_bytes_dense"]
    assert m["size/bits_per_param"] == 32.0  # the fp32 CPU model's layers, as they are


def test_out_of_memory_is_recorded_with_what_to_change(tmp_path, monkeypatch):
    from omegaconf import open_dict

    from ciuic_lab import runner
    from ciuic_lab.config import compose
    from ciuic_lab.job import run_job

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(runner, "compress", oom)
    cfg = compose([*QUICK, "tracker=none", "eval.dense_baseline=false",
                   "eval.generate.enabled=false"])
    with open_dict(cfg):
        cfg.eval.speed = False
    with pytest.raises(torch.OutOfMemoryError):
        run_job(cfg, tmp_path)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["status"] == "failed" and res["error"].startswith("out of memory:")
    assert "compress.offload=true" in res["error"] and "Tried to allocate" in res["error"]
    assert "mem/weight_bytes_dense" in res["metrics"]  # what was measured before is kept


def test_eval_stream_true_walks_a_model_held_in_memory():
    """eval.stream=true without compress.stream evaluates both models block by block (what a
    model larger than the device gets), to the resident numbers, and says so."""
    from ciuic_lab.config import compose
    from ciuic_lab.runner import run

    quick = [*QUICK, "recipe=none", "prune=none", "lowrank=none", "tracker=none",
             "eval.generate.enabled=false", "eval.speed=false"]
    walked = run(compose([*quick, "eval.stream=true"]))
    resident = run(compose(quick))
    assert any(n.startswith("eval.stream=true") for n in walked.notes)
    assert "eval/path/quality" not in walked.metrics  # set by the resident evaluation only
    for key in ("ppl/wikitext2", "ppl/wikitext2_dense"):
        assert walked.metrics[key] == pytest.approx(resident.metrics[key], rel=1e-4), key


def test_python_api_honours_device_and_expert_fallback():
    import ciuic_lab
    from ciuic_lab.api import compress

    model, tok = ciuic_lab.load("tiny-random-deepseek-v3", device="cpu")
    _, report = compress(model, tok, ["recipe=none", "prune=none", "lowrank=none", "quant=rtn",
                                      "data.calib_samples=1", "data.calib_seqlen=8", "device=cpu",
                                      "compress.min_expert_tokens=1000000"], progress=False)
    experts = [r for r in report.layers if r["kind"] == "expert"]
    assert experts and all(r["fallback"] for r in experts)


def test_python_api_compresses_and_reports():
    import ciuic_lab
    from ciuic_lab.api import compress
    from ciuic_lab.compress.store.linear import CompressedLinear

    model, tok = ciuic_lab.load("tiny-random-llama", device="cpu")
    x = torch.randint(0, 100, (1, 16))
    before = model(x).logits
    model, report = compress(model, tok, ["prune.sparsity=0.5", "quant.bits=4", "lowrank=none",
                                          "data.calib_samples=2", "data.calib_seqlen=32"],
                             progress=False)
    assert any(isinstance(m, CompressedLinear) for m in model.modules())
    assert report.totals()["ratio_vs_fp16"] > 4.5
    after = model(x).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_run_with_lm_eval_tasks_and_a_user_task_writes_accuracy_offline(tmp_path):
    from test_lm_eval import _toy_task  # a task whose accuracy is known whatever the model

    _toy_task(tmp_path / "my_tasks", "my_toy", [0, 0, 1, 1, 1])
    quick = [q for q in QUICK if not q.startswith("eval.lm_eval")]
    r = _cli(*quick, "eval.lm_eval.tasks=[arc_easy,piqa,my_toy]", "eval.lm_eval.limit=10",
             f"eval.lm_eval.include_path={tmp_path / 'my_tasks'}",
             f"hydra.run.dir={tmp_path / 'run'}", "tracker.mode=offline")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    m = res["metrics"]
    for k in ("acc/arc_easy", "acc/piqa", "acc_norm/arc_easy", "acc/mean", "acc/mean_dense"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["acc/my_toy"] == pytest.approx(0.4)
    assert m["acc/mean"] == pytest.approx((m["acc/arc_easy"] + m["acc/piqa"] + 0.4) / 3)
    gens = res["generations"]
    assert len(gens) == 4 and {"prompt", "dense", "compressed"} <= set(gens[0])


def test_rerun_into_same_sweep_dir_finishes_only_missing_points(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "quant.bits=3,4,8", *QUICK, "tracker=none", f"hydra.sweep.dir={sweep}"]
    assert _cli(*args).returncode == 0
    created = {p.parent.name: json.loads(p.read_text())["created"] for p in sweep.glob("*/result.json")}
    assert len(created) == 3
    # as if the sweep had been killed: one point never finished, one failed
    (sweep / "1" / "result.json").unlink()
    bad = json.loads((sweep / "2" / "result.json").read_text())
    bad["status"] = "failed"
    (sweep / "2" / "result.json").write_text(json.dumps(bad))
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("skipped:") == 1  # only point 0 was complete
    now = {p.parent.name: json.loads(p.read_text())["created"] for p in sweep.glob("*/result.json")}
    assert now["0"] == created["0"] and now["2"] != created["2"] and "1" in now
    assert len(pd.read_parquet(sweep / "results.parquet")) == 3  # re-aggregated
    r = _cli(*args, "+force=true")
    assert r.stdout.count("skipped:") == 0
