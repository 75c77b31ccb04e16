"""The block walk on tiny random DeepSeek-V3 and Llama models."""

import copy

import pytest
import torch
from torch import nn

from ciuic_lab.compress.lowrank.svd import SVD
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.store.linear import CompressedLinear
from ciuic_lab.compress.walk.pipeline import compress_model, profile
from ciuic_lab.errors import UnsupportedModel
from ciuic_lab.eval.memory import stored_bytes
from ciuic_lab.models import tiny

ARCHS = list(tiny.CONFIGS)


def _stages():
    return [Magnitude(0.5), SVD(mode="residual", ratio=0.1), RTN(4, 32, sym=False)]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_attention_mlp_and_shared_expert_linear_is_packed(arch):
    model = tiny.build(arch, vocab=256)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    before.update({n: b.clone() for n, b in model.named_buffers()})
    names = [p.name for p in profile(model)]
    windows = torch.randint(0, 256, (4, 32))
    report = compress_model(model, windows, _stages(), batch_size=2, progress=False)
    assert [r["name"] for r in report.layers] == names
    for name in names:
        assert isinstance(model.get_submodule(name), CompressedLinear), name
    kinds = {r["kind"] for r in report.layers}
    assert {"attn", "mlp"} <= kinds
    if "deepseek" in arch:
        assert {"shared_expert", "expert"} <= kinds
        # every routed expert of every MoE layer is packed, two projections each
        n_moe = sum(1 for b in model.model.layers if hasattr(b.mlp, "gate"))
        assert sum(r["kind"] == "expert" for r in report.layers) == n_moe * 8 * 2
    # routers (weight and correction bias), norms, embeddings and head are bit-identical
    after = dict(model.named_parameters())
    after.update(dict(model.named_buffers()))
    for n, p in before.items():
        if any(k in n for k in ("mlp.gate.", "norm", "embed", "lm_head")):
            assert torch.equal(after[n], p), n
    assert all(r["calib_tokens"] == 4 * 32 for r in report.layers if r["kind"] != "expert")
    experts = [r for r in report.layers if r["kind"] == "expert"]
    # top-2 of 8 routing: per-expert token counts add up to 2 tokens' worth per MoE layer
    by_layer = {}
    for r in experts[::2]:
        by_layer.setdefault(r["name"].split(".mlp")[0], 0)
        by_layer[r["name"].split(".mlp")[0]] += r["calib_tokens"]
    assert all(v == 2 * 4 * 32 for v in by_layer.values())
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.01) for r in report.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_equal_dense_model_holding_dequantised_weights(arch):
    model = tiny.build(arch, vocab=256)
    dense = copy.deepcopy(model)
    compress_model(model, torch.randint(0, 256, (2, 16)), _stages(), progress=False)
    for name, mod in model.named_modules():
        if not isinstance(mod, CompressedLinear):
            continue
        if ".experts." in name:  # fused 3-D parameter in the dense model: write expert e's slice
            owner, e, proj = name.rsplit(".", 2)
            getattr(dense.get_submodule(owner), proj).data[int(e)] = mod.dequantized_weight()
        else:
            lin: nn.Linear = dense.get_submodule(name)
            lin.weight.data = mod.dequantized_weight(torch.float32)
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        a, b = model(x).logits, dense(x).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-3


def test_stored_bytes_shrink_by_what_the_layers_save():
    model = tiny.build("tiny-random-llama", vocab=256)
    dense_bytes = stored_bytes(model)
    lin_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and n.startswith("model.layers"))
    report = compress_model(model, torch.randint(0, 256, (2, 16)), [Magnitude(0.5), RTN(4, 32)],
                            progress=False)
    assert stored_bytes(model) == dense_bytes - lin_bytes + report.totals()["bytes"]


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModel, match="deepseek_v3"):
        profile(m)


def test_starved_experts_fall_back_and_are_reported():
    model = tiny.build("tiny-random-deepseek-v3", vocab=256)
    report = compress_model(model, torch.randint(0, 256, (1, 8)), [RTN(4, 32)], progress=False,
                            min_expert_tokens=10**6)
    experts = [r for r in report.layers if r["kind"] == "expert"]
    assert experts and all(r["fallback"] for r in experts)
    assert all(not r["fallback"] for r in report.layers if r["kind"] != "expert")
    out = model(torch.randint(0, 256, (1, 8))).logits
    assert torch.isfinite(out).all()


_RSS_PROBE = """
import gc, json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from ciuic_lab.compress.walk.pipeline import compress_model
from ciuic_lab.compress.prune.magnitude import Magnitude
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.eval.memory import PeakMemory
torch.set_num_threads(1)
layers = int(sys.argv[1])
cfg = LlamaConfig(vocab_size=256, hidden_size=384, intermediate_size=1024,
                  num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=6)
model = LlamaForCausalLM(cfg).eval()
dense = sum(p.numel() * p.element_size() for p in model.parameters())
windows = torch.randint(0, 256, (4, 64))
model(windows[:1])  # warm up kernels and allocator outside the measurement
gc.collect()
with PeakMemory("cpu") as before:
    pass
with PeakMemory("cpu") as pm:
    compress_model(model, windows, [Magnitude(0.5), RTN(4, 128)], progress=False)
print(json.dumps({"extra": pm.peak_bytes - before.peak_bytes, "dense": dense}))
"""


