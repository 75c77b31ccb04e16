"""Kernel layouts compute x @ W_baseᵀ of the reference weight, within bf16 rounding, or say None."""

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
from ciuic_lab.compress.store import kernels
from ciuic_lab.compress.store.kernels import (
    Int4Layout,
    Int8Layout,
    choose_kernel,
    kernel_group_size,
    kernel_name,
)
from ciuic_lab.compress.store.linear import CompressedLinear

CPU = torch.device("cpu")
BF16_U = 2.0**-8  # bf16 unit roundoff (8 significant bits)


def _layer(out, cols, bits=None, group=128, sym=True, pattern="none", lowrank=None, bias=False,
           dtype=torch.float16):
    w = torch.randn(out, cols)
    b = torch.randn(out) if bias else None
    s = LayerState.from_linear(w, b)
    methods = []
    if pattern != "none":
        methods.append(Magnitude(0.5, pattern=pattern))
    if lowrank:
        methods.append(SVD(mode=lowrank, ratio=0.1))
    if bits is not None:
        methods.append(RTN(bits, group, sym))
    prof = [LayerProfile("l", "mlp", (out, cols), 0)]
    for m in methods:
        m.apply(s, None, m.allocate(prof)["l"])
    return CompressedLinear.pack(s, dtype)


def _rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


def _expected_int4_readout(layer, g):
    """What the int4 kernel must compute for W: (q − 8)·bf16(s) + bf16((8 − z)·s), then bf16."""
    q = layer.dense_codes()
    codes, zero = kernels.recentred(q)  # k <= 3: q − z + 8 with zero 8 (see recentred)
    cols = layer.in_features
    s = kernels.per_kernel_group(q.scale, cols, q.group_size, g)
    z = kernels.per_kernel_group(zero, cols, q.group_size, g)
    s_k = s.bfloat16().float().repeat_interleave(g, 1)
    zero_k = ((8.0 - z) * s).bfloat16().float().repeat_interleave(g, 1)
    exact = (codes.float() - 8.0) * s_k + zero_k  # exact in fp32: few significant bits each
    slack = BF16_U * ((codes.float() - 8.0).abs() * s.abs().repeat_interleave(g, 1)
                      + zero_k.abs() + exact.abs())
    return exact.bfloat16().float(), slack


# ---- int4, CPU ---------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(out=st.sampled_from([16, 32, 48, 80]), cols=st.sampled_from([64, 128, 192, 320, 512]),
       group=st.sampled_from([32, 64, 128, 256, 512, -1]), sym=st.booleans(),
       bits=st.sampled_from([2, 3, 4]), pattern=st.sampled_from(["none", "unstructured", "2:4"]),
       lowrank=st.sampled_from([None, "residual"]), m=st.sampled_from([1, 3, 7]),
       act=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 99))
def test_int4_cpu_matches_reference(out, cols, group, sym, bits, pattern, lowrank, m, act, seed):
    torch.manual_seed(seed)
    layer = _layer(out, cols, bits, group, sym, pattern, lowrank)
    layout = choose_kernel(layer, CPU, act)
    g = kernel_group_size(cols, group)
    # a kernel exactly when some kernel group (32..256) tiles K and every one of our groups
    assert (layout is None) == (g is None)
    if layout is None:
        return
    assert kernel_name(layout) == "int4_cpu" and layout.group == g
    x = torch.randn(2, m, cols).to(act)
    ref = F.linear(x.float(), layer.base_weight())
    y = layout(x)
    assert y.dtype == act and y.shape == (2, m, out)
    assert _rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("out,cols,group", [(32, 256, 32), (48, 256, 64), (16, 512, 128),
                                            (64, 512, 256), (32, 576, 128), (16, 192, -1)])
def test_int4_cpu_kernel_weight_is_our_weight_bit_for_bit(out, cols, group, sym, bits):
    """Reading the kernel's weight back through identity rows gives exactly the converted grid.

    This pins the layout facts (codes unchanged, scale_zero[K/g, N, 2], w = (q − 8)·scale + zero)
    with no tolerance, then bounds the conversion's own rounding against our weight.
    """
    layer = _layer(out, cols, bits, group, sym, "unstructured")
    layout = choose_kernel(layer, CPU, torch.bfloat16)
    expected, slack = _expected_int4_readout(layer, layout.group)
    got = layout.weight(chunk=100)
    assert torch.equal(got, expected)
    ours = layer.base_weight()
    assert ((got - ours).abs() <= slack + 1e-12).all()
    pruned = got[~layer.kept_mask()]
    if sym or bits < 4:  # zero offset 0 (sym 4-bit, or recentred): pruned entries exactly 0
        assert (pruned == 0).all()
    else:  # (z − 8)·bf16(s) + bf16((8 − z)·s): two roundings that need not cancel
        assert (pruned.abs() <= slack[~layer.kept_mask()]).all()


