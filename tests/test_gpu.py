"""CUDA path (run by benchmarks/gpu_check.sh on a GPU machine; skipped elsewhere)."""

import copy

import pytest
import torch

from ciuic_lab.compress.lowrank.svd import SVD
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.compress.walk.pipeline import compress_model
from ciuic_lab.eval.memory import PeakMemory, stored_bytes
from ciuic_lab.models import tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("arch", ["tiny-random-deepseek-v3", "tiny-random-llama"])
def test_bf16_compression_on_cuda_matches_dequantised_dense(arch):
    model = tiny.build(arch, vocab=256).to("cuda", torch.bfloat16)
    dense = copy.deepcopy(model)
    compress_model(model, torch.randint(0, 256, (4, 32)),
                   [Magnitude(0.5), SVD(ratio=0.1), RTN(4, 32)], progress=False)
    for name, mod in model.named_modules():
        if not isinstance(mod, CompressedLinear):
            continue
        assert mod.codes.is_cuda
        w = mod.dequantized_weight(torch.bfloat16)
        if ".experts." in name:
            owner, e, proj = name.rsplit(".", 2)
            getattr(dense.get_submodule(owner), proj).data[int(e)] = w
        else:
            dense.get_submodule(name).weight.data = w
    x = torch.randint(0, 256, (2, 24), device="cuda")
    with torch.no_grad():
        a, b = model(x).logits.float(), dense(x).logits.float()
    assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_layer_by_layer_peak_gpu_memory_is_about_one_block():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()  # stays on CPU
    dense_bytes = stored_bytes(model)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    with PeakMemory("cuda") as pm:
        compress_model(model, torch.randint(0, 256, (8, 128)), [Magnitude(0.5), RTN(4, 128)],
                       progress=False, device="cuda")
    assert pm.kind == "cuda_max_allocated"
    assert next(model.model.layers[-1].buffers()).device.type == "cpu"  # went back home
    # one block in bf16 plus its fp32 working copies and packing temporaries, not the model
    assert pm.peak_bytes < 0.4 * dense_bytes, (pm.peak_bytes, dense_bytes)
    assert pm.peak_bytes < 8 * block_bytes + 64 * 2**20, (pm.peak_bytes, block_bytes)