def _rss_extra_during_compress(layers: int) -> dict:
    """Peak RSS during compression above the RSS before it, in a fresh process."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(layers)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_walk_working_memory_does_not_grow_with_depth():
    """Compression holds one block's working state at a time: 4x the layers, not 4x the memory."""
    m4, m16 = _rss_extra_during_compress(4), _rss_extra_during_compress(16)
    assert m16["dense"] > 3.5 * m4["dense"]
    # the model grew by 4x; the working memory beyond it must grow far less
    assert m16["extra"] < 0.5 * m16["dense"], (m4, m16)
    assert m16["extra"] < 2.0 * max(m4["extra"], 8 * 2**20), (m4, m16)


def test_nm_pattern_on_indivisible_input_dim_fails_before_calibration(monkeypatch):
    from ciuic_lab.compress.prune.wanda import Wanda
    from ciuic_lab.compress.walk import pipeline
    from ciuic_lab.errors import ConfigError

    model = tiny.build("tiny-random-llama", vocab=256)
    model.model.layers[0].mlp.down_proj = nn.Linear(model.config.intermediate_size - 2,
                                                    model.config.hidden_size, bias=False)

    def never(*a, **k):
        raise AssertionError("calibration ran before the shape check")

    monkeypatch.setattr(pipeline, "capture", never)
    monkeypatch.setattr(pipeline, "profile_walk", never)
    with pytest.raises(ConfigError, match=r"prune.pattern: 2:4 .*layers.0.mlp.down_proj \(in="):
        compress_model(model, torch.randint(0, 256, (1, 8)), [Wanda(pattern="2:4")],
                       progress=False)
    # a pattern every dim divides passes the check (and would go on to calibrate)
    Wanda(pattern="2:4").check_shapes(profile(tiny.build("tiny-random-llama", vocab=256)))


@pytest.mark.parametrize("pattern,name,hit", [
    ("layers.0", "model.layers.0.self_attn.q_a_proj", True),
    ("layers.0", "model.layers.10.self_attn.q_a_proj", False),
    ("down_proj", "model.layers.3.mlp.experts.2.down_proj", True),
    ("mlp.experts.*.down_proj", "model.layers.3.mlp.experts.2.down_proj", True),
    ("mlp.experts.*.down_proj", "model.layers.3.mlp.shared_experts.down_proj", False),
    ("self_attn.q_*", "model.layers.1.self_attn.q_b_proj", True),
    ("proj", "model.layers.1.self_attn.q_b_proj", False),  # whole parts, not substrings
])
def test_layer_name_patterns_match_whole_dotted_parts(pattern, name, hit):
    from ciuic_lab.names import name_matches

    assert name_matches(pattern, name) is hit


def test_per_layer_overrides_by_name_set_or_skip_each_stage():
    model = tiny.build("tiny-random-deepseek-v3", vocab=256)
    stages = [Magnitude(0.5, layers={"layers.0": 0.25, "down_proj": None}),
              RTN(4, 32, layers={"self_attn": 8, "layers.1.mlp.experts.0": None})]
    report = compress_model(model, torch.randint(0, 256, (2, 16)), stages, progress=False)
    rows = {r["name"]: r for r in report.layers}
    for name, r in rows.items():
        if ".layers.0." in name:
            want_s = 0.25  # the first matching pattern wins, also for block 0's down_proj
        elif name.endswith("down_proj"):
            want_s = 0.0
        else:
            want_s = 0.5
        assert r["sparsity"] == pytest.approx(want_s, abs=0.01), name
        if ".self_attn." in name:
            assert r["bits"] == 8, name
        elif ".layers.1.mlp.experts.0." in name:
            assert r["bits"] == 16, name  # not quantised: stored at the store dtype
        else:
            assert r["bits"] == 4, name
    skipped = [n for n in rows if ".layers.1.mlp.experts.0." in n and n.endswith("down_proj")]
    assert skipped and rows[skipped[0]]["bits_per_param"] == pytest.approx(16.0)
    assert torch.isfinite(model(torch.randint(0, 256, (1, 8))).logits).all()


def test_a_layer_pattern_matching_nothing_fails_before_calibration(monkeypatch):
    from ciuic_lab.compress.walk import pipeline
    from ciuic_lab.errors import ConfigError

    def never(*a, **k):
        raise AssertionError("calibration ran before the name check")

    monkeypatch.setattr(pipeline, "capture", never)
    with pytest.raises(ConfigError, match=r"quant.layers: 'dwon_proj' matches no compressible layer"):
        compress_model(tiny.build("tiny-random-llama", vocab=256), torch.randint(0, 256, (1, 8)),
                       [RTN(4, 32, layers={"dwon_proj": 8})], progress=False)


def test_each_block_gets_what_the_model_passes_it():
    """Gemma 3's sliding-window and global layers get different masks and rotary tables: a walk
    that fed every block block 0's arguments would compute another model (windows of 24 tokens,
    longer than the tiny model's window of 8, so the masks differ)."""
    from ciuic_lab.compress.walk.blocks import Resident, capture, run_block

    model = tiny.build("tiny-random-gemma3", vocab=256, num_layers=4)
    ids = torch.randint(0, 256, (4, 24))
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states
    inputs = capture(Resident(model, torch.device("cpu")), ids, batch_size=2)
    assert inputs.per_block is not None
    sliding, full = inputs.per_block[0][0], inputs.per_block[1][0]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    blocks = model.model.layers
    with torch.no_grad():
        for i, block in enumerate(blocks):
            inputs.hidden.replace(run_block(block, inputs.at(i)))
            if i + 1 < len(blocks):  # the last hidden state is after the final norm
                got = torch.cat([inputs.hidden[b] for b in range(len(inputs))])
                torch.testing.assert_close(got, want[i + 1])
    # a Llama's blocks all get the same arguments: nothing per block is kept
    llama = tiny.build("tiny-random-llama", vocab=256)
    assert capture(Resident(llama, torch.device("cpu")), ids, batch_size=2).per_block is None