@pytest.mark.parametrize("out,cols,bits,group", [
    (24, 64, 4, 32),    # N % 16 (CPU)
    (32, 72, 4, 64),    # tail group of 8: no kernel group fits
    (32, 64, 4, 16),    # groups narrower than 32
    (32, 80, 4, 40),    # 40 is no multiple of 32
    (32, 48, 4, -1),    # per-channel, K not a multiple of 32
    (24, 64, 6, 32),    # 5..8 bits on int4 planes: the same N % 16
    (32, 112, 5, 48),   # ... and the same kernel groups
    (32, 40, 8, -1),    # 8-bit, K % 16 (the CPU bf16 kernel has no K tail; no int4 group fits)
])
def test_shapes_without_a_kernel_fall_back(out, cols, bits, group):
    layer = _layer(out, cols, bits, group)
    assert choose_kernel(layer, CPU, torch.bfloat16, byte_codes=False) is None
    assert kernel_name(choose_kernel(layer, CPU, torch.bfloat16)) == "bytes"


# ---- 5..8 bits as two int4 planes --------------------------------------------------------------
@pytest.mark.parametrize("bits,group,sym,pattern,cols", [
    (5, 32, True, "none", 64), (6, 128, False, "unstructured", 256), (8, 128, True, "2:4", 256),
    (7, -1, False, "none", 96), (8, 32, True, "none", 64), (6, 64, True, "unstructured", 320),
    (5, 96, False, "none", 192),  # groups of 96: kernel groups of 32 inside them
])
def test_int4_pairs_compute_the_reference_weight_to_bf16(bits, group, sym, pattern, cols):
    """Codes 5..8 bits wide split into two 4-bit planes (r = 16h + l): the kernel's weight, read
    back, is bf16(s)·(q − z) rounded to bf16 (the int4 layout's own rounding), pruned entries are
    exactly 0, one byte a weight is stored, and the layer's output matches the reference."""
    torch.manual_seed(bits * cols)
    layer = _layer(32, cols, bits, group, sym, pattern)
    layout = choose_kernel(layer, CPU, torch.bfloat16)
    assert kernel_name(layout) == "int4x2_cpu"
    q = layer.dense_codes()
    r = q.codes.float() - kernels.grid.expand_groups(q.zero, cols, q.group_size)
    s = kernels.grid.expand_groups(q.scale, cols, q.group_size).bfloat16().float()
    got = layout.weight(chunk=50)
    assert torch.equal(got, (r * s).bfloat16().float())
    if pattern != "none":
        assert (got[~layer.kept_mask()] == 0).all()
    assert layout.qweight.numel() * layout.qweight.element_size() == 32 * cols
    x = torch.randn(5, cols)
    ref = F.linear(x, layer.dequantized_weight(torch.float32))
    layer.prepare(CPU, torch.bfloat16)
    assert layer.kernel_name == "int4x2_cpu"
    assert _rel_err(layer(x.bfloat16()), ref) < 2e-2


def test_int4_pairs_refuse_asymmetric_8bit_codes_out_of_range():
    """r = q − z must lie in [−128, 127]; an asymmetric 8-bit group can reach ±255."""
    layer = _layer(32, 64, 8, 32, sym=False)
    q = layer.dense_codes()
    r = q.codes.float() - kernels.grid.expand_groups(q.zero, 64, 32)
    assert r.min() < -128 or r.max() > 127  # the premise (random weights, min/max grid)
    assert not kernels.Int4PairLayout.fits(kernels.Int4PairLayout.signed(q))
    assert kernel_name(choose_kernel(layer, CPU, torch.bfloat16)) == "bytes"
    assert kernel_name(choose_kernel(_layer(32, 64, 8, 32, sym=True), CPU, torch.bfloat16)) \
        == "int4x2_cpu"


