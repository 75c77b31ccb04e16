import hashlib
import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

pytest.importorskip("lm_eval")

from ciuic_lab.eval import lm_eval_bridge as bridge
from ciuic_lab.eval.tasks import TASKS_DIR
from ciuic_lab.eval.tasks.process import dedupe_choices, split_pages

BUNDLED_SHA256 = {  # from each task's PROVENANCE.md: the bundled files are unmodified copies
    "arc_easy/arc_easy.jsonl": "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5",
    "arc_challenge/arc_challenge.jsonl":
        "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636",
    "piqa/piqa.jsonl": "d2870e73aec5154df3faf259b7700876e11608eebdf69e9d6667435673dbe4e0",
    "winogrande/winogrande.jsonl":
        "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7",
    "openbookqa/openbook_qa.jsonl":
        "adb2e5c7f8db810ddad4d6b2bf53dcc86dcc545499f7aafcaf42a8e179476c09",
    "lambada_openai/lambada_test.jsonl":
        "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    "wikitext/wiki.test.raw": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
}
STANDARD = ["arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "lambada_openai",
            "wikitext"]


def _tokenizer():
    from transformers import AutoTokenizer

    from ciuic_lab.models.loader import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _llama(vocab):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(tok):
    return _llama(len(tok))


# ---------------------------------------------------------------- bundled tasks, no model


def test_bundled_data_are_the_provenance_files():
    for rel, sha in BUNDLED_SHA256.items():
        assert hashlib.sha256((TASKS_DIR / rel).read_bytes()).hexdigest() == sha, rel
        assert (TASKS_DIR / rel).with_name("PROVENANCE.md").exists()


def test_bundled_tasks_have_standard_names():
    assert set(STANDARD) <= set(bridge.local_tasks())


def test_wikitext_pages_rebuild_the_raw_file():
    raw = (TASKS_DIR / "wikitext/wiki.test.raw").read_text()
    pages = split_pages(raw)
    assert len(pages) == 62  # EleutherAI/wikitext_document_level wikitext-2-raw-v1 test rows
    assert all(p.startswith(" = ") and not p.startswith(" = = ") for p in pages)
    assert " \n" + "\n".join(pages) == raw  # nothing lost but the blank line before article 1


def test_dedupe_choices_restores_three_options():
    import datasets

    ds = datasets.Dataset.from_list([
        {"query": "q", "choices": ["up", "up", "down", "same"], "gold": 2},
        {"query": "q", "choices": ["a", "b", "c", "d"], "gold": 3}])
    out = dedupe_choices(ds)
    assert out[0]["choices"] == ["up", "down", "same"] and out[0]["gold"] == 1
    assert out[1]["choices"] == ["a", "b", "c", "d"] and out[1]["gold"] == 3


def _docs(name):
    from lm_eval.api.task import ConfigurableTask

    task = ConfigurableTask(config=bridge.task_config(bridge.local_tasks()[name]))
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    return task, docs


def test_bundled_prompts_match_the_standard_templates():
    task, docs = _docs("arc_easy")
    assert len(docs) == 2376
    assert task.doc_to_text(docs[0]) == ("Question: Which statement best explains why "
                                         "photosynthesis is the foundation of most food webs?"
                                         "\nAnswer:")
    assert task.doc_to_target(docs[0]) == 0 and len(task.doc_to_choice(docs[0])) == 4
    assert sum(len(d["choices"]) == 3 for d in docs) == 7  # the padded rows, de-padded

    task, docs = _docs("piqa")
    assert len(docs) == 1838
    assert task.doc_to_text(docs[0]) == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:")

    task, docs = _docs("winogrande")
    assert len(docs) == 1267 and task.multiple_input == 2  # partial scoring
    assert task.doc_to_choice(docs[0])[1].endswith("so Maria")
    assert task.doc_to_target(docs[0]) == "always got the easier cases."

    task, docs = _docs("lambada_openai")
    assert len(docs) == 5153
    assert task.doc_to_target(docs[0]) == " signs"
    assert task.doc_to_text(docs[0]).endswith("I don't care about")

    task, docs = _docs("wikitext")
    assert len(docs) == 62 and task.OUTPUT_TYPE == "loglikelihood_rolling"
    assert task.doc_to_target(docs[0]).startswith(" = Robert Boulter =")


def test_task_config_paths(tmp_path):
    cfg = bridge.task_config(bridge.local_tasks()["arc_challenge"])  # via include: arc_easy
    path = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert path.is_absolute() and path == TASKS_DIR / "arc_challenge/arc_challenge.jsonl"
    assert callable(cfg["process_docs"]) and cfg["task"] == "arc_challenge"
    # a hub dataset's data_files are repository paths: left alone
    (tmp_path / "hubtask.yaml").write_text(
        "task: hubtask\ndataset_path: org/repo\ndataset_kwargs:\n  data_files: x/*.parquet\n")
    assert bridge.task_config(tmp_path / "hubtask.yaml")["dataset_kwargs"]["data_files"] == \
        "x/*.parquet"


def test_specs_route_names():
    specs = bridge.task_specs(["piqa", "hub:piqa", "hellaswag"])
    assert isinstance(specs[0], dict) and specs[0]["task"] == "piqa"
    assert specs[1:] == ["piqa", "hellaswag"]


