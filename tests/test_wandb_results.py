"""load_wandb maps W&B runs to the DataFrame results.load builds from result.json (fake API)."""

import math

import pandas as pd
import pytest

from ciuic_lab.track.result import write_result
from ciuic_lab.track.results import load, pareto
from ciuic_lab.track.wandb_results import load_wandb, run_status, summary_metrics

CONFIG = {"model": {"name_or_path": "tiny-random-deepseek-v3", "dtype": "auto"},
          "prune": {"sparsity": 0.5, "_target_": "ciuic_lab.compress.prune.sparsegpt.SparseGPT"},
          "lowrank": {"ratio": 0.02},  # lowrank=none plus a recipe's stray knob
          "quant": {"bits": 4, "candidate_bits": [2, 3, 4]},
          "stages": ["prune", "quant", "lowrank"], "tracker": {"group": "g1", "mode": "online"}}


def _metrics(bits, ppl):
    return {"ppl/wikitext2": ppl, "ppl/wikitext2_dense": 20.0, "size/bits_per_param": bits,
            "mem/peak_bytes": 2**30, "mem/peak_kind": "cpu_peak_rss", "acc/mean": 0.5,
            "alloc/lowrank": None, "speed/tokens_per_s": math.inf}


class FakeRun:
    """What wandb.apis.public.Run exposes, filled the way ciuic_lab.job's Tracker fills it."""

    def __init__(self, i, name, config, metrics, state="finished", job_type=None):
        self.id, self.name, self.state, self.job_type = f"r{i}", name, state, job_type
        self.group = "g1"
        self.url = f"https://wandb.example/ent/proj/runs/r{i}"
        self.created_at = f"2026-11-27T10:00:0{i}Z"
        self.config = {**config, "_wandb": {"cli_version": "0.31.0"}}
        # Tracker.log: None values stay out of the summary; W&B adds its own keys and stores
        # tables/images as references; non-finite floats come back as strings
        self.summary_metrics = {k: ("Infinity" if v == math.inf else v)
                                for k, v in metrics.items() if v is not None}
        self.summary_metrics.update({"_step": 3, "_runtime": 12.5,
                                     "layers": {"_type": "table-file", "path": "x.json"}})


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.calls = []

    def runs(self, path, filters=None, order=None):
        self.calls.append((path, filters, order))
        return [r for r in self._runs if not filters or r.group == filters.get("group")]


def _runs_and_results(tmp_path):
    points = [("prune.sparsity=0.5", 4.1, 30.0), ("prune.sparsity=0.7", 3.0, 45.0),
              ("prune.sparsity=0.3", 5.0, 50.0)]  # the last is dominated
    runs = []
    for i, (name, bits, ppl) in enumerate(points):
        write_result(tmp_path / str(i), config=CONFIG, metrics=_metrics(bits, ppl), layers=[],
                     status="ok", error=None, extra={"overrides": [name]})
        runs.append(FakeRun(i, name, CONFIG, _metrics(bits, ppl)))
    # a job that failed closes its run normally, without metrics
    write_result(tmp_path / "3", config=CONFIG, metrics={}, layers=[], status="failed",
                 error="ConfigError: quant.bits", extra={"overrides": ["quant.bits=9"]})
    runs.append(FakeRun(3, "quant.bits=9", CONFIG, {}))
    runs.append(FakeRun(4, "g1-summary", {"sweep_dir": "x"}, {"sweep/runs": 4},
                        job_type="sweep-summary"))
    return runs


def test_same_columns_and_values_as_result_json(tmp_path):
    runs = _runs_and_results(tmp_path)
    api = FakeApi(runs)
    w = load_wandb("proj", "g1", entity="ent", api=api)
    d = load(tmp_path)
    assert api.calls == [("ent/proj", {"group": "g1"}, "+created_at")]
    assert len(w) == 4  # the sweep's summary run is not a job
    assert list(w.columns[:5]) == list(d.columns[:5])
    # every result.json column is there (alloc/lowrank was None: never logged to W&B)
    assert set(d.columns) - set(w.columns) == {"alloc/lowrank"}
    assert not any(c.startswith("cfg._wandb") or c in ("_step", "layers") for c in w.columns)
    assert set(w.columns) - set(d.columns) == {"wandb_id", "wandb_state", "wandb_group"}
    for c in d.columns:
        if c in ("run_dir", "error", "created", "alloc/lowrank"):
            continue
        pd.testing.assert_series_equal(w[c], d[c], check_dtype=False, check_names=False)
    assert list(w["status"]) == ["ok", "ok", "ok", "failed"]
    assert w.loc[3, "error"] and d.loc[3, "error"]
    assert w["speed/tokens_per_s"][0] == math.inf
    assert w["created"][0] == "2026-11-27T10:00:00+00:00"
    # the frontier is computed the same way from either source
    assert list(pareto(w)["overrides"]) == list(pareto(d)["overrides"]) == \
        ["prune.sparsity=0.7", "prune.sparsity=0.5"]


def test_summary_run_on_request_and_project_path():
    api = FakeApi([
        FakeRun(0, "default", CONFIG, _metrics(4.0, 30.0)),
        FakeRun(1, "g1-summary", {}, {"sweep/runs": 1}, job_type="sweep-summary")])
    w = load_wandb("ent/proj", api=api, include_summary=True)
    assert api.calls[0][:2] == ("ent/proj", {})
    assert len(w) == 2 and w.loc[0, "overrides"] == ""  # a run without overrides is "default"


def test_status_and_summary_mapping():
    assert run_status("finished", {"ppl/wikitext2": 3.0}) == "ok"
    assert run_status("finished", {}) == "failed"
    assert run_status("crashed", {"ppl/wikitext2": 3.0}) == "failed"
    assert run_status("running", {}) == "running"
    m = summary_metrics({"a": 1, "b": "NaN", "c": "-Infinity", "d": "text", "_x": 1,
                         "t": {"_type": "image-file"}})
    assert m["a"] == 1 and math.isnan(m["b"]) and m["c"] == -math.inf and m["d"] == "text"
    assert set(m) == {"a", "b", "c", "d"}


def test_without_a_key_it_says_how_to_read_offline_runs(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(RuntimeError, match="results.load"):
        load_wandb("proj", "g1")
