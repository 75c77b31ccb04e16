"""Pareto search: the Optuna NSGA-II preset (conf/hydra/sweeper/pareto.yaml) runs offline, keeps
going past failed trials and writes its Pareto set next to the ciuic_pareto grid."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from test_experiments import _compose_hydra, searchpath
from test_run import QUICK

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def test_preset_is_a_two_objective_nsga2_study_in_memory():
    h = _compose_hydra("hydra/sweeper=pareto").hydra.sweeper
    assert h._target_.endswith("OptunaSweeper")
    assert h.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert list(h.direction) == ["minimize", "minimize"]
    assert h.storage is None  # optuna<3 RDB storage breaks under SQLAlchemy 2
    assert h.max_failure_rate == 1.0
    assert set(h.params) == {"prune.sparsity", "lowrank.ratio", "quant.bits"}


@pytest.mark.slow
def test_pareto_search_runs_8_trials_offline_and_writes_its_pareto_set(tmp_path):
    # bits=9 is invalid: those trials fail (recorded, told FAIL) and the study goes on
    args = ["+experiment=pareto_search", "hydra.sweeper.n_trials=8", "quant.bits=choice(3,4,9)",
            "model=tiny-random-deepseek-v3", *QUICK, "tracker=none", *searchpath()]
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    r = subprocess.run([sys.executable, "-m", "ciuic_lab.run", *args], check=False,
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "ciuic_pareto").glob("optuna_*")
    jobs = {d.name: json.loads((d / "result.json").read_text())
            for d in sweep.iterdir() if (d / "result.json").is_file()}
    assert len(jobs) == 8
    failed = [j for j in jobs.values() if j["status"] == "failed"]
    ok = {n: j for n, j in jobs.items() if j["status"] == "ok"}
    assert failed and ok and all("quant.bits" in j["error"] for j in failed)

    solutions = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]
    assert solutions
    measured = {(j["metrics"]["size/bits_per_param"], j["metrics"]["ppl/wikitext2"]): j
                for j in ok.values()}
    for s in solutions:
        job = measured[tuple(s["values"])]  # the study saw exactly what the job measured
        assert job["config"]["quant"]["bits"] == s["params"]["quant.bits"]
        assert job["config"]["prune"]["sparsity"] == pytest.approx(s["params"]["prune.sparsity"])
    # the same frontier as the grid's aggregation writes, from the result.json files
    front = pd.read_parquet(sweep / "pareto.parquet")
    assert {tuple(s["values"]) for s in solutions} == \
        set(zip(front["size/bits_per_param"], front["ppl/wikitext2"]))
    assert len(pd.read_parquet(sweep / "results.parquet")) == 8
    assert not list(tmp_path.rglob("*.db"))  # nothing persisted outside the sweep's own files
