"""Save → load restores the packed model without recompressing; bad files are rejected."""

import json

import pytest
import torch

from ciuic_lab.compress.lowrank.svd import SVD
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.store import checkpoint
from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.compress.walk.pipeline import compress_model
from ciuic_lab.models import tiny


@pytest.fixture(scope="module", params=["tiny-random-deepseek-v3", "tiny-random-llama"])
def compressed(request):
    torch.manual_seed(0)
    model = tiny.build(request.param, vocab=256)
    compress_model(model, torch.randint(0, 256, (2, 16)),
                   [Magnitude(pattern="2:4"), SVD(ratio=0.1, factor_bits=8), RTN(3, 32, sym=False)],
                   progress=False)
    return model


def test_roundtrip_is_bit_identical(compressed, tmp_path):
    checkpoint.save(compressed, tmp_path, run_config={"quant": {"bits": 3}})
    loaded = checkpoint.load(tmp_path)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(compressed(x).logits, loaded(x).logits)
    n = sum(isinstance(m, CompressedLinear) for m in loaded.modules())
    assert n == sum(isinstance(m, CompressedLinear) for m in compressed.modules()) and n > 0
    manifest = json.loads((tmp_path / checkpoint.MANIFEST).read_text())
    assert manifest["run_config"] == {"quant": {"bits": 3}}


def test_one_shard_per_block_plus_the_rest(compressed, tmp_path):
    checkpoint.save(compressed, tmp_path)
    n = len(compressed.model.layers)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == \
        [checkpoint.block_shard(i) for i in range(n)] + [checkpoint.REST]
    manifest = json.loads((tmp_path / checkpoint.MANIFEST).read_text())
    assert all(spec["format"] == "ciuic.packed" for spec in manifest["layers"].values())


def test_truncated_shard_is_rejected_naming_it(compressed, tmp_path):
    checkpoint.save(compressed, tmp_path)
    w = tmp_path / checkpoint.block_shard(1)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"blocks-00001.safetensors .*truncated"):
        checkpoint.load(tmp_path)


def test_missing_shard_is_rejected_naming_it(compressed, tmp_path):
    checkpoint.save(compressed, tmp_path)
    (tmp_path / checkpoint.REST).unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"rest.safetensors is missing"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("key", ["model_config", "shards", "layers"])
def test_incomplete_manifest_names_the_missing_key(compressed, tmp_path, key):
    checkpoint.save(compressed, tmp_path)
    m = json.loads((tmp_path / checkpoint.MANIFEST).read_text())
    m.pop(key)
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(checkpoint.CheckpointError, match=f"lacks {key}"):
        checkpoint.load(tmp_path)


def test_shard_without_sha256_is_rejected(compressed, tmp_path):
    checkpoint.save(compressed, tmp_path)
    m = json.loads((tmp_path / checkpoint.MANIFEST).read_text())
    m["shards"][checkpoint.REST].pop("sha256")
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(checkpoint.CheckpointError, match="rest.safetensors has no sha256"):
        checkpoint.load(tmp_path)


def test_unknown_format_key_is_rejected(compressed, tmp_path):
    checkpoint.save(compressed, tmp_path)
    m = json.loads((tmp_path / checkpoint.MANIFEST).read_text())
    name = next(iter(m["layers"]))
    m["layers"][name]["format"] = "someone.elses/9"
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(checkpoint.CheckpointError, match=r"unknown packed format 'someone.elses/9'"):
        checkpoint.load(tmp_path)


def test_mismatched_manifest_is_rejected(compressed, tmp_path):
    checkpoint.save(compressed, tmp_path)
    m = json.loads((tmp_path / checkpoint.MANIFEST).read_text())
    name = next(iter(m["layers"]))
    m["layers"].pop(name)
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a finished compressed checkpoint"):
        checkpoint.load(tmp_path)


def _point_shard_at(ckpt, shard, name):
    m = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    m["shards"][name] = m["shards"].pop(shard)
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused(compressed, tmp_path, where):
    ckpt, outside = tmp_path / "ckpt", tmp_path / "outside"
    checkpoint.save(compressed, ckpt)
    outside.mkdir()
    (ckpt / checkpoint.REST).rename(outside / checkpoint.REST)  # same bytes, same sha256
    name = ("../outside/" if where == "relative" else f"{outside}/") + checkpoint.REST
    _point_shard_at(ckpt, checkpoint.REST, name)
    for read in (checkpoint.load, checkpoint.stored_bytes):
        with pytest.raises(checkpoint.CheckpointError,
                           match=f"compressed.json: shard name '{name}' is not a file inside"):
            read(ckpt)
    assert checkpoint.shard_path(ckpt, "sub/../x.safetensors", "m") == ckpt / "sub/../x.safetensors"


def test_stored_bytes_of_a_truncated_shard_names_the_file(compressed, tmp_path):
    checkpoint.save(compressed, tmp_path)
    w = tmp_path / checkpoint.block_shard(0)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"blocks-00000.safetensors is truncated"):
        checkpoint.stored_bytes(tmp_path)


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_a_rewrite_killed_half_way_keeps_the_finished_checkpoint(compressed, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    checkpoint.save(compressed, ckpt, run_config={"run": 1})
    x = torch.randint(0, 256, (1, 8))
    # a process killed outright: nothing runs after the first shard
    w = checkpoint.CheckpointWriter(ckpt, compressed.config, torch.float32)
    w.add(checkpoint.block_shard(0), compressed.model.layers[0], "model.layers.0")
    assert checkpoint.read_manifest(ckpt)["run_config"] == {"run": 1}
    # an exception half-way (a full disk): the temporary directory goes too
    monkeypatch.setattr(checkpoint, "outside_blocks", lambda m: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        checkpoint.save(compressed, ckpt, run_config={"run": 2})
    monkeypatch.undo()
    assert checkpoint.read_manifest(ckpt)["run_config"] == {"run": 1}
    with torch.no_grad():
        assert torch.equal(checkpoint.load(ckpt)(x).logits, compressed(x).logits)
    assert _siblings(ckpt) == [w.tmp.name]  # only the killed writer's, removed by the next one
    checkpoint.save(compressed, ckpt, run_config={"run": 3})
    assert checkpoint.read_manifest(ckpt)["run_config"] == {"run": 3}
    assert _siblings(ckpt) == [w.tmp.name]  # this process is alive: its leftover is kept


def test_verify_rejects_a_missing_or_resized_shard(compressed, tmp_path):
    checkpoint.save(compressed, tmp_path)
    checkpoint.verify(tmp_path)
    shard = tmp_path / checkpoint.block_shard(0)
    with open(shard, "ab") as f:
        f.write(b"\0")
    with pytest.raises(checkpoint.CheckpointError, match=r"blocks-00000.safetensors has \d+ bytes"):
        checkpoint.verify(tmp_path)
    shard.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="blocks-00000.safetensors is missing"):
        checkpoint.verify(tmp_path)