def test_flatten_results():
    results = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": "N/A",
                     "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A"},
        "lambada_openai": {"alias": "x", "perplexity,none": 1234.5, "acc,none": 0.75},
        "wikitext": {"word_perplexity,none": 99.0, "bits_per_byte,none": 3.0},
        "gsm8k": {"exact_match,strict-match": 0.1},
    }
    n = {"arc_easy": {"effective": 5}, "lambada_openai": {"effective": 3}}
    out = bridge.flatten_results(results, n, ["arc_easy", "lambada_openai", "wikitext", "gsm8k"])
    assert out["acc/arc_easy"] == 0.25 and out["acc_norm/arc_easy"] == 0.5
    assert out["ppl/lambada_openai"] == 1234.5 and out["word_perplexity/wikitext"] == 99.0
    assert out["exact_match_strict-match/gsm8k"] == 0.1
    assert out["acc/mean"] == pytest.approx(0.5)  # tasks without acc don't count
    assert out["acc_stderr/arc_easy"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert not any(k.startswith("alias") for k in out)


def test_conf_keys_are_evaluate_tasks_arguments():
    conf = OmegaConf.load(Path(__file__).parents[1] / "conf/eval/_lm_eval.yaml")
    params = inspect.signature(bridge.evaluate_tasks).parameters
    run_only = {"enabled", "tasks", "dense_baseline"}
    assert set(conf.lm_eval) - run_only <= set(params)
    assert set(conf.lm_eval.tasks) <= set(bridge.local_tasks())
    from ciuic_lab.eval import generate
    assert set(conf.generate) - {"enabled"} <= set(
        inspect.signature(generate.greedy_continuations).parameters)


# ---------------------------------------------------------------- with a model


def test_evaluate_arc_easy_and_piqa(model, tok):
    out = bridge.evaluate_tasks(model, tok, ["arc_easy", "piqa"], limit=20, batch_size=16,
                                progress=False)
    for task in ("arc_easy", "piqa"):
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= out[f"{metric}/{task}"] <= 1.0
            # 20 documents -> a multiple of 1/20
            assert out[f"{metric}/{task}"] * 20 == pytest.approx(round(out[f"{metric}/{task}"] * 20))
    assert out["acc/mean"] == pytest.approx((out["acc/arc_easy"] + out["acc/piqa"]) / 2)
    assert "tie_weights" not in vars(model)  # the no-retie patch is undone


def _toy_task(root: Path, name: str, golds: list[int]):
    """Two identical choices per question: argmax picks the first, so acc = share of gold 0,
    whatever the model."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"q": f"Question {i}?", "opts": ["same", "same"], "label": g} for i, g in enumerate(golds)]
    (root / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: toy.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}\\nAnswer:'\ndoc_to_target: label\ndoc_to_choice: opts\n"
        "metric_list:\n  - metric: acc\n")


def test_user_task_from_include_path(model, tok, tmp_path):
    _toy_task(tmp_path / "mine", "my_toy", [0, 0, 1, 1, 1])
    # a user YAML with a bundled name overrides the bundled definition
    _toy_task(tmp_path / "mine" / "override", "openbookqa", [0, 0, 0, 1])
    out = bridge.evaluate_tasks(model, tok, ["my_toy", "openbookqa"], include_path=str(tmp_path),
                                batch_size=4, progress=False)
    assert out["acc/my_toy"] == pytest.approx(0.4)
    assert out["acc/openbookqa"] == pytest.approx(0.75)
    assert out["acc/mean"] == pytest.approx((0.4 + 0.75) / 2)


def test_task_loading_prints_no_datasets_bars(model, tok, tmp_path, capfd):
    """datasets' "Generating ... split" / "Map" bars of each task are the harness's plumbing,
    not the run's progress: with progress on they stay off the terminal all the same."""
    _toy_task(tmp_path / "mine", "quiet_toy", [0, 1])  # a new file: its split is generated now
    bridge.evaluate_tasks(model, tok, ["quiet_toy"], include_path=str(tmp_path), batch_size=2,
                          progress=True)
    err = capfd.readouterr().err
    assert "Generating" not in err and "Map" not in err, err[-2000:]


class _DenseAgain(torch.nn.Module):
    """Stand-in for CompressedLinear: owns its storage, computes the same product."""

    def __init__(self, linear):
        super().__init__()
        self.register_buffer("w", linear.weight.detach().to(torch.float16))
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x @ self.w.to(x.dtype).t()


def test_custom_modules_run_in_place(tok):
    model = _llama(len(tok))
    ref = bridge.evaluate_tasks(model, tok, ["winogrande"], limit=8, batch_size=8, progress=False)
    for layer in model.model.layers:
        layer.mlp.down_proj = _DenseAgain(layer.mlp.down_proj)
    out = bridge.evaluate_tasks(model, tok, ["winogrande"], limit=8, batch_size=8, progress=False)
    assert all(layer.mlp.down_proj.calls > 0 for layer in model.model.layers)
    assert out["acc/winogrande"] == pytest.approx(ref["acc/winogrande"])


# ---------------------------------------------------------------- cache-key parts


def test_task_files_hash_changes_with_a_task_file(tmp_path):
    user = tmp_path / "tasks"
    _toy_task(user, "my_toy", [0, 1])
    before = bridge.task_files_hash(str(user))
    assert before == bridge.task_files_hash(str(user)) != bridge.task_files_hash(None)
    (user / "toy.jsonl").write_text('{"q": "changed", "opts": ["a"], "label": 0}\n')
    assert bridge.task_files_hash(str(user)) != before  # a changed task file changes the key
