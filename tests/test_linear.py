"""CompressedLinear stores packed parts only, and computes with exactly its dequantised weight."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ciuic_lab.compress.lowrank.svd import SVD
from ciuic_lab.compress.policies import LayerProfile
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.state import LayerState
from ciuic_lab.compress.store.linear import CompressedLinear


def _packed(methods, w, b=None, dtype=torch.float16):
    s = LayerState.from_linear(w, b)
    prof = [LayerProfile("l", "mlp", tuple(w.shape), 0)]
    for m in methods:
        m.apply(s, None, m.allocate(prof)["l"])
    return s, CompressedLinear.pack(s, dtype)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), pattern=st.sampled_from(["none", "unstructured", "2:4", "4:8"]),
       lowrank=st.sampled_from([None, "residual", "factorize"]), sym=st.booleans(),
       group=st.sampled_from([-1, 32, 40]), out=st.integers(1, 24), seed=st.integers(0, 99))
def test_forward_equals_linear_with_dequantised_weight(bits, pattern, lowrank, sym, group, out, seed):
    torch.manual_seed(seed)
    w, b = torch.randn(out, 64), torch.randn(out)
    methods = []
    if pattern != "none":
        methods.append(Magnitude(0.5, pattern=pattern))
    if lowrank:
        methods.append(SVD(mode=lowrank, ratio=0.2))
    methods.append(RTN(bits, group, sym))
    state, layer = _packed(methods, w, b)
    x = torch.randn(3, 5, 64)
    wd = layer.dequantized_weight()
    assert torch.allclose(layer(x), F.linear(x, wd, b.half().float()), atol=1e-5)
    # the packed weight is what the stages produced (fp16 factors aside)
    assert torch.allclose(wd, state.reconstruct(), atol=2e-2 if lowrank else 1e-6)
    # only packed parts are stored: no dense float weight of the full shape
    for name, buf in layer.named_buffers():
        assert buf.dtype == torch.uint8 or tuple(buf.shape) != tuple(w.shape) or name in "uv"


def test_nbytes_counts_every_buffer_and_meets_4p5x():
    """50% unstructured + 4-bit g128: 1 bit mask + 2 bits codes + scales ≈ 3.1 bits/weight."""
    w = torch.randn(256, 1024)
    _, layer = _packed([Magnitude(0.5), RTN(4, 128, sym=True)], w)
    expected = 256 * 1024 // 8 + (256 * 1024 // 2) * 4 // 8 + 256 * 8 * 2
    assert layer.nbytes() == expected
    assert layer.nbytes() == sum(b.numel() * b.element_size() for b in layer.buffers())
    assert 16 / (8 * layer.nbytes() / w.numel()) >= 4.5


def test_state_dict_holds_the_packed_parts():
    from ciuic_lab.compress.store import coding

    _, layer = _packed([Magnitude(pattern="2:4"), RTN(3, 32, sym=False)], torch.randn(8, 64))
    sd = layer.state_dict()
    assert set(sd) == {"mask_code", "codes", "scale", "zero"}
    # the 2:4 mask at log2 C(4,2) bits per group of 4 (0.65 bit per weight), not 1 bit per weight
    assert sd["mask_code"].numel() == coding.coded_nbytes((8, 64), (2, 4)) < 8 * 64 // 8
    assert torch.equal(layer.kept_mask().view(8, 16, 4).sum(-1), torch.full((8, 16), 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_follows_input_dtype(dtype):
    _, layer = _packed([RTN(4, 32)], torch.randn(8, 64), dtype=dtype)
    y = layer(torch.randn(2, 64, dtype=dtype))
    assert y.dtype == dtype


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), pattern=st.sampled_from(["none", "unstructured", "2:4"]),
       sym=st.booleans(), group=st.sampled_from([-1, 16, 24]), seed=st.integers(0, 99))
def test_dense_codes_dequantise_to_the_layer_weight(bits, pattern, sym, group, seed):
    """Pruned entries carry the zero code, so the dense grid rebuilds exactly the packed weight."""
    torch.manual_seed(seed)
    methods = [] if pattern == "none" else [Magnitude(0.5, pattern=pattern)]
    _, layer = _packed(methods + [RTN(bits, group, sym)], torch.randn(8, 48))
    q = layer.dense_codes()
    assert q.codes.shape == (8, 48) and q.codes.dtype == torch.int32
    assert torch.equal(q.dequantize(), layer.dequantized_weight())
    if pattern != "none":
        assert (q.dequantize()[~layer.kept_mask()] == 0).all()


def test_dense_codes_needs_a_quantised_base():
    _, layer = _packed([Magnitude(0.5)], torch.randn(8, 48))
    with pytest.raises(ValueError, match="not quantised"):
        layer.dense_codes()
