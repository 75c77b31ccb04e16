"""Cluster launcher: the SLURM preset's knobs reach sbatch, and a sweep whose jobs ran in other
processes (submitit's local executor) is aggregated from the files they left on disk."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from test_experiments import _compose_hydra
from test_run import QUICK

from ciuic_lab.track.tracker import sweep_group

submitit = pytest.importorskip("submitit")


def test_slurm_preset_reaches_the_sbatch_script(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    # submitit looks for srun before it writes a script; nothing is submitted here
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cfg = _compose_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                         "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=30",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    HydraConfig.instance().set_config(cfg)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    seen = {}

    def capture(self, fn, *args):
        seen["executor"], seen["jobs"] = self, len(args[0])
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    try:
        launcher.launch([["quant.bits=3"], ["quant.bits=4"]], initial_job_idx=0)
    finally:
        HydraConfig.instance().cfg = None  # process-wide: leave no Hydra run behind
    assert seen["jobs"] == 2
    script = seen["executor"]._executor._make_submission_file_text("python -u -m x", "0")
    # two GPUs per node: two tasks, one distributed rank each (ciuic_lab/dist.py)
    for line in ("--partition=gpu", "--gpus-per-node=2", "--ntasks-per-node=2", "--time=30",
                 "--cpus-per-task=8",
                 "--mem=64GB", f"--output={tmp_path / 'sweep'}/.submitit/"):
        assert f"#SBATCH {line}" in script, line


@pytest.mark.slow
def test_local_submitit_sweep_is_aggregated_from_disk(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    r = subprocess.run([sys.executable, "-m", "ciuic_lab.run", "-m", "hydra/launcher=submitit_local",
                        "quant.bits=3,4", "model=tiny-random-deepseek-v3", *QUICK, "tracker=none",
                        f"hydra.sweep.dir={sweep}"], check=False, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # the jobs ran in submitit's worker processes: their summaries are in its logs, not here
    assert "bits/param, compressed layers" not in r.stdout
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert logs.count("bits/param, compressed layers") == 2
    df = pd.read_parquet(sweep / "results.parquet")
    assert len(df) == 2 and (df["status"] == "ok").all()
    assert sorted(df["cfg.quant.bits"]) == [3, 4]
    groups = {json.loads(p.read_text())["config"]["tracker"]["group"]
              for p in sweep.glob("*/result.json")}
    assert groups == {sweep_group(sweep)}  # one W&B group, whichever process ran the job
    assert (sweep / "pareto.parquet").exists() and (sweep / "summary.txt").exists()
