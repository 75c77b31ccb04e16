import json
import math

import pytest
import torch

from ciuic_lab.data.calibration import CALIB_DIR
from ciuic_lab.data.layout import hf_rows, hf_stream
from ciuic_lab.tools import pretrain
from ciuic_lab.tools.wikistyle import to_wikitext_style, tokenize_line

# --- wikistyle ------------------------------------------------------------------------------


@pytest.mark.parametrize("plain, wiki", [
    ("He had a guest-starring role in 2000.", "He had a guest @-@ starring role in 2000 ."),
    ("It sold 1,500,000 copies, worth $3.5 million.",
     "It sold 1 @,@ 500 @,@ 000 copies , worth $ 3 @.@ 5 million ."),
    ("In \"Teddy's Story\" (2004) he didn't win; the Beach Boys' hit won.",
     "In \" Teddy 's Story \" ( 2004 ) he didn 't win ; the Beach Boys ' hit won ."),
    ("Mr. Smith visited the U.S. and St. Louis in 1990–1995.",
     "Mr. Smith visited the U.S. and St. Louis in 1990 – 1995 ."),
    ("Rated 80% by 5 km/h winds: done!", "Rated 80 % by 5 km / h winds : done !"),
])
def test_tokenize_line_matches_wikitext(plain, wiki):
    assert tokenize_line(plain) == wiki


def test_article_layout_like_wiki_test_raw():
    page = ("ROBERT BOULTER is an English actor.[1] He had a guest-starring role.[2][3]\n\n"
            "He was born in 1978.\n\n\nCareer\n\nHe appeared in films.[4]\n\n2000–2005\n\n"
            "He starred in a play.\n\n\nReferences\n\n1. Some citation.\n")
    out = to_wikitext_style(page, "Robert Boulter")
    assert out == (" \n = Robert Boulter = \n \n"
                   " Robert Boulter is an English actor . He had a guest @-@ starring role . \n"
                   " He was born in 1978 . \n \n = = Career = = \n \n"
                   " He appeared in films . \n \n = = = 2000 – 2005 = = = \n \n"
                   " He starred in a play . \n")


def test_tables_latex_and_captions_dropped():
    page = ("Intro text here.\n\n+----+----+\n| a  | b  |\n\n"
            "  ------ -------\n  NAME   YEAR\n\n$$\\frac{a}{b}$$\n\n"
            "A caption of a map.]] The town grew.\n")
    out = to_wikitext_style(page)
    assert out == " Intro text here . \n The town grew . \n"


def test_hf_stream_is_the_eval_layout():
    text = " \n = T = \n \n A . \n B . \n"
    assert hf_rows(text) == ["", " = T = \n", "", " A . \n", " B . \n"]
    assert hf_stream(text) == "\n\n = T = \n\n\n\n\n A . \n\n\n B . \n"


# --- training maths -------------------------------------------------------------------------


