import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from ciuic_lab.eval.memory import PeakMemory, stored_bytes
from ciuic_lab.eval.perplexity import nll_sum, perplexity
from ciuic_lab.eval.speed import tokens_per_second

VOCAB = 97


@pytest.fixture(scope="module")
def llama():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


class Uniform(torch.nn.Module):
    """Logits all equal: every next token has probability 1/vocab."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, **kw):
        return torch.zeros(*input_ids.shape, self.vocab) + self.anchor


class Bigram(torch.nn.Module):
    """Logits depend on the current token only, so the NLL of any text is known by hand."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids, **kw):
        return self.table[input_ids]


def test_uniform_logits_give_vocab_size():
    windows = torch.randint(0, 50, (3, 17))
    assert perplexity(Uniform(50), windows, progress=False) == pytest.approx(50.0, rel=1e-6)


def test_matches_manual_computation(llama):
    windows = torch.randint(0, VOCAB, (5, 12))
    with torch.no_grad():
        logits = llama(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    expected = math.exp(nll.item())
    for bs in (1, 2, 5):  # a ragged last batch must weigh every token equally
        assert perplexity(llama, windows, batch_size=bs, progress=False) == pytest.approx(
            expected, rel=1e-5)


def test_counts_every_predicted_token_and_restores_mode():
    torch.manual_seed(1)
    m = Bigram(11).train()
    windows = torch.randint(0, 11, (4, 9))
    total, count = nll_sum(m, windows, batch_size=3, progress=False)
    assert count == 4 * 8
    logp = torch.log_softmax(m.table.detach(), -1)
    manual = -sum(logp[w[t], w[t + 1]].item() for w in windows for t in range(8))
    assert total == pytest.approx(manual, rel=1e-6)
    assert m.training  # evaluation does not leave the model in another mode


def test_long_windows_are_chunked_exactly(monkeypatch):
    import ciuic_lab.eval.perplexity as P

    m = Bigram(13)
    windows = torch.randint(0, 13, (2, 40))
    ref = perplexity(m, windows, progress=False)
    monkeypatch.setattr(P, "_LOSS_CHUNK", 7)
    assert perplexity(m, windows, progress=False) == pytest.approx(ref, rel=1e-6)


def test_bf16_logits_are_scored_in_float32():
    m = Bigram(13).to(torch.bfloat16)
    windows = torch.randint(0, 13, (2, 20))
    logits = m.table.detach()[windows]
    as_f32 = F.cross_entropy(logits[:, :-1].float().reshape(-1, 13), windows[:, 1:].reshape(-1))
    as_bf16 = F.cross_entropy(logits[:, :-1].reshape(-1, 13), windows[:, 1:].reshape(-1))
    ppl = perplexity(m, windows, progress=False)
    assert ppl == pytest.approx(math.exp(as_f32.item()), rel=1e-6)
    assert abs(ppl - math.exp(as_bf16.float().item())) > 1e-4 * ppl  # the test can tell them apart


def test_rejects_bad_windows():
    with pytest.raises(ValueError):
        perplexity(Uniform(5), torch.zeros(3, 1, dtype=torch.long), progress=False)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)                 # 40 floats
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight                   # tied: counted once
        self.norm = torch.nn.LayerNorm(4)                    # 8 floats
        self.register_buffer("codes", torch.zeros(6, dtype=torch.uint8))           # 6 bytes
        self.register_buffer("scales", torch.zeros(3, dtype=torch.float16))        # 6 bytes
        self.register_buffer("inv_freq", torch.zeros(100), persistent=False)       # a cache
        self.register_buffer("alias", self.codes)            # the same storage again


def test_stored_bytes_dedups_ties_and_skips_caches():
    assert stored_bytes(Tied()) == 40 * 4 + 8 * 4 + 6 + 6


def test_stored_bytes_counts_views_of_one_storage_separately():
    m = torch.nn.Module()
    base = torch.zeros(10)
    m.register_buffer("a", base[:4])
    m.register_buffer("b", base[4:])
    assert stored_bytes(m) == 40


def test_stored_bytes_of_hf_model_matches_parameters(llama):
    expected = sum(p.numel() * 4 for p in llama.parameters())
    assert stored_bytes(llama) == expected  # rotary inv_freq is non-persistent


_PEAK_PROBE = """
import sys, time, torch
import ciuic_lab.eval.memory as M
from ciuic_lab.eval.memory import PeakMemory
if sys.argv[1] == "sampled":
    M._reset_hwm = lambda: False
with PeakMemory("cpu") as idle:
    pass
with PeakMemory(torch.device("cpu")) as pm:
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    time.sleep(0.05)  # give the sampler a few ticks while the tensor is alive
    del x
print(pm.kind, pm.method, pm.peak_bytes - idle.peak_bytes)
"""


@pytest.mark.parametrize("mode", ["vmhwm", "sampled"])
def test_peak_memory_cpu_sees_a_transient_allocation(mode):
    # A fresh process: in a long test session freed memory may be reused without new pages.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, mode], capture_output=True,
                         text=True, check=True).stdout.split()
    kind, method, extra = out[-3], out[-2], int(out[-1])
    assert kind == "cpu_peak_rss" and method == mode
    assert extra >= 48 * 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda():
    with PeakMemory("cuda") as pm:
        x = torch.ones(2**20, device="cuda")
        del x
    assert pm.kind == "cuda_max_allocated" and pm.peak_bytes >= 4 * 2**20


def test_tokens_per_second_positive_and_counts_tokens(llama, monkeypatch):

    windows = torch.randint(0, VOCAB, (20, 16))
    calls = []
    orig = llama.forward

    def spy(*a, **kw):
        calls.append(kw["input_ids"].shape[0])
        return orig(*a, **kw)

    monkeypatch.setattr(llama, "forward", spy)
    tps = tokens_per_second(llama, windows, batch_size=2, max_windows=6)
    assert tps > 0
    assert calls == [1, 2, 2, 2]  # warm-up one window, then 6 windows in batches of 2


@pytest.mark.parametrize("module", ["torch", "transformers"])
def test_the_dense_cache_key_holds_torch_and_transformers_versions(monkeypatch, module):
    """An upgrade of either can change the dense numbers, so it must not read the old entry."""
    import importlib

    from omegaconf import OmegaConf

    from ciuic_lab import cache
    from ciuic_lab.eval.suite import Suite

    suite = Suite.__new__(Suite)  # the key needs only the config, not the test windows
    suite.cfg = OmegaConf.create({"model": {"name_or_path": "tiny-random-llama", "revision": None},
                                  "seed": 0})
    before = cache.key(suite._key_of(torch.float32, "cpu", 4, "windows"))
    monkeypatch.setattr(importlib.import_module(module), "__version__", "99.0.0")
    assert cache.key(suite._key_of(torch.float32, "cpu", 4, "windows")) != before
