"""Export to compressed-tensors pack-quantized: the packed layout against compressed-tensors'
own packer and decompressor, and export -> AutoModelForCausalLM.from_pretrained round trips whose
logits match the packed model, plus every refusal."""

import copy
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ciuic_lab import export
from ciuic_lab.api import compress
from ciuic_lab.compress.base import rtn_quantize
from ciuic_lab.compress.lowrank.svd import SVD
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.store import checkpoint
from ciuic_lab.compress.store.experts import CompressedExperts
from ciuic_lab.compress.store.linear import CompressedLinear, LayerState
from ciuic_lab.compress.walk.pipeline import compress_model
from ciuic_lab.models import adapters, tiny
from ciuic_lab.models.loader import load, load_tokenizer

ct = pytest.importorskip("compressed_tensors", reason="export checks need compressed-tensors")
from compressed_tensors.compressors.pack_quantized.base import (
    PackedQuantizationCompressor,
)
from compressed_tensors.compressors.pack_quantized.helpers import (
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import QuantizationScheme
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

X = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _packed(w, bits, g, sym, mask=None, lowrank=None, bias=None):
    st = LayerState.from_linear(w, bias)
    if mask is not None:
        st.mask = mask
    st.quant = rtn_quantize(w, bits, g, sym, mask)
    if lowrank is not None:
        st.u, st.v = lowrank
    return CompressedLinear.pack(st)


def _max_rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _qconfig(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


def _requant(model, pick, bits, g=32, sym=True):
    """Repack every CompressedLinear whose name `pick` accepts on a new grid (fast variants of a
    compressed model without another calibration walk)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, CompressedLinear) and pick(name):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf,
                    _packed(mod.dequantized_weight(), bits, g, sym))
    return model


def _quantise_all(model, bits=4, g=32):
    """Every target of the blocks packed with RTN directly (no calibration walk): a quick
    compressed model for the architectures the pipeline tests already cover."""
    ad = adapters.adapter_for(model)
    for block in ad.blocks(model):
        ad.install(block, {x.name: (x, _packed(x.weight.detach(), bits, g, True, bias=x.bias))
                           for x in ad.layers(block)}, CompressedExperts)
    return model


# ---- the layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_rows_is_compressed_tensors_packing(bits):
    for cols in (64, 40, 7):  # word-aligned rows, and rows ending mid-word
        q = torch.randint(0, 2**bits, (6, cols), dtype=torch.int32)
        packed = export.pack_rows(q, bits)
        ref = pack_to_int32((q - 2 ** (bits - 1)).to(torch.int8), bits)
        assert packed.dtype == torch.int32 and packed.shape == (6, math.ceil(cols * bits / 32))
        assert torch.equal(packed, ref)
        back = unpack_from_int32(packed, bits, torch.Size((6, cols))).to(torch.int32)
        assert torch.equal(back + 2 ** (bits - 1), q)


@pytest.mark.parametrize("bits", range(2, 9))
def test_stored_codes_are_weight_packed_byte_for_byte(bits):
    # With in a multiple of 32 each row is whole int32 words, so the codes stream we store is
    # already compressed-tensors' weight_packed, row by row, for every width.
    lin = _packed(torch.randn(16, 64), bits, 32, True)
    t = export.quantised_tensors(lin, export.Scheme(bits, 32, True), torch.float32)
    assert torch.equal(lin.codes.view(16, -1).view(torch.int32), t["weight_packed"])
    assert t["weight_shape"].tolist() == [16, 64] and t["weight_shape"].dtype == torch.int64


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("g,sym", [(32, True), (-1, True), (16, False), (-1, False)])
def test_compressed_tensors_decompresses_our_tensors_exactly(bits, g, sym):
    torch.manual_seed(bits)
    w = torch.randn(40, 64)
    mask = torch.rand(40, 64) > 0.5  # pruned entries must come back as exact zeros
    lin = _packed(w, bits, g, sym, mask)
    scheme = export.layer_scheme("layer", lin)
    t = export.quantised_tensors(lin, scheme, torch.float32)
    assert ("weight_zero_point" in t) == (not sym)
    if not sym:  # packed down the output dim: ceil(40·k/32) rows, one column per group
        assert t["weight_zero_point"].shape == (math.ceil(40 * bits / 32), 1 if g == -1 else 4)
    ct_scheme = QuantizationScheme.model_validate(
        {"targets": ["Linear"], "weights": scheme.weights_args()})
    w_ct = PackedQuantizationCompressor.decompress(t, ct_scheme)["weight"]
    assert torch.equal(w_ct, lin.dequantized_weight())
    assert bool((w_ct[~mask] == 0).all())


def test_group_wider_than_the_row_is_per_channel_and_tail_groups_are_refused():
    lin = _packed(torch.randn(8, 64), 4, 128, True)  # one 64-wide group = per channel
    assert export.layer_scheme("a", lin) == export.Scheme(4, -1, True)
    assert export.layer_scheme("b", _packed(torch.randn(8, 64), 4, 64, True)).group_size == 64
    with pytest.raises(export.ExportError, match=r"model\.x.*group size 48.*input dim 64.*"
                                                 r"quant\.group_size.*16"):
        export.layer_scheme("model.x", _packed(torch.randn(8, 64), 4, 48, True))


def test_low_rank_part_leaves_the_base_scheme_to_the_adapter():
    lin = _packed(torch.randn(8, 64), 4, 32, True, lowrank=(torch.randn(8, 2), torch.randn(2, 64)))
    assert export.layer_scheme("model.y", lin) == export.Scheme(4, 32, True)


@pytest.mark.parametrize("own,to", [((2, 32), (4, 32)), ((3, -1), (5, 16)), ((4, 64), (4, 32))])
def test_regrid_is_exact(own, to):
    lin = _packed(torch.randn(8, 64), own[0], own[1], True, torch.rand(8, 64) > 0.5)
    to = export.Scheme(to[0], to[1], True)
    t = export.quantised_tensors(lin, to, torch.float32)
    ct_scheme = QuantizationScheme.model_validate({"targets": ["Linear"], "weights": to.weights_args()})
    w = PackedQuantizationCompressor.decompress(t, ct_scheme)["weight"]
    assert torch.equal(w, lin.dequantized_weight())


# ---- round trips through transformers ---------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model = tiny.build("tiny-random-llama", vocab=256)
    # Pruned + quantised everywhere; mixed widths; o_proj of block 1 pruned only (exported dense).
    layers = {"layers.1.self_attn.o_proj": None, "self_attn": 8, "layers.0.mlp.down_proj": 2,
              "layers.1.mlp.up_proj": 3}
    compress_model(model, torch.randint(0, 256, (2, 16)), [Magnitude(0.5), RTN(4, 32, layers=layers)],
                   progress=False)
    return model


@pytest.fixture(scope="module")
def deepseek():
    torch.manual_seed(0)
    model = tiny.build("tiny-random-deepseek-v3", vocab=256)
    compress_model(model, torch.randint(0, 256, (2, 16)),
                   [Magnitude(0.5, pattern="2:4"),
                    RTN(4, 32, layers={"self_attn": 8, "shared_experts": 3, "layers.0.mlp": 5})],
                   progress=False)
    return model


def test_llama_mixed_widths_pruned_and_dense_round_trip(llama, tmp_path):
    tok = load_tokenizer("tiny-random-llama")
    out = export.export_model(llama, tok, tmp_path / "out")
    qc = _qconfig(out)
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    widths = {g["weights"]["num_bits"]: g["targets"] for g in qc["config_groups"].values()}
    # the most common grid (8-bit attention) targets "Linear", the others name their layers
    assert widths[8] == ["Linear"] and set(widths) == {2, 3, 4, 8}
    assert widths[4] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                         "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"]
    assert {"model.layers.1.self_attn.o_proj", "lm_head"} <= set(qc["ignore"])
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.1.self_attn.o_proj.weight"].dtype == torch.float32
    assert "model.layers.0.self_attn.o_proj.weight_packed" in tensors

    loaded = _load(out)
    assert _max_rel(_logits(llama), _logits(loaded)) <= 1e-3
    # pruned weights are exact zeros inside the quantised weights
    ours = llama.get_submodule("model.layers.0.mlp.down_proj")
    w = loaded.get_submodule("model.layers.0.mlp.down_proj").weight
    assert torch.equal(w, ours.dequantized_weight()) and (w == 0).float().mean() >= 0.5
    assert AutoTokenizer.from_pretrained(str(out)).vocab_size == tok.vocab_size
    assert (out / "generation_config.json").exists()


def test_deepseek_experts_per_expert_keys_sharded_round_trip(deepseek, tmp_path):
    out = export.export_model(deepseek, None, tmp_path / "out", shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    keys = index["weight_map"]
    assert len(set(keys.values())) > 1
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for part in ("weight_packed", "weight_scale", "weight_shape"):
            assert f"model.layers.1.mlp.experts.7.{proj}.{part}" in keys
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
    qc = _qconfig(out)
    g0 = qc["config_groups"]["group_0"]
    assert g0["targets"] == ["Linear"] and g0["weights"]["num_bits"] == 4  # the experts' grid
    assert {"model.layers.1.mlp.gate", "lm_head"} <= set(qc["ignore"])

    loaded = _load(out)
    assert _max_rel(_logits(deepseek), _logits(loaded)) <= 1e-3
    # transformers merged the per-expert tensors into its fused parameters, gate rows first
    experts = deepseek.get_submodule("model.layers.2.mlp.experts")
    assert isinstance(experts, CompressedExperts)
    fused = loaded.get_submodule("model.layers.2.mlp.experts")
    assert torch.equal(fused.gate_up_proj[5], getattr(experts, "5").gate_up_proj.dequantized_weight())
    assert torch.equal(fused.down_proj[5], getattr(experts, "5").down_proj.dequantized_weight())


def test_asymmetric_loads_only_with_dequantize(llama, tmp_path):
    model = _requant(copy.deepcopy(llama), lambda n: True, 4, 32, sym=False)
    with pytest.warns(export.ExportWarning, match="dequantize=True"):
        out = export.export_model(model, None, tmp_path / "out")
    g0 = _qconfig(out)["config_groups"]["group_0"]["weights"]
    assert not g0["symmetric"] and len(_qconfig(out)["config_groups"]) == 1
    # transformers 5.24 + compressed-tensors 0.20.1: the default path builds unpacked zero-point
    # parameters and rejects the packed ones (if this starts loading, update the docs).
    with pytest.raises(RuntimeError):
        _load(out)
    loaded = _load(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert _max_rel(_logits(model), _logits(loaded)) <= 1e-3


def test_mixed_asymmetric_export_warns_that_transformers_cannot_load_it(llama, tmp_path):
    model = _requant(copy.deepcopy(llama), lambda n: "mlp" in n, 4, 32, sym=False)
    with pytest.warns(export.ExportWarning, match="cannot load it correctly"):
        export.export_model(model, None, tmp_path / "out")


def test_run_directory_through_the_cli(llama, tmp_path):
    checkpoint.save(llama, tmp_path / "run" / "compressed", tokenizer=load_tokenizer("tiny-random-llama"))
    rc = export.main([str(tmp_path / "run"), "--format", "compressed-tensors", str(tmp_path / "out")])
    assert rc == 0
    assert _max_rel(_logits(llama), _logits(_load(tmp_path / "out"))) <= 1e-3
    assert (tmp_path / "out" / "tokenizer.json").exists()
    # the checkpoint directory itself works too; a used output directory, or no checkpoint, fail
    assert export.main([str(tmp_path / "run" / "compressed"), str(tmp_path / "out2")]) == 0
    assert export.main([str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert export.main([str(tmp_path / "out"), str(tmp_path / "out3")]) == 2
    assert export.main([str(tmp_path / "nowhere"), str(tmp_path / "out4")]) == 2


@pytest.mark.parametrize("arch", ["tiny-random-qwen2", "tiny-random-deepseek-v2",
                                  "tiny-random-deepseek-v2-qlora", "tied-llama",
                                  "tiny-random-gemma3"])
def test_other_architectures_and_tied_embeddings_round_trip(arch, tmp_path):
    if arch == "tied-llama":
        config = tiny.CONFIGS["tiny-random-llama"](256)
        config.tie_word_embeddings = True
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    else:
        model = tiny.build(arch, vocab=256)
    _quantise_all(model)
    out = export.export_model(model, None, tmp_path / "out")
    keys = load_file(str(out / "model.safetensors"))
    if arch in ("tied-llama", "tiny-random-gemma3"):  # stored once; tied again on load
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    if arch == "tiny-random-qwen2":  # q/k/v biases ride along with the packed weights
        assert "model.layers.0.self_attn.q_proj.bias" in keys
    assert _max_rel(_logits(model), _logits(_load(out))) <= 1e-3


def test_export_dtype_sets_scales_and_dense_tensors(llama, tmp_path):
    out = export.export_model(llama, None, tmp_path / "fp16", dtype=torch.float16)
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.mlp.gate_proj.weight_scale"].dtype == torch.float16
    assert t["model.embed_tokens.weight"].dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    # fp16 scales are ours exactly; only the dense tensors were rounded to fp16
    ref = copy.deepcopy(llama)
    for p in ref.parameters():
        p.data = p.data.half().float()
    assert _max_rel(_logits(ref), _logits(_load(out))) <= 1e-3
    out = export.export_model(llama, None, tmp_path / "bf16", dtype=torch.bfloat16)
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.mlp.gate_proj.weight_scale"].dtype == torch.bfloat16


# ---- refusals on models -----------------------------------------------------------------------


def test_tail_group_in_a_model_names_the_layer(llama, tmp_path):
    model = _requant(copy.deepcopy(llama), lambda n: n == "model.layers.0.mlp.up_proj", 4, 48)
    with pytest.raises(export.ExportError, match=r"model\.layers\.0\.mlp\.up_proj: group size 48"):
        export.export_model(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_nothing_quantised_is_refused(tmp_path):
    model = tiny.build("tiny-random-llama", vocab=256)
    compress_model(model, torch.randint(0, 256, (1, 8)), [Magnitude(0.5)], progress=False)
    with pytest.raises(export.ExportError, match="quant=rtn"):
        export.export_model(model, None, tmp_path / "out")


def _expert(name):
    return ".mlp.experts." in name


@pytest.mark.parametrize("variant,match", [
    ("asymmetric experts", r"asymmetrically.*quant\.sym=true"),
    ("dense expert", r"not quantised.*quant\.layers"),
])
def test_routed_experts_transformers_cannot_load_are_refused(deepseek, tmp_path, variant, match):
    model = copy.deepcopy(deepseek)
    if variant == "asymmetric experts":
        _requant(model, _expert, 4, sym=False)
    else:
        name = "model.layers.1.mlp.experts.0.down_proj"
        lin = model.get_submodule(name)
        dense = CompressedLinear.pack(LayerState.from_linear(lin.dequantized_weight()))
        model.get_submodule(name.rpartition(".")[0]).down_proj = dense
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", export.ExportWarning)
        with pytest.raises(export.ExportError, match=match):
            export.export_model(model, None, tmp_path / "out")


def test_routed_experts_on_several_grids_are_written_exactly_on_the_widest(deepseek, tmp_path):
    # The recipe's sensitivity policy gives experts their own widths; transformers decodes all
    # routed experts with one config group, so they are widened (and split into finer groups).
    model = copy.deepcopy(deepseek)
    _requant(model, lambda n: n == "model.layers.2.mlp.experts.3.down_proj", 3)
    _requant(model, lambda n: n == "model.layers.1.mlp.experts.5.gate_up_proj", 6, g=-1)
    with pytest.warns(export.ExportWarning, match=r"3 grids.*6 bits, group 32.*mlp\.experts:4"):
        out = export.export_model(model, None, tmp_path / "out")
    g0 = _qconfig(out)["config_groups"]["group_0"]
    assert g0["targets"] == ["Linear"] and (g0["weights"]["num_bits"], g0["weights"]["group_size"]) == (6, 32)
    assert _max_rel(_logits(model), _logits(_load(out))) <= 1e-3


# ---- the low-rank part as a PEFT adapter ------------------------------------------------------

try:
    from peft import PeftModel, get_peft_model_state_dict
except ImportError:  # the export itself does not need peft; loading its adapter does
    PeftModel = None
needs_peft = pytest.mark.skipif(PeftModel is None, reason="adapter round trips need peft")


def _load_with_adapter(out):
    """What the README says: load the export, decompress it (PEFT wraps dense weights, which
    compressed-tensors builds only on the first forward), add the adapter."""
    base = _load(out)
    base.hf_quantizer.compressor.decompress_model(base)
    with warnings.catch_warnings():
        # PEFT 0.21 warns that parameter targets' rank_pattern keys matched no module; it applies them
        warnings.filterwarnings("ignore", "The following (rank|alpha)_pattern keys", RuntimeWarning)
        return PeftModel.from_pretrained(base, str(out / "adapter")).eval()


def _recipe(name):
    """The default `ciuic` recipe as a run does it (SparseGPT 50 % with OWL, GPTQ g128 with
    sensitivity-allocated widths, SVD-LLM residual factors in 8 bits), calibrated cheaply."""
    model, tok = load(name, device="cpu", dtype="float32")
    torch.manual_seed(0)
    model, report = compress(
        model, tok, ["data.calib_samples=4", "data.calib_seqlen=32", "device=cpu"], progress=False)
    return model.eval(), tok, report


@pytest.fixture(scope="module")
def recipe_v3():
    return _recipe("deepseek-v3-tiny")


def _check_round_trip(model, out, vocab):
    x = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    peft_model = _load_with_adapter(out)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    # PEFT's own state dict of what it built from our config has exactly our keys and shapes
    built = get_peft_model_state_dict(peft_model)
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in adapter.items()}
    with torch.no_grad():
        ours = model(x).logits
        assert (ours - peft_model(x).logits).abs().max() <= 1e-3
        with peft_model.disable_adapter():  # the factors matter: without them it is another model
            assert (ours - peft_model(x).logits).abs().max() > 1e-2
    return peft_model


@needs_peft
def test_default_recipe_on_bundled_deepseek_v3_exports_and_reloads_through_peft(recipe_v3, tmp_path):
    model, tok, report = recipe_v3
    with pytest.warns(export.ExportWarning, match="routed experts are on"):
        out = export.export_model(model, tok, tmp_path / "out")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(out.resolve())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"]  # scaling alpha / r = 1 everywhere
    # routed experts through target_parameters (their fused 3-D parameters), as are the dense
    # and shared-expert MLPs (PEFT 0.21 would rewrite them as module targets: peft#3711)
    assert "model.layers.1.mlp.experts.gate_up_proj" in cfg["target_parameters"]
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in cfg["target_parameters"]
    assert "model.layers.1.self_attn.q_a_proj" in cfg["target_modules"]
    widths = {g["weights"]["num_bits"] for g in _qconfig(out)["config_groups"].values()}
    assert len(widths) > 1  # one config group per grid

    peft_model = _check_round_trip(model, out, model.config.vocab_size)
    # pruned entries are exact zeros of the quantised base (their group's zero code)
    name = "model.layers.1.self_attn.o_proj"
    ours = model.get_submodule(name)
    w = peft_model.base_model.model.get_submodule(name).base_layer.weight
    assert torch.equal(w, ours.base_weight()) and bool((w[~ours.kept_mask()] == 0).all())

    size = export.exported_size(model, out)
    assert size["params"] == report.totals()["params"]
    assert size["bits_per_param"] > report.totals()["bits_per_param"]  # pruned entries cost codes


@needs_peft
@pytest.mark.parametrize("arch", ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-gemma3"])
def test_default_recipe_llama_and_qwen2_round_trip(arch, tmp_path):
    model, tok, _ = _recipe(arch)
    out = export.export_model(model, tok, tmp_path / "out")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] is None  # no routed experts: every target a module
    assert "model.layers.0.mlp.down_proj" in cfg["target_modules"]
    _check_round_trip(model, out, model.config.vocab_size)


@needs_peft
def test_pruned_only_layer_with_factors_is_written_dense_with_them_merged(tmp_path):
    torch.manual_seed(0)
    model = tiny.build("tiny-random-llama", vocab=256)
    name = "model.layers.1.self_attn.o_proj"
    compress_model(model, torch.randint(0, 256, (2, 16)),
                   [Magnitude(0.5), RTN(4, 32, layers={"layers.1.self_attn.o_proj": None}),
                    SVD(rank=4, rule="rank")], progress=False)
    out = export.export_model(model, None, tmp_path / "out")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert name in _qconfig(out)["ignore"] and name not in cfg["target_modules"]
    w = load_file(str(out / "model.safetensors"))[f"{name}.weight"]
    assert torch.equal(w, model.get_submodule(name).dequantized_weight())
    _check_round_trip(model.eval(), out, 256)


@needs_peft
def test_expert_factors_of_one_projection_and_several_ranks(deepseek, tmp_path):
    # Only down_proj has factors, with a rank per expert (0 for expert 2): one ParamWrapper per
    # experts module (no base_layer level), lower ranks zero-padded to the largest.
    model = copy.deepcopy(deepseek)
    g = torch.Generator().manual_seed(3)
    for name, lin in list(model.named_modules()):
        if name.endswith("down_proj") and ".experts." in name:
            e = int(name.split(".")[-2])
            if e == 2:
                continue
            r = 1 + e % 3
            w = lin.dequantized_weight()
            new = _packed(w, 4, 32, True, lowrank=(torch.randn(w.shape[0], r, generator=g) / 4,
                                                   torch.randn(r, w.shape[1], generator=g) / 4))
            model.get_submodule(name.rpartition(".")[0]).down_proj = new
    out = export.export_model(model, None, tmp_path / "out")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == [f"model.layers.{i}.mlp.experts.down_proj" for i in (1, 2)]
    assert cfg["rank_pattern"]["model.layers.1.mlp.experts.down_proj"] == 3
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.1.mlp.experts.lora_A.weight"].shape == (8 * 3, 32)
    _check_round_trip(model.eval(), out, 256)


@needs_peft
def test_recipe_run_checkpoint_exports_the_same_through_the_cli(recipe_v3, tmp_path):
    model, tok, _ = recipe_v3
    checkpoint.save(model, tmp_path / "run" / "compressed", tokenizer=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", export.ExportWarning)
        assert export.main([str(tmp_path / "run"), str(tmp_path / "cli")]) == 0
        export.export_model(model, tok, tmp_path / "live")
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "cli" / f)), load_file(str(tmp_path / "live" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
