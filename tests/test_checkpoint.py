"""Save → load restores the packed model without recompressing; bad files are rejected."""

import json

import pytest
import torch

from ciuic_lab.compress import checkpoint
from ciuic_lab.compress.linear import CompressedLinear
from ciuic_lab.compress.lowrank.svd import SVD
from ciuic_lab.compress.pipeline import compress_model
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.quant.rtn import RTN
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


def test_truncated_file_is_rejected(compressed, tmp_path):
    checkpoint.save(compressed, tmp_path)
    w = tmp_path / checkpoint.WEIGHTS
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
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
    with pytest.raises(checkpoint.CheckpointError, match="not a compressed checkpoint"):
        checkpoint.load(tmp_path)
