import json
import math
import sys

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciuic_lab.track.callback import SweepSummary, summarize_sweep
from ciuic_lab.track.plots import pareto_plot
from ciuic_lab.track.result import read_result, write_result
from ciuic_lab.track.results import flatten, load, load_layers, pareto
from ciuic_lab.track.tracker import Tracker, api_key_configured, resolve_mode, sweep_group

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(bits, ppl, dense=30.0):
    return {"size/bits_per_param": bits, "size/ratio_vs_fp16": 16 / bits, "ppl/wikitext2": ppl,
            "ppl/wikitext2_dense": dense, "mem/peak_kind": "cpu_peak_rss"}


def _config(sparsity, bits):
    return {"model": {"name_or_path": "tiny"}, "prune": {"sparsity": sparsity},
            "quant": {"bits": bits}, "stages": ["prune", "lowrank", "quant"],
            "eval": {"seqlen": None}}


LAYERS = [{"name": "model.layers.0.mlp.up_proj", "kind": "mlp", "sparsity": 0.5, "rank": 0,
           "bits": 4, "rel_error": 0.1, "params": 100, "bytes": 40}]


# ---------------------------------------------------------------- result.json

def test_result_roundtrip_with_nonfinite(tmp_path):
    import numpy as np
    import torch

    m = {"ppl/wikitext2": float("inf"), "x": float("nan"), "y": -math.inf, "n": np.int64(3),
         "t": torch.tensor(2.5), "ok": 1.5}
    layers = [dict(LAYERS[0], rel_error=float("nan"))]
    p = write_result(tmp_path / "run", config={"a": {"b": 1}}, metrics=m, layers=layers,
                     status="ok", error=None, extra={"overrides": ["a.b=1"]})
    assert p == tmp_path / "run" / "result.json"
    raw = json.loads(p.read_text())  # strict JSON: no NaN/Infinity tokens
    assert raw["metrics"]["ppl/wikitext2"] is None
    assert raw["nonfinite"] == {"metrics.ppl/wikitext2": "inf", "metrics.x": "nan",
                                "metrics.y": "-inf", "layers.0.rel_error": "nan"}
    for key in ("status", "error", "config", "metrics", "layers", "created", "overrides"):
        assert key in raw
    r = read_result(tmp_path / "run")
    assert r["metrics"]["ppl/wikitext2"] == math.inf and r["metrics"]["y"] == -math.inf
    assert math.isnan(r["metrics"]["x"]) and math.isnan(r["layers"][0]["rel_error"])
    assert r["metrics"]["n"] == 3 and r["metrics"]["t"] == 2.5 and r["metrics"]["ok"] == 1.5
    assert not list((tmp_path / "run").glob("*.tmp"))  # the temporary file was renamed away


def test_result_rejects_bad_status_and_clobbering_extra(tmp_path):
    with pytest.raises(ValueError):
        write_result(tmp_path, config={}, metrics={}, layers=[], status="done", error=None)
    with pytest.raises(ValueError):
        write_result(tmp_path, config={}, metrics={}, layers=[], status="ok", error=None,
                     extra={"metrics": {}})


def test_result_failed_keeps_error(tmp_path):
    write_result(tmp_path, config={}, metrics={}, layers=[], status="failed",
                 error="Traceback ...\nValueError: boom")
    assert read_result(tmp_path / "result.json")["error"].endswith("boom")


# ---------------------------------------------------------------- loader

def _fake_sweep(root):
    """Jobs 0..3 (job 3 failed), plus job 10 to check natural ordering."""
    specs = [(0.0, 16, 16.0, 30.0), (0.5, 4, 4.0, 45.0), (0.3, 8, 8.0, 31.0)]
    for i, (sp, bits, bpp, ppl) in enumerate(specs):
        write_result(root / str(i), config=_config(sp, bits), metrics=_metrics(bpp, ppl),
                     layers=LAYERS, status="ok", error=None)
        (root / str(i) / ".hydra").mkdir()
        (root / str(i) / ".hydra" / "overrides.yaml").write_text(
            f"- prune.sparsity={sp}\n- quant.bits={bits}\n")
    write_result(root / "3", config=_config(0.9, 2), metrics={}, layers=[], status="failed",
                 error="Traceback: OOM")


