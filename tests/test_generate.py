import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ciuic_lab.eval.generate import greedy_continuations, side_by_side

PROMPTS = ["The capital of France is", "Once upon a time,", "Question: 2 + 2 =\nAnswer:"]


def _tokenizer():
    from transformers import AutoTokenizer

    from ciuic_lab.models.loader import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _by_hand(model, tok, prompt, n):
    """Argmax decoding with full forwards: what greedy generation must reproduce."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() == tok.eos_token_id:
                break
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def test_greedy_matches_argmax_decoding(model, tok):
    out = greedy_continuations(model, tok, PROMPTS, max_new_tokens=6)
    assert len(out) == len(PROMPTS) and all(isinstance(s, str) for s in out)
    assert out == [_by_hand(model, tok, p, 6) for p in PROMPTS]
    assert any(out)  # a random model still emits something


def test_each_prompt_independent_and_deterministic(model, tok):
    both = greedy_continuations(model, tok, PROMPTS[:2], max_new_tokens=5)
    assert both == greedy_continuations(model, tok, PROMPTS[:2], max_new_tokens=5)
    assert both[1] == greedy_continuations(model, tok, PROMPTS[1:2], max_new_tokens=5)[0]


def test_training_flag_restored(model, tok):
    model.train()
    try:
        greedy_continuations(model, tok, PROMPTS[:1], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_side_by_side_rows():
    rows = side_by_side(["p1", "p2"], ["d1", "d2"], ["c1", "c2"])
    assert rows == [{"prompt": "p1", "dense": "d1", "compressed": "c1"},
                    {"prompt": "p2", "dense": "d2", "compressed": "c2"}]
    with pytest.raises(ValueError):
        side_by_side(["p1"], ["d1", "d2"], ["c1"])