@pytest.mark.parametrize("bits,group,pattern,lowrank", [
    (5, 32, "unstructured", None), (6, 128, "none", "residual"), (8, 32, "2:4", None),
    (7, -1, "unstructured", "residual"), (5, 48, "none", None),  # 48: a tail group of 16
])
@pytest.mark.parametrize("sym", [True, False])
def test_byte_codes_layout_is_the_reference_weight(bits, group, pattern, lowrank, sym):
    """In float32 the byte layout computes with exactly the reference forward's base weight (and
    the layer adds the same low-rank term); in bf16 within bf16 rounding. Stores 1 byte per code."""
    torch.manual_seed(bits)
    layer = _layer(32, 64 if group != 48 else 112, bits, group, sym, pattern, lowrank)
    base = layer.base_weight()
    x = torch.randn(3, layer.in_features)
    ref = F.linear(x, layer.dequantized_weight(torch.float32))
    layout = choose_kernel(layer, CPU, torch.float32, int4_pairs=False)
    assert kernel_name(layout) == "bytes"
    assert torch.equal(layout._weight(), base)
    layer.prepare(CPU, torch.float32, int4_pairs=False)
    assert layer.kernel_name == "bytes"
    assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5)
    groups = layout.scale.shape[1]
    assert layout.nbytes() == 32 * layer.in_features + 32 * groups * 3
    lb = choose_kernel(_layer(32, 64, bits, 32, sym, pattern), CPU, torch.bfloat16,
                       int4_pairs=False)
    xb = torch.randn(2, 64)
    assert _rel_err(lb(xb.bfloat16()), F.linear(xb, lb._weight())) < 1e-2


def test_no_kernel_without_a_quantised_base_on_cpu():
    factorized = _layer(32, 64, None, lowrank="factorize")
    assert choose_kernel(factorized, CPU, torch.float16) is None
    sparse16 = _layer(32, 64, None, pattern="2:4")  # 16-bit 2:4: only the CUDA 2:4 layout
    assert choose_kernel(sparse16, CPU, torch.float16, semi_structured=True) is None
    assert kernel_name(None) == "reference"


def test_kernel_group_size():
    assert kernel_group_size(2048, 128) == 128
    assert kernel_group_size(2048, -1) == 256          # per-channel: scales repeated
    assert kernel_group_size(2048, 1024) == 256        # wide groups: scales repeated
    assert kernel_group_size(576, 128) == 64           # MLA: 4 groups of 128 + a tail of 64
    assert kernel_group_size(192, 128) == 64
    assert kernel_group_size(200, 128) is None
    assert kernel_group_size(64, 40) is None


def test_int4_bytes_and_state_dict():
    layer = _layer(64, 512, 4, 128, sym=False)
    layout = choose_kernel(layer, CPU, torch.bfloat16)
    # codes: 4 bits each; scale and zero: bf16 per (row, group of 128)
    assert layout.nbytes() == 64 * 512 // 2 + 64 * (512 // 128) * 2 * 2
    assert layout.nbytes() == sum(b.numel() * b.element_size() for b in layout.buffers())
    assert set(layout.state_dict()) == {"qweight", "scale_zero"}
    # per-channel costs one scale pair per kernel group of 256
    pc = choose_kernel(_layer(64, 512, 4, -1), CPU, torch.bfloat16)
    assert pc.nbytes() == 64 * 512 // 2 + 64 * 2 * 2 * 2


def test_int4_handles_empty_and_batched_inputs():
    layer = _layer(32, 128, 4, 64)
    layout = choose_kernel(layer, CPU, torch.float32)
    assert layout(torch.zeros(0, 128)).shape == (0, 32)
    x = torch.randn(2, 3, 5, 128)
    assert _rel_err(layout(x), F.linear(x, layer.base_weight())) < 1e-2


def test_layout_plus_the_rest_is_the_layer():
    """How CompressedLinear uses a layout: base by the kernel, low-rank part and bias as before."""
    layer = _layer(48, 256, 4, 64, sym=False, pattern="unstructured", lowrank="residual",
                   bias=True)
    layout = choose_kernel(layer, CPU, torch.float32)
    nbytes = layer.nbytes()
    x = torch.randn(4, 256)
    rest = layer.dequantized_weight() - layer.base_weight()  # U·V
    y = layout(x) + F.linear(x, rest, layer.bias.float())
    assert _rel_err(y, layer(x)) < 1e-2
    assert layer.nbytes() == nbytes  # choosing a layout leaves the layer as it was