def test_load_directory_glob_and_list(tmp_path):
    _fake_sweep(tmp_path)
    df = load(tmp_path)
    assert list(df["run_dir"]) == [str(tmp_path / str(i)) for i in range(4)]
    assert list(df.columns[:5]) == ["run_dir", "status", "error", "created", "overrides"]
    assert list(df["status"]) == ["ok", "ok", "ok", "failed"]
    assert df.loc[1, "overrides"] == "prune.sparsity=0.5,quant.bits=4"
    assert df.loc[1, "cfg.prune.sparsity"] == 0.5 and df.loc[1, "cfg.model.name_or_path"] == "tiny"
    assert json.loads(df.loc[0, "cfg.stages"]) == ["prune", "lowrank", "quant"]
    assert df.loc[2, "ppl/wikitext2"] == 31.0 and math.isnan(df.loc[3, "ppl/wikitext2"])
    assert len(load(str(tmp_path / "*" / "result.json"))) == 4
    assert len(load([tmp_path / "0", tmp_path / "1" / "result.json"])) == 2
    assert list(load_layers(tmp_path)["run_dir"]) == [str(tmp_path / str(i)) for i in range(3)]
    write_result(tmp_path / "10", config={}, metrics={}, layers=[], status="ok", error=None)
    assert load(tmp_path)["run_dir"].iloc[-1] == str(tmp_path / "10")


def test_load_empty_and_missing(tmp_path):
    df = load(tmp_path)
    assert df.empty and "status" in df.columns
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}, "cfg.") == {
        "cfg.a.b": 1, "cfg.a.c": "[1, 2]", "cfg.d": None}


# ---------------------------------------------------------------- pareto

def test_pareto_hand_made_frame():
    df = pd.DataFrame([
        {"id": "a", "status": "ok", "x": 2.0, "y": 50.0},
        {"id": "b", "status": "ok", "x": 4.0, "y": 20.0},
        {"id": "c", "status": "ok", "x": 4.0, "y": 25.0},      # same x as b, worse y: dominated
        {"id": "d", "status": "ok", "x": 3.0, "y": 50.0},      # same y as a, worse x: dominated
        {"id": "e", "status": "ok", "x": 8.0, "y": 12.0},
        {"id": "f", "status": "ok", "x": 8.0, "y": 12.0},      # exact tie with e: both stay
        {"id": "g", "status": "ok", "x": 16.0, "y": 12.5},     # dominated by e
        {"id": "h", "status": "failed", "x": 1.0, "y": 1.0},   # dominates all, but failed
        {"id": "i", "status": "ok", "x": 1.0, "y": float("nan")},
        {"id": "j", "status": "ok", "x": float("nan"), "y": 1.0},
        {"id": "k", "status": "ok", "x": 1.5, "y": float("inf")},  # diverged: left out
        {"id": "l", "status": "ok", "x": 16.0, "y": 10.0},
    ])
    front = pareto(df, x="x", y="y")
    assert list(front["id"]) == ["a", "b", "e", "f", "l"]
    assert list(front.index) == [0, 1, 4, 5, 11]  # original rows, for joining back


def test_pareto_missing_columns_and_empty():
    assert pareto(pd.DataFrame()).empty
    assert pareto(pd.DataFrame({"status": ["ok"], "x": [1.0]}), x="x", y="y").empty


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=12))
def test_pareto_matches_brute_force(points):
    df = pd.DataFrame({"status": "ok", "x": [float(p[0]) for p in points],
                       "y": [float(p[1]) for p in points]})

    def dominated(i):
        xi, yi = points[i]
        return any(xj <= xi and yj <= yi and (xj < xi or yj < yi) for xj, yj in points)

    expected = sorted(i for i in range(len(points)) if not dominated(i))
    front = pareto(df, x="x", y="y")
    assert sorted(front.index) == expected
    assert front["x"].is_monotonic_increasing


# ---------------------------------------------------------------- plot

