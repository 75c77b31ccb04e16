"""One job's bookkeeping: when a finished point may be skipped, and who may write its directory."""

import types

import pytest
import torch

from ciuic_lab.compress import checkpoint
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
