"""Several processes, one compression (torch.distributed, gloo on CPU): two ranks store the same
packed bytes and measure the same perplexities as one process, resident and streamed."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ciuic_lab import dist
from ciuic_lab.config import compose, validate
from ciuic_lab.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# The default recipe (SparseGPT with OWL, GPTQ with Fisher-allocated widths, SVD-LLM residual):
# Hessians, column norms, OWL ratios, output Fisher and per-expert token counts all matter.
# 5 calibration windows in batches of 2 and 3 evaluation windows in batches of 1: shares of
# unequal size, a short last batch.
RUN = ["eval.max_windows=3", "eval.seqlen=128", "eval.batch_size=1", "data.calib_samples=5",
       "data.calib_seqlen=64", "compress.batch_size=2", "eval.speed=false", "progress=false",
       "eval.lm_eval.enabled=false", "eval.generate.enabled=false", "eval.serve_memory=false",
       "tracker=none", "save=true"]


def _launch(n: int, out: Path, *overrides: str, entry=("-m", "ciuic_lab.run")):
    # each run its own dense-perplexity cache: the baseline is measured (split), not read back
    env = dict(os.environ, HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1",
               CIUIC_LAB_CACHE=str(out.parent / f"cache_{out.name}"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={n}"] if n > 1 else [sys.executable]
    return subprocess.run([*launcher, *entry, *RUN, *overrides, f"hydra.run.dir={out}"],
                          check=False, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.glob("*.safetensors"))}


def _saved_model(path: Path) -> Path:
    from ciuic_lab.models import tiny
    from ciuic_lab.models.loader import load_tokenizer

    tok = load_tokenizer("tiny-random-deepseek-v3")
    model = tiny.build("tiny-random-deepseek-v3", vocab=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Everything a row says about the compressed layer; timing and the rank that made it vary.
_VOLATILE = {"block_s", "layer_s", "dist_rank", "kernel"}


@pytest.mark.parametrize("mode", ["resident", "streamed", "offload",
                                  pytest.param("weights-only policy", marks=pytest.mark.slow)])
def test_two_ranks_store_the_bytes_and_measure_the_perplexity_of_one(tmp_path, mode):
    model = {"resident": ["model=tiny-random-deepseek-v3"],
             "streamed": ["model=hub", f"model.name_or_path={tmp_path / 'src'}",
                          "compress.stream=true"],
             # the model waits in host memory, a block at a time moves to the device
             "offload": ["model=tiny-random-deepseek-v3", "compress.offload=true"],
             # a profile pass without a forward: each rank reads its share of the weights
             "weights-only policy": ["model=tiny-random-deepseek-v3", "recipe=none",
                                     "prune=none", "quant=rtn", "lowrank=svd",
                                     "lowrank.policy=global"]}[mode]
    if mode == "streamed":
        _saved_model(tmp_path / "src")
    runs = {}
    for n in (1, 2):
        r = _launch(n, tmp_path / f"n{n}", *model)
        assert r.returncode == 0, r.stderr[-4000:]
        runs[n] = json.loads((tmp_path / f"n{n}" / "result.json").read_text())
    one, two = runs[1], runs[2]
    assert _digests(tmp_path / "n2" / "compressed") == _digests(tmp_path / "n1" / "compressed")
    assert len(_digests(tmp_path / "n1" / "compressed")) >= 4  # a shard per block + the rest
    for key in ("ppl/wikitext2", "ppl/wikitext2_dense", "size/bits_per_param"):
        assert two["metrics"][key] == one["metrics"][key], key  # exactly, not approximately
    assert one["metrics"]["dist/world_size"] == 1 and two["metrics"]["dist/world_size"] == 2
    assert [{k: v for k, v in row.items() if k not in _VOLATILE} for row in two["layers"]] == \
        [{k: v for k, v in row.items() if k not in _VOLATILE} for row in one["layers"]]
    # the work was shared: both ranks compressed layers and routed experts, and said so
    experts = [row for row in two["layers"] if row["kind"] == "expert"]
    assert {row["dist_rank"] for row in experts} == {0, 1}
    assert {row["dist_rank"] for row in two["layers"] if row["kind"] != "expert"} == {0, 1}
    assert all(row["layer_s"] > 0 for row in two["layers"])
    assert "dist_rank" not in one["layers"][0]
    for r in (0, 1):
        assert two["metrics"][f"dist/rank{r}/compress_peak_host_bytes"] > 0
    assert not (tmp_path / "n2" / "compressed").with_name("compressed.tmp").exists()


def test_a_failing_rank_stops_the_run_with_its_own_error_recorded(tmp_path):
    out = tmp_path / "run"
    r = _launch(2, out, "model=tiny-random-deepseek-v3",
                entry=(str(Path(__file__).with_name("dist_fail.py")),))
    assert r.returncode != 0
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "failed"
    assert res["error"].startswith("rank 1 of 2 failed")
    assert "injected failure on rank 1" in res["error"]
    assert res["metrics"]["dist/failed_rank"] == 1
    # what was measured before the failure is kept (the dense baseline, split over both ranks)
    assert res["metrics"]["ppl/wikitext2_dense"] > 0


# ---------------------------------------------------------------- the pieces, in one process


def test_batches_are_shared_round_robin_and_cover_every_batch_once():
    windows = torch.arange(7 * 3).reshape(7, 3)
    seen = []
    for rank in range(3):
        w = dist.World(rank, 3)
        own = dist.batches(7, 2, w)  # 4 batches of 2 (the last one short)
        assert own == list(range(rank, 4, 3))
        mine = dist.my_windows(windows, 2, w)
        got = [mine[k * 2:(k + 1) * 2] for k in range(len(own))]
        for b, batch in zip(own, got):
            assert torch.equal(batch, windows[b * 2:(b + 1) * 2])
        seen += own
    assert sorted(seen) == [0, 1, 2, 3]
    assert dist.my_windows(windows, 8, dist.World(1, 2)).shape[0] == 0  # one batch: rank 0's


def test_work_is_split_by_cost_deterministically():
    costs = [9.0, 1.0, 1.0, 5.0, 4.0, 1.0, 1.0]
    owner, loads = dist.assign(costs, 2)
    assert owner == dist.assign(costs, 2)[0]
    assert sorted(loads) == [11.0, 11.0]
    assert [sum(c for c, r in zip(costs, owner) if r == k) for k in (0, 1)] == loads
    # continuing from earlier loads: the lighter rank takes the next unit
    assert dist.assign([1.0], 2, loads=[5.0, 2.0])[0] == [1]
    # an expert's cost grows with the tokens routed to it
    assert dist.weight_cost(64, 32, 100) > dist.weight_cost(64, 32, 10)


def test_distributed_setting_is_checked_naming_the_key(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="compress.distributed"):
        validate(compose(["model=tiny-random-deepseek-v3", "compress.distributed=maybe"]))
    with pytest.raises(ConfigError, match="compress.distributed=true.*torchrun"):
        validate(compose(["model=tiny-random-deepseek-v3", "compress.distributed=true"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="compress.distributed: tuning"):
        validate(compose(["model=tiny-random-deepseek-v3", "tune=block"]))
    validate(compose(["model=tiny-random-deepseek-v3", "tune=block",
                      "compress.distributed=false"]))  # each process alone: allowed
    assert dist.planned(False) is None