def test_pareto_plot_writes_png(tmp_path):
    _fake_sweep(tmp_path / "s")
    df = load(tmp_path / "s")
    front = pareto(df)
    out = pareto_plot(df, front, "size/bits_per_param", "ppl/wikitext2", tmp_path / "p.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    empty = pareto_plot(df.iloc[0:0], front.iloc[0:0], "size/bits_per_param", "ppl/wikitext2",
                        tmp_path / "e.png")
    assert empty.read_bytes()[:8] == PNG_MAGIC


def test_pareto_plot_log_scale_and_baseline(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    seen = {}
    orig = Figure.savefig

    def spy(self, *a, **kw):
        ax = self.axes[0]
        seen["yscale"] = ax.get_yscale()
        seen["hlines"] = [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        return orig(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    df = pd.DataFrame({"status": "ok", "x": [2.0, 4.0, 8.0], "y": [900.0, 40.0, 12.0],
                       "y_dense": 10.0, "overrides": ["q=2", "q=4", "q=8"]})
    pareto_plot(df, pareto(df, "x", "y"), "x", "y", tmp_path / "a.png")
    assert seen == {"yscale": "log", "hlines": [10.0]}
    df["y"] = [15.0, 13.0, 12.0]
    pareto_plot(df.drop(columns="y_dense"), pareto(df, "x", "y"), "x", "y", tmp_path / "b.png")
    assert seen == {"yscale": "linear", "hlines": []}


# ---------------------------------------------------------------- tracker

def test_resolve_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not api_key_configured() and resolve_mode("auto") == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert api_key_configured() and resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins over auto, not over a choice
    assert resolve_mode("auto") == "disabled" and resolve_mode("offline") == "offline"
    with pytest.raises(ValueError):
        resolve_mode("sometimes")


def test_tracker_disabled_never_imports_wandb(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    t = Tracker(mode="disabled", project="p", group=None, name=None, config={"a": 1},
                dir=str(tmp_path))
    t.log({"ppl/wikitext2": 3.0})
    t.log_table("layers", LAYERS)
    t.log_image("plot", tmp_path / "missing.png")
    t.finish()
    assert t.summary == {"ppl/wikitext2": 3.0} and t.run_dir is None
    assert not any(tmp_path.iterdir())


def test_tracker_offline_writes_run_dir(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with Tracker(mode="offline", project="p", group="g", name="n", config={"a": {"b": 1}},
                 dir=str(tmp_path), job_type="test") as t:
        t.log({"ppl/wikitext2": 3.0, "mem/peak_kind": "cpu", "bad": float("nan"), "none": None})
        t.log_table("layers", LAYERS + [{"name": "x", "rel_error": float("inf"), "extra": [1]}])
        png = pareto_plot(pd.DataFrame(), pd.DataFrame(), "x", "y", tmp_path / "p.png")
        t.log_image("plot", png)
        run_dir = t.run_dir
    assert run_dir.name.startswith("offline-run-") and run_dir.parent == tmp_path / "wandb"
    assert list(run_dir.glob("*.wandb"))


# ---------------------------------------------------------------- sweep summary

def test_summarize_sweep(tmp_path, capsys):
    sweep = tmp_path / "multirun" / "2026-11-27" / "10-00-00"
    _fake_sweep(sweep)
    paths = summarize_sweep(sweep, {"mode": "disabled", "project": "p", "group": None})
    assert set(paths) == {"results", "pareto", "plot", "summary"}
    results = pd.read_parquet(paths["results"])
    assert len(results) == 4 and list(results["status"]).count("failed") == 1
    front = pd.read_parquet(paths["pareto"])
    # (16 bits, 30) and (4 bits, 45) and (8 bits, 31): nobody dominates anybody here.
    assert list(front["size/bits_per_param"]) == [4.0, 8.0, 16.0]
    assert list(front["overrides"]) == ["prune.sparsity=0.5,quant.bits=4",
                                        "prune.sparsity=0.3,quant.bits=8",
                                        "prune.sparsity=0.0,quant.bits=16"]
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    assert "4 runs, 3 ok, 1 failed" in out and "prune.sparsity=0.9,quant.bits=2" in out
    assert "failed" in out and paths["summary"].read_text().strip() == out.strip()


def test_summary_table_shows_accuracy_when_measured(tmp_path):
    from ciuic_lab.track.callback import summary_table

    _fake_sweep(tmp_path)
    df = load(tmp_path)
    assert "acc/mean" not in summary_table(df, pareto(df, "size/bits_per_param", "ppl/wikitext2"))
    df["acc/mean"] = [0.41, 0.30, 0.375, None]
    df["acc/mean_dense"] = 0.42
    lines = summary_table(df, pareto(df, "size/bits_per_param", "ppl/wikitext2")).splitlines()
    assert lines[0].split()[-3:] == ["acc/mean", "acc", "dense"]
    assert lines[4].split()[-2:] == ["0.375", "0.420"] and lines[5].split()[-2:] == ["-", "0.420"]


def test_serving_memory_falls_back_to_the_in_process_peak_with_a_note(tmp_path):
    from ciuic_lab.track.callback import summary_table
    from ciuic_lab.track.results import serve_memory

    _fake_sweep(tmp_path)
    df = load(tmp_path)
    mem, note = serve_memory(df)
    assert mem.isna().all() and note is None
    assert "serve MiB" not in summary_table(df, pareto(df, "size/bits_per_param", "ppl/wikitext2"))
    df["mem/serve_peak_bytes"] = [3 * 2**20, 2 * 2**20, None, None]  # job 2: an older result
    df["mem/serve_peak_bytes_dense"] = 4 * 2**20
    df["mem/peak_bytes"] = [900 * 2**20, 950 * 2**20, 990 * 2**20, None]
    mem, note = serve_memory(df)
    assert list(mem.iloc[:3] / 2**20) == [3, 2, 990] and math.isnan(mem.iloc[3])
    assert note.startswith("1 of 4 runs have no mem/serve_peak_bytes")
    lines = summary_table(df, pareto(df, "size/bits_per_param", "ppl/wikitext2")).splitlines()
    assert lines[0].split()[-3:] == ["serve", "MiB", "dense"]
    assert lines[3].split()[-2:] == ["2.0", "4.0"] and lines[4].split()[-2:] == ["990.0", "4.0"]
    assert lines[-1] == f"note: {note}"


def test_summarize_sweep_with_zero_ok_results(tmp_path, capsys):
    write_result(tmp_path / "0", config={"a": 1}, metrics={}, layers=[], status="failed",
                 error="boom")
    paths = summarize_sweep(tmp_path, {"mode": "disabled"})
    assert len(pd.read_parquet(paths["results"])) == 1 and pd.read_parquet(paths["pareto"]).empty
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    assert "no successful run" in capsys.readouterr().out


def test_summarize_empty_sweep_dir(tmp_path, capsys):
    paths = summarize_sweep(tmp_path, {"mode": "disabled"})
    assert pd.read_parquet(paths["results"]).empty and paths["plot"].exists()
    assert "no result.json found" in capsys.readouterr().out


def test_summarize_sweep_mixed_types_survive_parquet(tmp_path):
    write_result(tmp_path / "0", config={"v": 1, "g": None}, metrics={"m": 1.0}, layers=[],
                 status="ok", error=None)
    write_result(tmp_path / "1", config={"v": "text", "g": 2.5}, metrics={"m": 2}, layers=[],
                 status="ok", error=None)
    paths = summarize_sweep(tmp_path, None, echo=False)
    r = pd.read_parquet(paths["results"])
    assert list(r["cfg.v"]) == ["1", "text"] and list(r["m"]) == [1.0, 2.0]


def test_callback_reads_hydra_config(tmp_path, capsys):
    from omegaconf import OmegaConf

    _fake_sweep(tmp_path)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}},
                            "tracker": {"mode": "disabled", "project": "p", "group": "grp"}})
    SweepSummary().on_multirun_end(config=cfg)
    assert (tmp_path / "pareto.parquet").exists() and (tmp_path / "results.parquet").exists()
    assert "3 ok, 1 failed" in capsys.readouterr().out


def test_callback_never_raises(tmp_path, caplog):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "missing")}},
                            "tracker": {"mode": "disabled"}})
    SweepSummary().on_multirun_end(config=cfg)  # a missing sweep dir is logged, not raised
    assert "sweep summary failed" in caplog.text


