"""The trained reference models: load offline, match their cards, and give the bench real signal."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ciuic_lab.data.wikitext import test_windows as wikitext_windows
from ciuic_lab.eval.perplexity import perplexity
from ciuic_lab.models.loader import BUNDLED_DIR, load

NAMES = ["deepseek-v3-tiny", "deepseek-llm-tiny"]


@pytest.mark.parametrize("name", NAMES)
def test_loads_offline_with_hf_classes_and_fits_the_spec(name):
    path = BUNDLED_DIR / name
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    assert 5e6 <= params <= 12.5e6
    assert all(f.stat().st_size <= 25e6 for f in path.glob("*.safetensors"))
    c = model.config
    assert c.hidden_size >= 256 and c.max_position_embeddings >= 512 and len(tok) == c.vocab_size
    if name == "deepseek-v3-tiny":
        assert c.model_type == "deepseek_v3" and c.n_routed_experts >= 8 and c.n_shared_experts >= 1
        assert c.first_k_dense_replace == 1 and c.q_lora_rank and c.kv_lora_rank
    else:
        assert c.model_type == "llama"
    assert (path / "README.md").exists() and (path / "loss_curve.png").exists()


def _first64(name):
    model, tok = load(name, device="cpu", dtype="float32")
    return perplexity(model, wikitext_windows(tok, 512)[:64], batch_size=8, progress=False)


def test_v3_card_perplexity_is_reproduced_within_1_percent():
    card = json.loads((BUNDLED_DIR / "deepseek-v3-tiny" / "card_metrics.json").read_text())
    got = _first64("deepseek-v3-tiny")
    assert got == pytest.approx(card["wikitext2_ppl_first64"], rel=0.01)
    assert card["wikitext2_ppl"] < 8192 / 20  # clearly trained: far below the vocabulary size


@pytest.mark.slow
def test_llm_card_perplexity_is_reproduced_within_1_percent():
    card = json.loads((BUNDLED_DIR / "deepseek-llm-tiny" / "card_metrics.json").read_text())
    assert _first64("deepseek-llm-tiny") == pytest.approx(card["wikitext2_ppl_first64"], rel=0.01)
    assert card["wikitext2_ppl"] < 8192 / 20


@pytest.mark.slow
def test_bench_sanity_on_v3():
    """8-bit RTN is nearly free, 2-bit per channel is severe, 50% magnitude pruning is measurable."""
    from ciuic_lab.api import compress

    def ppl(overrides):
        model, tok = load("deepseek-v3-tiny", device="cpu", dtype="float32")
        if overrides:
            plain = ["recipe=none", "prune=none", "lowrank=none", "quant=none"]
            model, _ = compress(model, tok, plain + overrides, progress=False)
        return perplexity(model, wikitext_windows(tok, 512)[:16], batch_size=8, progress=False)

    torch.manual_seed(0)
    dense = ppl([])
    assert abs(ppl(["quant=rtn", "quant.bits=8", "quant.group_size=-1"]) / dense - 1) < 0.01
    assert ppl(["quant=rtn", "quant.bits=2", "quant.group_size=-1"]) > 1.3 * dense
    assert ppl(["prune=magnitude", "prune.sparsity=0.5"]) > 1.03 * dense
