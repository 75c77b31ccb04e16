"""Chunked attention (eval/attention.py) computes what one SDPA call computes, and a streamed
evaluation of windows longer than a chunk gives the in-memory perplexity."""

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ciuic_lab.compress.walk.blocks import Streamed
from ciuic_lab.eval import attention
from ciuic_lab.eval.perplexity import perplexity
from ciuic_lab.eval.streamed import streamed_perplexity
from ciuic_lab.models import tiny
from ciuic_lab.models.loader import skeleton
from ciuic_lab.models.source import CheckpointSource


def _qkv(q_len, kv_len, heads=4, kv_heads=4, d=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, q_len, d, generator=g), torch.randn(2, kv_heads, kv_len, d, generator=g),
            torch.randn(2, kv_heads, kv_len, dv, generator=g))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("case", ["causal", "causal_longer_keys", "padding_mask", "not_causal"])
def test_chunked_attention_equals_one_call(monkeypatch, heads, kv_heads, case):
    monkeypatch.setattr(attention, "CHUNK", 16)
    q_len = 50
    kv_len = 70 if case == "causal_longer_keys" else q_len
    q, k, v = _qkv(q_len, kv_len, heads, kv_heads)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=case != "not_causal")
    mask = None
    if case == "padding_mask":  # (b, 1, q, kv) bool, True = attend: causal, first 5 keys of row 1 padded
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
        mask[1, :, :, :5] = False
        mask[1, :, :5, 0] = True  # a padded row still attends somewhere (no all -inf row)
    if case == "causal_longer_keys":  # as a cache would give: queries are the last q_len positions
        rows = torch.arange(q_len) + (kv_len - q_len)
        ref_mask = (torch.arange(kv_len)[None] <= rows[:, None])[None, None]
        want, _ = sdpa_attention_forward(module, q, k, v, ref_mask, scaling=0.25, is_causal=False)
    else:
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    got, _ = attention.chunked_sdpa(module, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (2, q_len, heads, v.shape[-1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_attention_bounds_the_score_matrix(monkeypatch):
    """Every SDPA call sees at most CHUNK query rows (the (b, h, q, kv) scores it may build)."""
    monkeypatch.setattr(attention, "CHUNK", 16)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *a, **kw):
        seen.append(query.shape[2])
        return real(query, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(50, 50)
    attention.chunked_sdpa(SimpleNamespace(is_causal=True), q, k, v, None)
    assert seen == [16, 16, 16, 2]


@pytest.mark.parametrize("arch", ["tiny-random-deepseek-v3", "tiny-random-llama"])
def test_streamed_perplexity_of_long_windows_equals_in_memory(tmp_path, monkeypatch, arch):
    monkeypatch.setattr(attention, "CHUNK", 16)
    torch.manual_seed(0)
    model = tiny.build(arch, vocab=256)
    model.save_pretrained(tmp_path / "src")
    windows = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(3))
    want = perplexity(model, windows, batch_size=1, progress=False)
    sk = skeleton(str(tmp_path / "src"), torch.float32, False, None)
    assert sk.config._attn_implementation == "sdpa"
    provider = Streamed(sk, CheckpointSource.open(str(tmp_path / "src"), None), torch.device("cpu"))
    got = streamed_perplexity(provider, windows, batch_size=1, progress=False)
    assert got == pytest.approx(want, rel=1e-5)
    assert sk.config._attn_implementation == "sdpa"  # restored