def test_sweep_group_names_the_sweep_dir():
    assert sweep_group("multirun/2026-11-27/10-00-00") == "2026-11-27_10-00-00"
    assert sweep_group("sweeps/abc") == "sweeps_abc" and sweep_group("solo") == "solo"


def test_studies_name_each_row_of_a_joint_summary(tmp_path):
    from ciuic_lab.track.plots import studies

    df = pd.DataFrame({"overrides": ["quant.bits=2,+experiment=frontier_gptq",
                                     "+experiment=frontier_ciuic,prune.sparsity=0.5", "seed=1"],
                       "x": [2.1, 2.8, 3.0], "y": [150.0, 112.0, 120.0], "status": "ok"})
    assert studies(df) == ["frontier_gptq", "frontier_ciuic", "other"]
    assert studies(df.iloc[:1]) is None and studies(df.drop(columns="overrides")) is None
    png = pareto_plot(df, pareto(df, x="x", y="y"), "x", "y", tmp_path / "joint.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_point_labels():
    from ciuic_lab.track.plots import point_labels

    df = pd.DataFrame({"overrides": ["prune.sparsity=0.5,quant.bits=4", "quant.bits=8"],
                       "cfg.quant.bits": [4, 8], "cfg.seed": [0, 0]})
    assert point_labels(df) == ["prune.sparsity=0.5,quant.bits=4", "quant.bits=8"]
    assert point_labels(df, short=True) == ["sparsity=0.5,bits=4", "bits=8"]
    clash = pd.DataFrame({"overrides": ["prune.bits=3,quant.bits=4"]})
    assert point_labels(clash, short=True) == ["prune.bits=3,quant.bits=4"]
    shared = pd.DataFrame({"overrides": [
        "quant.bits=2,model=smollm2-135m,quant.candidate_groups=[32,64]",
        "quant.bits=3,model=smollm2-135m,quant.candidate_groups=[32,64]",
        "+experiment=frontier_ciuic,model=smollm2-135m,quant.candidate_groups=[32,128]"]})
    assert point_labels(shared) == ["quant.bits=2,quant.candidate_groups=[32,64]",
                                    "quant.bits=3,quant.candidate_groups=[32,64]",
                                    "+experiment=frontier_ciuic,quant.candidate_groups=[32,128]"]
    assert point_labels(shared.iloc[:1]) == [shared.loc[0, "overrides"]]
    same = pd.DataFrame({"overrides": ["model=a", "model=a"]})
    assert point_labels(same) == ["default", "default"]
    no_ov = df.assign(overrides=None)  # not run by Hydra: what varies across the runs
    assert point_labels(no_ov) == ["quant.bits=4", "quant.bits=8"]
    assert point_labels(no_ov, label_cols=["cfg.seed"]) == ["seed=0", "seed=0"]


APP = '''
import hydra
from omegaconf import OmegaConf
from ciuic_lab.track.result import write_result

@hydra.main(version_base="1.3", config_path="conf", config_name="cfg")
def main(cfg):
    from hydra.core.hydra_config import HydraConfig
    bits = cfg.quant.bits
    write_result(HydraConfig.get().runtime.output_dir, config=OmegaConf.to_container(cfg),
                 metrics={"size/bits_per_param": float(bits), "ppl/wikitext2": 100.0 / bits},
                 layers=[], status="ok", error=None)

main()
'''

CFG = '''
quant: {bits: 4}
tracker: {mode: disabled, project: p, group: null}
hydra:
  sweep: {dir: SWEEP, subdir: "${hydra.job.num}"}
  callbacks:
    sweep_summary: {_target_: ciuic_lab.track.callback.SweepSummary}
'''


def test_callback_in_a_real_hydra_multirun(tmp_path):
    import subprocess

    sweep = tmp_path / "multirun" / "day" / "time"
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "cfg.yaml").write_text(CFG.replace("SWEEP", str(sweep)))
    (tmp_path / "app.py").write_text(APP)
    proc = subprocess.run([sys.executable, "app.py", "-m", "quant.bits=2,4,8"], cwd=tmp_path, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 runs, 3 ok, 0 failed" in proc.stdout
    front = pd.read_parquet(sweep / "pareto.parquet")
    assert list(front["overrides"]) == ["quant.bits=2", "quant.bits=4", "quant.bits=8"]
    assert (sweep / "pareto.png").exists()
