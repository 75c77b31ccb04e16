"""A compressed model made ready to compute: kernels per layer, weights materialised once, speed."""

import copy

import pytest
import torch

from ciuic_lab.compress.lowrank.svd import SVD
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.compress.store.serve import materialized, prepare_for_inference
from ciuic_lab.compress.walk.pipeline import compress_model
from ciuic_lab.eval.speed import decode_tokens_per_second
from ciuic_lab.models import tiny


def _compressed(arch="tiny-random-deepseek-v3", methods=None):
    torch.manual_seed(0)
    model = tiny.build(arch, vocab=256)
    compress_model(model, torch.randint(0, 256, (2, 16)),
                   methods or [Magnitude(0.5), SVD(mode="residual", ratio=0.1), RTN(4, 32)],
                   progress=False)
    return model


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_prepared_layers_compute_what_the_reference_does_in_bf16_tolerance():
    model = _compressed()
    ref = copy.deepcopy(model)
    kernels = prepare_for_inference(model, "cpu", torch.float32)
    names = {n for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert set(kernels) == names
    # every 4-bit g32 layer whose output dim the CPU kernel takes (N % 16) got it, experts too
    with_kernel = {n for n, k in kernels.items() if k == "int4_cpu"}
    assert any(".experts." in n for n in with_kernel) and any("self_attn" in n for n in with_kernel)
    for name in with_kernel:
        layer, oracle = model.get_submodule(name), ref.get_submodule(name)
        assert not hasattr(layer, "codes")  # the packed base was replaced, not kept beside
        assert layer.nbytes() == sum(b.numel() * b.element_size() for b in layer.buffers())
        x = torch.randn(3, layer.in_features)
        assert _rel(layer(x), oracle(x)) < 2e-2  # bf16 activations in the kernel
        with pytest.raises(RuntimeError, match="save the checkpoint before"):
            layer.spec()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert _rel(model(x).logits, ref(x).logits) < 2e-2


def test_mla_kv_b_proj_is_served_dense_with_its_low_rank_part_folded_in():
    """transformers' MLA re-expands the whole cached latent through kv_b_proj at every decode
    step (M = context length): the DeepSeek adapter holds that layer as one dense weight."""
    model = _compressed()
    ref = copy.deepcopy(model)
    kernels = prepare_for_inference(model, "cpu", torch.bfloat16)
    dense = {n for n, k in kernels.items() if k == "dense"}
    assert dense and dense == {n for n in kernels if n.endswith("self_attn.kv_b_proj")}
    for name in dense:
        layer, oracle = model.get_submodule(name), ref.get_submodule(name)
        assert oracle.meta["lowrank"] is not None  # a residual factor pair was folded in
        assert layer.lowrank_factors() is None and not hasattr(layer, "lr_u")
        assert not hasattr(layer, "codes") and not hasattr(layer, "mask_code")
        assert layer.nbytes() == 2 * layer.out_features * layer.in_features  # bf16, no bias
        want = oracle.dequantized_weight()
        assert torch.allclose(layer.dequantized_weight(), want, rtol=1e-2, atol=1e-2 * float(
            want.abs().max()))
        x = torch.randn(5, layer.in_features)
        assert _rel(layer(x), oracle(x)) < 1e-2
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert _rel(model(x).logits.float(), ref(x).logits) < 2e-2
    # the knob: none held dense
    other = copy.deepcopy(ref)
    kernels = prepare_for_inference(other, "cpu", torch.bfloat16, serve_dense=())
    assert "dense" not in kernels.values()
    # Llama-shaped models multiply nothing by the cache: no dense layer by default
    llama = _compressed("tiny-random-llama")
    assert "dense" not in prepare_for_inference(llama, "cpu", torch.bfloat16).values()


def test_a_layer_without_a_kernel_stays_on_the_reference_path():
    model = _compressed("tiny-random-llama", [RTN(6, 32)])  # 6 bits, groups: no single kernel
    ref = copy.deepcopy(model)
    kernels = prepare_for_inference(model, "cpu", torch.float32, int4_pairs=False,
                                    byte_codes=False)
    assert set(kernels.values()) == {"reference"}
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_six_bit_layers_serve_on_int4_planes():
    """5..8-bit codes take the int4 kernel as two planes (the default), logits within bf16."""
    model = _compressed("tiny-random-llama", [RTN(6, 32)])
    ref = copy.deepcopy(model)
    kernels = prepare_for_inference(model, "cpu", torch.float32)
    assert set(kernels.values()) == {"int4x2_cpu"}
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        got, want = model(x).logits, ref(x).logits
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_without_a_fused_kernel_a_layer_serves_from_byte_codes():
    """The last fallback: one byte per code, the reference weight, the same logits."""
    model = _compressed("tiny-random-llama", [RTN(6, 32)])
    ref = copy.deepcopy(model)
    kernels = prepare_for_inference(model, "cpu", torch.float32, int4_pairs=False)
    assert set(kernels.values()) == {"bytes"}
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


def test_materialised_weights_give_the_packed_models_logits():
    model = _compressed()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        packed = model(x).logits
        with materialized(model, torch.float32):
            assert not any(isinstance(m, CompressedLinear) for m in model.modules())
            dense = model(x).logits
    assert any(isinstance(m, CompressedLinear) for m in model.modules())  # restored
    assert torch.allclose(dense, packed, rtol=1e-5, atol=1e-5)


def test_decode_speed_is_measured_with_the_kv_cache():
    model = tiny.build("tiny-random-llama", vocab=256)
    tps = decode_tokens_per_second(model, torch.randint(0, 256, (16,)), new_tokens=4)
    assert 0 < tps < float("inf")