def test_layout_refuses_another_device_type():
    layout = choose_kernel(_layer(32, 64, 4, 32), CPU, torch.bfloat16)
    layout.device_type = "cuda"  # as if built for CUDA: the encodings differ
    with pytest.raises(RuntimeError, match="built for cuda"):
        layout(torch.randn(1, 64))


# ---- int8, CPU ---------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(out=st.sampled_from([1, 5, 16, 33]), cols=st.sampled_from([16, 64, 160]),
       sym=st.booleans(), pattern=st.sampled_from(["none", "unstructured", "2:4"]),
       m=st.sampled_from([1, 4, 9]), act=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 99))
def test_int8_matches_reference(out, cols, sym, pattern, m, act, seed):
    torch.manual_seed(seed)
    layer = _layer(out, cols, 8, -1, sym, pattern)
    layout = choose_kernel(layer, CPU, act)
    assert kernel_name(layout) == "int8"
    x = torch.randn(m, cols).to(act)
    w = layer.base_weight()
    # bf16 compute: the error scales with |x|·|W|, not with the output (which may cancel)
    err = (layout(x).float() - F.linear(x.float(), w)).norm()
    assert err <= 1e-2 * F.linear(x.float().abs(), w.abs()).norm()


@pytest.mark.parametrize("sym", [True, False])
def test_int8_kernel_weight_is_our_weight(sym):
    layer = _layer(40, 96, 8, -1, sym, "unstructured")
    layout = choose_kernel(layer, CPU, torch.bfloat16)
    q = layer.dense_codes()
    s_bf = q.scale.bfloat16().float()
    main = ((q.codes.float() - 128) * s_bf).bfloat16().float()  # the kernel's bf16 output
    if sym:
        expected = main
    else:
        expected = (main + (128 - q.zero) * q.scale).bfloat16().float()
    got = layout.weight()
    assert torch.equal(got, expected)
    ours = layer.base_weight()
    slack = 2 * BF16_U * ((q.codes.float() - 128).abs() * q.scale.abs() + ours.abs())
    assert ((got - ours).abs() <= slack).all()


def test_int8_survives_a_misaligned_bf16_input():
    """torch 2.13's CPU bf16 int8 kernel uses aligned loads: a view at an odd offset crashed it."""
    layer = _layer(16, 64, 8, -1, sym=False)
    layout = choose_kernel(layer, CPU, torch.bfloat16)
    x = torch.randn(4 * 64 + 1).bfloat16()[1:].view(4, 64)
    assert x.data_ptr() % 32
    assert _rel_err(layout(x), F.linear(x.float(), layer.base_weight())) < 1e-2


def test_int8_bytes():
    sym = choose_kernel(_layer(16, 64, 8, -1, sym=True), CPU, torch.bfloat16)
    assert sym.nbytes() == 16 * 64 + 16 * 2 and set(sym.state_dict()) == {"qweight", "scale"}
    asym = choose_kernel(_layer(16, 64, 8, -1, sym=False), CPU, torch.bfloat16)
    assert asym.nbytes() == 16 * 64 + 16 * 2 + 16 * 4  # + the fp32 per-row zero term


def test_int8_layout_built_directly_rejects_nothing_it_serves():
    assert Int8Layout.supported(7, 32, 8, -1, CPU)
    assert not Int8Layout.supported(7, 32, 8, 16, CPU)
    assert Int8Layout.supported(7, 40, 8, -1, torch.device("cuda"))  # no K tail issue there
    assert Int4Layout.supported(24, 64, 4, 32, torch.device("cuda")) == 32  # N % 8 on CUDA
    assert Int4Layout.supported(24, 64, 4, 32, CPU) is None


# ---- CUDA (benchmarks/gpu_check.sh runs these) ---------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("out,cols,group", [(24, 256, 32), (64, 512, 128), (32, 576, 128),
                                            (128, 1024, -1), (40, 128, 256)])
