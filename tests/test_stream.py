"""Streamed compression and evaluation: a model read block by block from its shards (FP8
included) gives exactly what the in-memory run gives, with memory bounded by one block."""

import copy
import hashlib
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from ciuic_lab.compress.lowrank.svdllm import SVDLLM
from ciuic_lab.compress.prune.sparsegpt import SparseGPT
from ciuic_lab.compress.quant.gptq import GPTQ
from ciuic_lab.compress.stats import LayerStats
from ciuic_lab.compress.store import checkpoint
from ciuic_lab.compress.walk import blocks, pipeline
from ciuic_lab.compress.walk.blocks import Resident, Streamed
from ciuic_lab.compress.walk.pipeline import compress_model, compress_streamed
from ciuic_lab.errors import CheckpointError
from ciuic_lab.eval.perplexity import perplexity
from ciuic_lab.eval.streamed import streamed_perplexity
from ciuic_lab.models import tiny
from ciuic_lab.models.loader import load_tokenizer, skeleton
from ciuic_lab.models.source import CheckpointSource

sys.path.insert(0, str(Path(__file__).parent))
from fp8_checkpoint import dequantized, write_fp8_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
EVAL = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))


def recipe():
    """The default recipe's methods and policies (OWL, sensitivity bits), small budgets."""
    return [SparseGPT(0.5, policy="owl"), GPTQ(4, 32, policy="sensitivity"),
            SVDLLM(ratio=0.05, factor_bits=8)]


def _saved(tmp_path, arch, vocab=256, tied=False) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = tiny.build(arch, vocab=vocab, tied=tied)
    model.save_pretrained(tmp_path / "src")
    return model, tmp_path / "src"


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.glob("*.safetensors"))}


@pytest.mark.parametrize("arch", ["tiny-random-deepseek-v3", "tiny-random-deepseek-v2",
                                  "tiny-random-deepseek-v2-qlora", "tiny-random-llama",
                                  "tiny-random-qwen2", "tiny-random-gemma3"])
def test_streamed_and_in_memory_runs_store_identical_bytes_and_perplexity(tmp_path, arch):
    model, src = _saved(tmp_path, arch)
    report = compress_streamed(str(src), tmp_path / "streamed", CALIB, recipe(),
                               torch.device("cpu"), torch.float32, batch_size=2, progress=False)
    in_memory = copy.deepcopy(model)
    ref = compress_model(in_memory, CALIB, recipe(), batch_size=2, progress=False)
    checkpoint.save(in_memory, tmp_path / "memory")
    assert _digests(tmp_path / "streamed") == _digests(tmp_path / "memory")
    assert [r["bytes"] for r in report.layers] == [r["bytes"] for r in ref.layers]
    assert report.allocations == ref.allocations
    # the same perplexity: resident, and walked block by block from the written checkpoint
    want = perplexity(in_memory, EVAL, batch_size=2, progress=False)
    assert perplexity(checkpoint.load(tmp_path / "streamed"), EVAL, 2, False) == want
    stored = checkpoint.Stored(tmp_path / "streamed", "cpu")
    assert streamed_perplexity(stored, EVAL, batch_size=2, progress=False) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("arch", ["tiny-random-deepseek-v3", "tiny-random-qwen2",
                                  "tiny-random-gemma3"])
def test_streamed_dense_perplexity_equals_the_in_memory_one(tmp_path, arch):
    model, src = _saved(tmp_path, arch)
    streamed = Streamed(skeleton(str(src), torch.float32), CheckpointSource.from_dir(src), "cpu")
    want = perplexity(model, EVAL, batch_size=2, progress=False)
    got = streamed_perplexity(streamed, EVAL, batch_size=2, progress=False, expert_chunk=3)
    assert got == pytest.approx(want, rel=1e-6)
    # the same walk over the resident model (the offload mode's dense baseline)
    assert streamed_perplexity(Resident(model, torch.device("cpu")), EVAL, 2, progress=False) \
        == pytest.approx(want, rel=1e-6)