def test_lr_schedule():
    assert pretrain.lr_at(0, 0.0, 1.0, warmup=10) == pytest.approx(0.1)
    assert pretrain.lr_at(9, 0.0, 1.0, warmup=10) == pytest.approx(1.0)
    assert pretrain.lr_at(50, 0.5, 1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.55)
    assert pretrain.lr_at(99, 1.0, 1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert pretrain.lr_at(99, 3.0, 1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.1)


def test_balance_bias_moves_towards_mean_load():
    b = pretrain.balance_bias(torch.zeros(4), torch.tensor([10.0, 0.0, 5.0, 5.0]), 0.01)
    assert torch.allclose(b, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_split_excludes_calibration_articles():
    names = [f"p{i}.md" for i in range(20)]
    calib = set(names[:15])
    val = pretrain.split_articles(names, 4, seed=0, exclude=calib)
    assert len(val) == 4 and not set(val) & calib
    assert val == pretrain.split_articles(names, 4, seed=0, exclude=calib)
    assert pretrain.split_articles(names[:2], 5, seed=0, exclude=set()) != names[:2]
    bundled = pretrain.calibration_names()
    assert len(bundled) == 60 and "Coal.md" not in bundled


def test_pack_windows():
    ids = [torch.arange(5), torch.arange(5, 12)]
    w = pretrain.pack(ids, 4, offset=1)
    assert w.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


@pytest.mark.parametrize("arch", sorted(pretrain.ARCHS))
def test_reference_archs_in_budget(arch):
    from transformers import AutoModelForCausalLM

    cfg = pretrain.build_config(arch, 8192, 512)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 5e6 <= n <= 12.5e6 and n * 2 < 25e6
    assert cfg.hidden_size >= 256 and cfg.vocab_size == 8192 and cfg.max_position_embeddings >= 512
    if arch == "deepseek-v3-tiny":
        assert cfg.n_routed_experts >= 8 and cfg.n_shared_experts >= 1
        assert cfg.num_experts_per_tok == 2 and cfg.first_k_dense_replace == 1
        assert cfg.q_lora_rank and cfg.kv_lora_rank and cfg.n_group == cfg.topk_group == 1


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(pretrain.ARCHS))
def test_pretrain_end_to_end(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Plain-prose pages, named so none is a calibration article; text from the bundled slice.
    text = (CALIB_DIR / "wikipedia-calib.txt").read_text().split("\n")
    pages = tmp_path / "pages"
    pages.mkdir()
    for i in range(3):
        body = "\n\n".join(line.strip() for line in text[400 * i: 400 * i + 120] if len(line) > 80)
        (pages / f"Page_{i}.md").write_text(body)
    out = tmp_path / "model"
    log = pretrain.main([
        "--arch", arch, "--corpus", str(pages), "--out", str(out), "--steps", "3",
        "--batch-size", "2", "--seqlen", "32", "--tiny-test", "--val-articles", "1",
        "--eval-every", "2", "--val-windows", "4", "--wikitext-windows", "2", "--device", "cpu",
        "--no-progress"])
    assert log["steps"] == 3 and log["tokens_seen"] == 3 * 2 * 32
    assert [v["step"] for v in log["val_history"]] == [2, 3]
    assert math.isfinite(log["final_val_loss"]) and log["wikitext2_ppl"] > 1
    saved = json.loads((out / "training_log.json").read_text())
    assert saved["val_articles"] == log["val_articles"] and len(saved["val_articles"]) == 1
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert all(f.stat().st_size <= 25e6 for f in out.glob("*.safetensors"))

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16 and len(tok) == model.config.vocab_size
    x = tok(" The town grew .", return_tensors="pt").input_ids
    assert torch.isfinite(model(x).logits.float()).all()



def test_pretrain_reproducible_from_cache(tmp_path):
    args = ["--arch", "deepseek-llm-tiny", "--steps", "2", "--batch-size", "2", "--seqlen", "32",
            "--tiny-test", "--val-articles", "1", "--val-windows", "4", "--eval-every", "5",
            "--wikitext-windows", "0",
            "--device", "cpu", "--no-progress"]
    pages = tmp_path / "pages"
    pages.mkdir()
    for i in range(2):
        (pages / f"P{i}.txt").write_text(" ".join(f"Sentence {j} of page {i} is here." for j in range(60)))
    cache = tmp_path / "cache.pt"
    a = pretrain.main(args + ["--corpus", str(pages), "--out", str(tmp_path / "a"),
                              "--save-cache", str(cache)])
    b = pretrain.main(args + ["--corpus", str(cache), "--out", str(tmp_path / "b")])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["val_articles"] == b["val_articles"]


def test_pretrain_needs_no_lab_dependencies():
    # The GPU machine has torch/transformers/tokenizers/tqdm/matplotlib only.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'hydra', 'omegaconf', 'wandb', 'datasets', 'pandas'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from ciuic_lab.tools import pretrain\n"
        "pretrain.build_config('deepseek-v3-tiny', 8192, 512)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]


def test_experts_kernel_falls_back(monkeypatch):
    from contextlib import nullcontext

    assert pretrain.experts_candidates("cuda", "auto") == ["grouped_mm", "eager"]
    assert pretrain.experts_candidates("cpu", "auto") == ["eager"]
    cfg = pretrain.build_config("deepseek-v3-tiny", 64, 512, tiny_test=True)
    model = pretrain.build_model(cfg, seed=0)
    real = model.set_experts_implementation

    def flaky(impl):  # a device whose grouped_mm kernel is missing
        if impl == "grouped_mm":
            raise RuntimeError("no grouped_mm kernel")
        real(impl)

    monkeypatch.setattr(model, "set_experts_implementation", flaky)
    monkeypatch.setattr(pretrain, "experts_candidates", lambda d, r: ["grouped_mm", "eager"])
    assert pretrain.pick_experts_impl(model, torch.device("cpu"), "auto", nullcontext) == "eager"
    assert all(p.grad is None for p in model.parameters())
    llama = pretrain.build_model(pretrain.build_config("deepseek-llm-tiny", 64, 512, True), 0)
    assert pretrain.pick_experts_impl(llama, torch.device("cpu"), "auto", nullcontext) is None