def test_int4_cuda_matches_reference_and_reads_back_exactly(out, cols, group, sym):
    layer = _layer(out, cols, 4, group, sym, "unstructured")
    layout = choose_kernel(layer, CUDA, torch.bfloat16)
    g = kernel_group_size(cols, group)
    if g is None:
        assert layout is None
        return
    assert kernel_name(layout) == "int4_cuda"
    expected, _ = _expected_int4_readout(layer, layout.group)
    assert torch.equal(layout.weight().cpu(), expected)
    for act in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(3, 7, cols, device=CUDA).to(act)
        ref = F.linear(x.float(), layer.base_weight().to(CUDA))
        assert _rel_err(layout(x), ref) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("bits,group,sym", [(5, 32, True), (6, 128, False), (8, 128, True),
                                            (7, -1, False)])
def test_int4_pairs_on_cuda_read_back_bf16_s_times_r(bits, group, sym):
    """The CUDA encoding of the two planes (even column in the high nibble, inner k-tiles over
    2K) computes the same weight as on CPU: bf16(s)·(q − z), rounded to bf16."""
    layer = _layer(64, 256, bits, group, sym, "unstructured")
    layout = choose_kernel(layer, CUDA, torch.bfloat16)
    assert kernel_name(layout) == "int4x2_cuda"
    q = layer.dense_codes()
    r = q.codes.float() - kernels.grid.expand_groups(q.zero, 256, q.group_size)
    s = kernels.grid.expand_groups(q.scale, 256, q.group_size).bfloat16().float()
    assert torch.equal(layout.weight().cpu(), (r * s).bfloat16().float())
    x = torch.randn(3, 7, 256, device=CUDA)
    assert _rel_err(layout(x), F.linear(x, layer.base_weight().to(CUDA))) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_matches_reference(dtype):
    layer = _layer(128, 256, None, pattern="2:4", dtype=dtype)
    assert choose_kernel(layer, CUDA, dtype) is None  # off unless asked
    layout = choose_kernel(layer, CUDA, dtype, semi_structured=True)
    assert kernel_name(layout) == "semi_structured"
    x = torch.randn(2, 64, 256, device=CUDA, dtype=dtype)
    ref = F.linear(x.float(), layer.base_weight().to(CUDA))
    assert _rel_err(layout(x), ref) < 1e-2
    assert layout.nbytes() < 128 * 256 * 2  # about half the dense bytes plus metadata
    unstructured = _layer(128, 256, None, pattern="unstructured", dtype=dtype)
    assert choose_kernel(unstructured, CUDA, dtype, semi_structured=True) is None


@gpu
@needs_cuda
@pytest.mark.parametrize("sym", [True, False])
def test_int8_cuda_matches_reference(sym):
    layer = _layer(64, 96, 8, -1, sym)
    assert choose_kernel(layer, CUDA, torch.bfloat16) is None  # off unless asked
    layout = choose_kernel(layer, CUDA, torch.bfloat16, int8_cuda=True)
    x = torch.randn(5, 96, device=CUDA, dtype=torch.bfloat16)
    assert _rel_err(layout(x), F.linear(x.float(), layer.base_weight().to(CUDA))) < 1e-2


@pytest.mark.parametrize("factor_bits", [8, 16])
def test_prepared_factors_are_decoded_once_not_per_call(monkeypatch, factor_bits):
    """After prepare, U and V are held decoded (float32 on CPU): the forward unpacks
    nothing (the per-call dequantisation that made the recipe decode slower than dense), and
    computes what the reference forward does."""
    from ciuic_lab.compress.store import packing

    w = torch.randn(32, 64)
    s = LayerState.from_linear(w)
    prof = [LayerProfile("l", "mlp", (32, 64), 0)]
    for m in (Magnitude(0.5), RTN(4, 32), SVD(mode="residual", ratio=0.1,
                                               factor_bits=factor_bits)):
        m.apply(s, None, m.allocate(prof)["l"])
    layer = CompressedLinear.pack(s, torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ref = layer(x)
    assert layer.prepare(CPU, torch.bfloat16) == "int4_cpu"
    assert {"lr_u", "lr_v"} <= set(layer._buffers)
    assert layer.lr_u.dtype == layer.lr_v.dtype == torch.float32  # CPU: see _prepare_factors
    assert not any(n.startswith(("u_", "v_")) or n in ("u", "v") for n in layer._buffers)

    def boom(*a, **k):
        raise AssertionError("unpacked during the forward")
    monkeypatch.setattr(packing, "unpack_bits", boom)
    got = layer(x)
    assert _rel_err(got, ref) < 2e-2
