"""One job's bookkeeping: when a finished point may be skipped, and who may write its directory."""

import fcntl
import os
import subprocess
import sys
import types

import pytest
import torch

from ciuic_lab.compress.store import checkpoint
from ciuic_lab.job import completed
from ciuic_lab.track.result import write_result

CONFIG = {"save": True, "compress": {"stream": False}}


def _finished_point(job, config=CONFIG):
    """A job directory as a finished save=true run leaves it: result.json ok + its checkpoint."""
    write_result(job, config=config, metrics={"ppl/wikitext2": 9.0}, layers=[], status="ok",
                 error=None, extra={"config_hash": "h"})
    model_config = types.SimpleNamespace(to_dict=lambda: {"model_type": "llama"})
    w = checkpoint.CheckpointWriter(job / "compressed", model_config, torch.float32)
    w.add_tensors(checkpoint.block_shard(0), {"w": torch.ones(64)})
    w.add_tensors(checkpoint.REST, {"e": torch.zeros(8)})
    w.finish()


def test_a_point_whose_checkpoint_is_whole_is_skipped(tmp_path):
    _finished_point(tmp_path)
    assert completed(tmp_path, "h") == {"ppl/wikitext2": 9.0}
    assert completed(tmp_path, "other") is None


@pytest.mark.parametrize("damage", ["no manifest", "no shard", "short shard", "no checkpoint"])
def test_an_ok_point_whose_checkpoint_is_broken_reruns(tmp_path, damage):
    _finished_point(tmp_path)
    ckpt = tmp_path / "compressed"
    if damage == "no manifest":  # what a killed +force=true rerun used to leave
        (ckpt / checkpoint.MANIFEST).unlink()
    elif damage == "no shard":
        (ckpt / checkpoint.REST).unlink()
    elif damage == "short shard":
        shard = ckpt / checkpoint.block_shard(0)
        shard.write_bytes(shard.read_bytes()[:-16])
    else:
        for p in ckpt.iterdir():
            p.unlink()
        ckpt.rmdir()
    assert completed(tmp_path, "h") is None


def test_a_point_not_asked_to_save_has_no_checkpoint_to_check(tmp_path):
    _finished_point(tmp_path, {"save": False, "compress": {"stream": False}})
    (tmp_path / "compressed" / checkpoint.MANIFEST).unlink()
    assert completed(tmp_path, "h") == {"ppl/wikitext2": 9.0}
    _finished_point(tmp_path, {"save": False, "compress": {"stream": True}})  # streamed: saved
    (tmp_path / "compressed" / checkpoint.MANIFEST).unlink()
    assert completed(tmp_path, "h") is None


def _sweep_point(tmp_path):
    write_result(tmp_path, config={}, metrics={"ppl/wikitext2": 9.0}, layers=[], status="ok",
                 error=None, extra={"config_hash": "h"})
    return (tmp_path / "result.json").read_text()


def test_a_second_run_in_a_busy_job_directory_fails_fast_and_replaces_nothing(tmp_path,
                                                                              monkeypatch):
    from ciuic_lab import runner
    from ciuic_lab.config import compose
    from ciuic_lab.job import run_job

    before = _sweep_point(tmp_path)
    ran = []
    monkeypatch.setattr(runner, "run", lambda *a, **k: ran.append(1) or 1 / 0)
    cfg = compose(["tracker=none", "+force=true"])
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)  # as another live run holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242 on node7\n")
        with pytest.raises(RuntimeError) as e:
            run_job(cfg, tmp_path)
    finally:
        os.close(fd)
    assert type(e.value).__name__ == "JobLocked"
    assert str(tmp_path) in str(e.value) and "(pid 4242 on node7)" in str(e.value)
    assert not ran and (tmp_path / "result.json").read_text() == before


def test_a_killed_run_leaves_its_job_directory_unlocked(tmp_path):
    from ciuic_lab.job import LOCK, job_lock

    hold = (f"import fcntl, os, time\nfd = os.open({str(tmp_path / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # it holds the lock now
        with pytest.raises(RuntimeError, match="being written by another run"), job_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with job_lock(tmp_path):
        assert (tmp_path / LOCK).read_text().startswith(f"{os.getpid()} ")


def test_two_sweeps_started_in_the_same_second_get_different_directories():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ciuic_lab.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        a, b = (hydra_compose(config_name="run", return_hydra_config=True) for _ in range(2))
    assert a.hydra.sweep.dir != b.hydra.sweep.dir and a.hydra.run.dir != b.hydra.run.dir