def test_fp8_checkpoint_streams_like_the_model_dequantised_up_front(tmp_path):
    torch.manual_seed(0)
    model = tiny.build("tiny-random-deepseek-v3", vocab=256)
    src = write_fp8_checkpoint(model, tmp_path / "fp8", block=32, shards=3)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    src_reader = CheckpointSource.from_dir(src)
    assert src_reader.fp8.block == (32, 32)
    from safetensors import safe_open

    shard = next(iter(set(index["weight_map"].values())))
    with safe_open(str(src / shard), "pt") as f:
        kinds = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float8_e4m3fn in kinds  # really FP8 on disk
    # kv_a_proj_with_mqa is 40 x 64: a partial 32 x 32 block, so the broadcast is exercised
    report = compress_streamed(str(src), tmp_path / "streamed", CALIB, recipe(),
                               torch.device("cpu"), torch.float32, batch_size=2, progress=False)
    reference = dequantized(copy.deepcopy(model), src)
    # dequantisation is real: the FP8 values differ from the original weights, a little
    w0 = model.model.layers[0].self_attn.q_a_proj.weight
    w1 = reference.model.layers[0].self_attn.q_a_proj.weight.clone()
    assert not torch.equal(w0, w1) and float((w0 - w1).norm() / w0.norm()) < 0.1
    ref = compress_model(reference, CALIB, recipe(), batch_size=2, progress=False)
    checkpoint.save(reference, tmp_path / "memory")
    assert _digests(tmp_path / "streamed") == _digests(tmp_path / "memory")
    assert [r["rel_error"] for r in report.layers] == [r["rel_error"] for r in ref.layers]


def test_fp8_dequantisation_broadcasts_block_scales():
    from ciuic_lab.models.source import fp8_dequantize

    q = torch.ones(5, 7).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w = fp8_dequantize(q, scale, (4, 4), torch.float32)
    assert w[0, 0] == 1 and w[0, 6] == 2 and w[4, 0] == 3 and w[4, 6] == 4


def test_missing_or_truncated_shard_fails_naming_the_file_before_any_work(tmp_path):
    torch.manual_seed(0)
    src = write_fp8_checkpoint(tiny.build("tiny-random-deepseek-v3", vocab=256),
                               tmp_path / "fp8", shards=3)
    files = sorted(src.glob("model-*.safetensors"))
    files[1].write_bytes(files[1].read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{files[1].name} is truncated"):
        CheckpointSource.from_dir(src)
    files[1].unlink()
    with pytest.raises(CheckpointError, match=f"{files[1].name} is missing"):
        CheckpointSource.from_dir(src)
    files[0].write_bytes(b"\xff" * 32)
    with pytest.raises(CheckpointError, match=f"{files[0].name}: not a readable safetensors"):
        CheckpointSource.from_dir(src)


def test_truncated_single_file_checkpoint_fails_naming_the_file(tmp_path):
    _, src = _saved(tmp_path, "tiny-random-llama")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated: \d+ bytes"):
        CheckpointSource.from_dir(src)


def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused(tmp_path):
    _, src = _saved(tmp_path, "tiny-random-llama")
    outside = tmp_path / "outside"
    outside.mkdir()
    (src / "model.safetensors").rename(outside / "model.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "../outside/model.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index.json: shard name '../outside/model"):
        CheckpointSource.from_dir(src)


def test_streaming_keeps_routed_experts_on_meta_and_reads_them_a_chunk_at_a_time(tmp_path,
                                                                                   monkeypatch):
    _, src = _saved(tmp_path, "tiny-random-deepseek-v3")
    chunks, alive_max = [], [0]
    alive: weakref.WeakSet = weakref.WeakSet()
    real_init = LayerStats.__init__

    def tracked(self, *a, **k):
        real_init(self, *a, **k)
        if self.hessian is not None:
            alive.add(self)

    real_experts = Streamed.experts

    def experts(self, i, owner, module):
        assert module.gate_up_proj.is_meta  # the block never holds its routed experts
        w = real_experts(self, i, owner, module)
        fetch = w.fetch

        def counted(ids):
            chunks.append(len(ids))
            return fetch(ids)

        return blocks.ExpertWeights(w.n, counted, w.act_fn)

    real_stats_of = pipeline.stats_of

    def stats_of(x, hessian, rows=4096):
        alive_max[0] = max(alive_max[0], len(alive))
        return real_stats_of(x, hessian, rows)

    monkeypatch.setattr(LayerStats, "__init__", tracked)
    monkeypatch.setattr(Streamed, "experts", experts)
    monkeypatch.setattr(pipeline, "stats_of", stats_of)
    compress_streamed(str(src), tmp_path / "out", CALIB, recipe(), torch.device("cpu"),
                      torch.float32, batch_size=2, progress=False, expert_chunk=3)
    assert chunks and max(chunks) == 3 and set(chunks) == {3, 2}  # 8 experts: 3 + 3 + 2
    # while experts are calibrated: the previous expert's two Hessians at most, never all 16
    assert alive_max[0] <= 2


@pytest.mark.parametrize("where", ["host", "disk"])
def test_activations_spilled_to_host_or_disk_change_nothing(tmp_path, where):
    _, src = _saved(tmp_path, "tiny-random-deepseek-v3")
    compress_streamed(str(src), tmp_path / "device", CALIB, recipe(), torch.device("cpu"),
                      torch.float32, batch_size=2, progress=False, activations="device")
    compress_streamed(str(src), tmp_path / where, CALIB, recipe(), torch.device("cpu"),
                      torch.float32, batch_size=2, progress=False, activations=where)
    assert _digests(tmp_path / where) == _digests(tmp_path / "device")


def test_activations_place_themselves():
    acts = blocks.Activations(torch.device("cpu"), "auto")
    assert acts.place(10**12) == "device"  # a CPU run keeps them in memory
    # a set that grows with depth (the Fisher walk's block inputs) never goes to host memory
    assert blocks.Activations(torch.device("cpu"), "auto", allow_host=False).place(1) == "disk"
    assert blocks.Activations(torch.device("cpu"), "host", allow_host=False).place(1) == "host"
    with pytest.raises(ValueError, match="activations"):
        blocks.Activations(torch.device("cpu"), "floppy")


_RSS_PROBE = """
import json, sys, torch
from pathlib import Path
from ciuic_lab.compress.walk.pipeline import compress_streamed
from ciuic_lab.compress.prune.sparsegpt import SparseGPT
from ciuic_lab.compress.quant.gptq import GPTQ
from ciuic_lab.eval.memory import PeakMemory
from ciuic_lab.models.loader import skeleton
torch.set_num_threads(1)
src, out = sys.argv[1], sys.argv[2]
calib = torch.randint(0, 256, (4, 64))
skeleton(src, torch.float32)  # import the architecture's modules before measuring
with PeakMemory("cpu") as before:
    pass
with PeakMemory("cpu") as pm:
    compress_streamed(src, out, calib, [SparseGPT(0.5), GPTQ(4, 128, policy="sensitivity")],
                      torch.device("cpu"), torch.float32, batch_size=2, progress=False)
print(json.dumps({"extra": pm.peak_bytes - before.peak_bytes}))
"""


def _streamed_rss(src: Path, out: Path) -> int:
    r = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(src), str(out)], capture_output=True,
                       text=True, check=True, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(r.stdout.strip().splitlines()[-1])["extra"]


@pytest.mark.slow
def test_streamed_host_memory_does_not_grow_with_depth(tmp_path):
    """Peak host memory of a streamed run (fresh processes) stays below the shallower checkpoint's
    size and grows less than 10 % when the depth doubles (blocks of ~50 MB)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    sizes, extra = {}, {}
    for layers in (6, 12):
        cfg = DeepseekV3Config(vocab_size=256, hidden_size=512, intermediate_size=2048,
                               moe_intermediate_size=768, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                               n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                               n_group=1, topk_group=1, q_lora_rank=64, kv_lora_rank=64,
                               qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                               tie_word_embeddings=False)
        torch.manual_seed(0)
        src = tmp_path / f"src{layers}"
        DeepseekV3ForCausalLM(cfg).save_pretrained(src, max_shard_size="50MB")
        sizes[layers] = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        extra[layers] = _streamed_rss(src, tmp_path / f"out{layers}")
    assert sizes[12] > 1.8 * sizes[6]
    assert extra[6] < sizes[6] and extra[12] < sizes[6], (extra, sizes)
    assert extra[12] < 1.1 * extra[6], (extra, sizes)


def test_cli_streamed_run_measures_the_dense_baseline_and_compression_costs(tmp_path):
    tok = load_tokenizer("tiny-random-deepseek-v3")
    torch.manual_seed(0)
    model = tiny.build("tiny-random-deepseek-v3", vocab=len(tok))
    write_fp8_checkpoint(model, tmp_path / "fp8")
    tok.save_pretrained(tmp_path / "fp8")
    r = subprocess.run([sys.executable, "-m", "ciuic_lab.run", "model=hub",
                        f"model.name_or_path={tmp_path / 'fp8'}", "compress.stream=true",
                        "eval.stream=true", "eval.max_windows=2", "eval.seqlen=128",
                        "data.calib_samples=4", "data.calib_seqlen=64", "progress=false",
                        "eval.lm_eval.enabled=false", "tracker=none",
                        f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    m = res["metrics"]
    assert 0 < m["ppl/wikitext2_dense"] < float("inf") and 0 < m["ppl/wikitext2"] < float("inf")
    for k in ("mem/compress_peak_device_bytes", "mem/compress_peak_host_bytes", "time/compress_s",
              "time/profile_s"):
        assert m[k] > 0, k
    assert all(row["block_s"] > 0 for row in res["layers"])
    assert any("block by block" in n and "generations" in n for n in res["notes"])
    assert (tmp_path / "run" / "compressed" / "compressed.json").exists()


@pytest.mark.parametrize("arch, tied", [("tiny-random-deepseek-v3", False),
                                        ("tiny-random-llama", False), ("tiny-random-llama", True)])
def test_streamed_rotated_run_stores_what_the_in_memory_rotated_run_stores(tmp_path, arch, tied):
    from ciuic_lab.compress.rotate import apply_rotations
    from ciuic_lab.compress.rotate.streamed import StreamedRotation

    model, src = _saved(tmp_path, arch, tied=tied)
    rotation = StreamedRotation(model.config, "hadamard", value_path=True, seed=3)
    compress_streamed(str(src), tmp_path / "streamed", CALIB, recipe(), torch.device("cpu"),
                      torch.float32, batch_size=2, progress=False, transform=rotation)
    in_memory = copy.deepcopy(model)
    info = apply_rotations(in_memory, "hadamard", value_path=True, seed=3)
    # a tied head is untied alike in both: stored on its own, counted, and the config says so
    assert rotation.untied_head_bytes == info["untied_head_bytes"] == (256 * 64 * 4 if tied else 0)
    manifest = checkpoint.read_manifest(tmp_path / "streamed")
    assert manifest["model_config"]["tie_word_embeddings"] is False and not manifest["aliases"]
    compress_model(in_memory, CALIB, recipe(), batch_size=2, progress=False)
    checkpoint.save(in_memory, tmp_path / "memory")
    assert _digests(tmp_path / "streamed") == _digests(tmp_path / "memory")
    want = perplexity(in_memory, EVAL, batch_size=2, progress=False)
    assert perplexity(checkpoint.load(tmp_path / "streamed"), EVAL, 2, False) == want
    # the rotation really happened: without it the stored bytes differ
    compress_streamed(str(src), tmp_path / "plain", CALIB, recipe(), torch.device("cpu"),
                      torch.float32, batch_size=2, progress=False)
    assert _digests(tmp_path / "plain") != _digests(tmp_path / "streamed")


def test_streamed_rotation_reads_experts_rotated_and_keeps_the_dense_function(tmp_path):
    """A streamed, rotated, uncompressed walk of the blocks computes the dense model's
    perplexity: every part (ends, blocks, expert chunks) got its share of Q and Qᵀ."""
    from ciuic_lab.compress.rotate.streamed import StreamedRotation

    model, src = _saved(tmp_path, "tiny-random-deepseek-v3")
    want = perplexity(model, EVAL, batch_size=2, progress=False)
    rotation = StreamedRotation(model.config, "hadamard", value_path=True, seed=0)
    streamed = Streamed(skeleton(str(src), torch.float32), CheckpointSource.from_dir(src), "cpu",
                        rotation)
    assert not torch.equal(streamed.model.model.embed_tokens.weight,
                           model.model.embed_tokens.weight)
    got = streamed_perplexity(streamed, EVAL, batch_size=2, progress=False, expert_chunk=2)
    assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("arch, tied", [("tiny-random-deepseek-v3", False),
                                        ("tiny-random-llama", True)])
def test_run_streams_a_rotated_model_like_the_in_memory_run(tmp_path, arch, tied):
    from ciuic_lab import runner
    from ciuic_lab.config import compose

    tok = load_tokenizer(arch)
    _, src = _saved(tmp_path, arch, vocab=len(tok), tied=tied)
    tok.save_pretrained(src)
    quick = ["model=hub", f"model.name_or_path={src}", "rotate=hadamard", "eval.max_windows=2",
             "eval.seqlen=64", "data.calib_samples=4", "data.calib_seqlen=32", "progress=false",
             "eval.lm_eval.enabled=false", "eval.generate.enabled=false", "eval.speed=false",
             "tracker=none", "eval.dense_baseline=false"]
    streamed = runner.run(compose([*quick, "compress.stream=true", "eval.stream=true"]),
                          out_dir=tmp_path / "s")
    in_memory = runner.run(compose([*quick, "save=true"]), out_dir=tmp_path / "m")
    assert _digests(tmp_path / "s" / "compressed") == _digests(tmp_path / "m" / "compressed")
    assert streamed.metrics["ppl/wikitext2"] == pytest.approx(in_memory.metrics["ppl/wikitext2"],
                                                              rel=1e-5)
    assert any("rotate" in n for n in streamed.notes)
    head = streamed.metrics["rotate/untied_head_bytes"]
    assert head == in_memory.metrics["rotate/untied_head_bytes"]
    assert head == (len(tok) * 64 * 4 if tied else 0)
    assert streamed.metrics["mem/weight_bytes"] == in_memory.metrics["mem/weight_bytes"]
    from ciuic_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="rotate.online"):
        runner.run(compose([*quick, "compress.stream=true", "rotate=hadamard_online"]))


def test_a_hub_id_streams_from_the_hf_cache_like_its_local_directory(tmp_path, monkeypatch):
    """A hub id resolves to its snapshot in the HF cache (offline in the suite) and streams to
    the same shards as the directory itself."""
    import shutil

    from huggingface_hub import constants

    _, src = _saved(tmp_path, "tiny-random-deepseek-v3")
    repo = tmp_path / "hub" / "models--acme--tiny-v3"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(src, repo / "snapshots" / "abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = CheckpointSource.open("acme/tiny-v3")
    assert Path(source.dir) == repo / "snapshots" / "abc123"
    compress_streamed("acme/tiny-v3", tmp_path / "hub_run", CALIB, recipe(), torch.device("cpu"),
                      torch.float32, batch_size=2, progress=False)
    compress_streamed(str(src), tmp_path / "dir_run", CALIB, recipe(), torch.device("cpu"),
                      torch.float32, batch_size=2, progress=False)
    assert _digests(tmp_path / "hub_run") == _digests(tmp_path / "dir_run")
