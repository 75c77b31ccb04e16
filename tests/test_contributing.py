"""The three extension paths of README's CONTRIBUTING section, each end to end: a new pruning
method (a class + a YAML), a new packed format (a class + one FORMATS line) and a new
architecture (one ADAPTERS entry + a tiny config: block walk, streaming, checkpoints, rotations,
a run through the runner and the export), made here the way a contributor would."""

import copy
import sys
import textwrap

import pytest
import torch
from torch import nn

from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.store import checkpoint
from ciuic_lab.compress.walk.pipeline import compress_model
from ciuic_lab.models import tiny


@pytest.fixture
def contrib(tmp_path, monkeypatch):
    """A package of a contributor's files on sys.path (removed after the test)."""
    pkg = tmp_path / "contrib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m == "contrib" or m.startswith("contrib.")]:
        del sys.modules[name]


def test_a_pruning_method_is_a_class_and_a_yaml(contrib, tmp_path):
    (contrib / "rowmax.py").write_text(textwrap.dedent('''
        """Row-max pruning: keep a row's largest |w| relative to that row's max (a toy)."""
        from dataclasses import dataclass

        from ciuic_lab.compress.base import PruneMethod


        @dataclass
        class RowMax(PruneMethod):
            def scores(self, w, stats):
                return w.abs() / w.abs().amax(dim=1, keepdim=True)
    '''))
    conf = tmp_path / "conf" / "prune"
    conf.mkdir(parents=True)
    (conf / "rowmax.yaml").write_text("defaults:\n  - _common\n_target_: contrib.rowmax.RowMax\n")
    # the stage's shared knobs come from the lab's own conf/prune/_common.yaml
    from ciuic_lab.api import compress
    from ciuic_lab.config import compose

    cfg = compose([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "recipe=none",
                   "prune=rowmax", "prune.sparsity=0.25", "lowrank=none", "quant=rtn",
                   "data.calib_samples=2", "data.calib_seqlen=16", "device=cpu"])
    tok = _tok()
    model = tiny.build("tiny-random-llama", vocab=len(tok))
    model, report = compress(model, tok, cfg, progress=False)
    assert {round(r["sparsity"], 2) for r in report.layers} == {0.25}
    assert type(model).__name__ == "LlamaForCausalLM"


def _tok():
    from ciuic_lab.models.loader import load_tokenizer

    return load_tokenizer("tiny-random-llama")


def test_a_packed_format_is_a_class_and_one_line(contrib, tmp_path, monkeypatch):
    (contrib / "rowint8.py").write_text(textwrap.dedent('''
        """Int8 weights with one fp16 scale per row (a toy packed format)."""
        import torch
        import torch.nn.functional as F
        from torch import nn

        from ciuic_lab.compress.store.formats import buffer_nbytes


        class RowInt8(nn.Module):
            format = "contrib.rowint8"

            def __init__(self, in_features, out_features):
                super().__init__()
                self.in_features, self.out_features = in_features, out_features

            @classmethod
            def quantize(cls, w):
                mod = cls(w.shape[1], w.shape[0])
                scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
                mod.register_buffer("q", torch.round(w / scale[:, None]).to(torch.int8))
                mod.register_buffer("scale", scale.half())
                return mod

            @property
            def params(self):
                return self.in_features * self.out_features

            def nbytes(self):
                return buffer_nbytes(self)

            def dequantized_weight(self, dtype=torch.float32):
                return (self.q.float() * self.scale.float()[:, None]).to(dtype)

            def spec(self):
                return {"format": self.format, "in": self.in_features, "out": self.out_features}

            @classmethod
            def shell(cls, spec, shapes):
                mod = cls(spec["in"], spec["out"])
                for name, (shape, dt) in shapes.items():
                    mod.register_buffer(name, torch.empty(shape, dtype=dt))
                return mod

            def forward(self, x):
                return F.linear(x, self.dequantized_weight(x.dtype))
    '''))
    from contrib.rowint8 import RowInt8

    from ciuic_lab.compress.store import formats

    monkeypatch.setitem(formats.FORMATS, "contrib.rowint8", "contrib.rowint8:RowInt8")

    class ToRowInt8(RTN):  # the method that emits it (its make_layer)
        def make_layer(self, state, dtype):
            return RowInt8.quantize(state.weight)

    torch.manual_seed(0)
    model = tiny.build("tiny-random-deepseek-v3", vocab=256)
    report = compress_model(model, torch.randint(0, 256, (2, 16)), [ToRowInt8(8, -1)],
                            progress=False)
    assert all(r["bits_per_param"] == pytest.approx(8 + 16 / r["in"]) for r in report.layers)
    checkpoint.save(model, tmp_path / "ckpt")
    loaded = checkpoint.load(tmp_path / "ckpt")
    assert sum(isinstance(m, RowInt8) for m in loaded.modules()) == len(report.layers)
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.fixture
def mistral(tmp_path, monkeypatch):
    """A new architecture added as a contributor would: Mistral (a Llama clone the lab does not
    know) gets an adapter entry with Llama's layouts (file 1: its ADAPTERS line) and a tiny
    config (file 2), saved with a tokenizer as a model directory. Returns (model, directory)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from ciuic_lab.models import adapters

    with pytest.raises(adapters.UnsupportedModel, match="mistral"):
        adapters.adapter_for(MistralConfig())
    monkeypatch.setitem(adapters.ADAPTERS, "mistral", adapters.DecoderAdapter(  # file 1
        residual=adapters.LLAMA_RESIDUAL, value_path="v_proj"))
    tok = _tok()
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,  # file 2
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    return model, tmp_path / "src"


def test_an_architecture_is_an_adapter_entry_and_a_tiny_config(mistral, tmp_path):
    from ciuic_lab.compress.walk.pipeline import compress_streamed

    model, src = mistral
    calib = torch.randint(0, 256, (2, 16))
    in_memory = copy.deepcopy(model)
    report = compress_model(in_memory, calib, [RTN(4, 32)], progress=False)
    assert {r["kind"] for r in report.layers} == {"attn", "mlp"} and len(report.layers) == 14
    compress_streamed(str(src), tmp_path / "streamed", calib, [RTN(4, 32)],
                      torch.device("cpu"), torch.float32, progress=False)
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(checkpoint.load(tmp_path / "streamed")(x).logits, in_memory(x).logits)
    assert not any(isinstance(m, nn.Linear) and "layers" in n and "mlp.gate" not in n
                   for n, m in in_memory.named_modules())


def test_a_new_architecture_rotates_runs_and_exports(mistral, tmp_path):
    """The same two files give the rotations (their layouts are the adapter's), a run through
    the runner with `rotate=hadamard` calibrating in the rotated basis and saving its packed
    model, and `python -m ciuic_lab.export RUN_DIR --format compressed-tensors OUT`, which
    transformers loads back to the run's logits."""
    pytest.importorskip("compressed_tensors", reason="the export needs compressed-tensors")
    from transformers import AutoModelForCausalLM

    from ciuic_lab import export
    from ciuic_lab.compress.rotate import apply_rotations
    from ciuic_lab.config import compose
    from ciuic_lab.runner import run

    model, src = mistral
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    rotated = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(x).logits
        info = apply_rotations(rotated, "hadamard", value_path=True, seed=0)
        out = rotated(x).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4  # the same function ...
    assert not torch.allclose(rotated.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert len(info["value_path"]["rotated"]) == 2 and "model.layers.1.mlp.down_proj" in \
        info["residual"]["rotated"]  # ... in another basis, every block's layouts found

    cfg = compose(["model=tiny-random-llama", f"model.name_or_path={src}", "rotate=hadamard",
                   "recipe=none", "prune=none", "lowrank=none", "quant=gptq",
                   "quant.group_size=32", "save=true", "eval.max_windows=2", "eval.seqlen=64",
                   "data.calib_samples=4", "data.calib_seqlen=32", "eval.speed=false",
                   "progress=false", "eval.lm_eval.enabled=false",
                   "eval.generate.max_new_tokens=2", "tracker=none", "device=cpu",
                   "eval.serve_memory=false"])
    outcome = run(cfg, out_dir=tmp_path / "run")
    m = outcome.metrics
    assert m["rotate/runtime_bytes"] == 0 and m["size/bits_per_param"] < 8
    assert m["ppl/wikitext2"] < 1.5 * m["ppl/wikitext2_dense"]
    norms = [p for n, p in outcome.model.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 5 and all(torch.equal(p, torch.ones_like(p)) for p in norms)  # folded

    assert export.main([str(tmp_path / "run"), "--format", "compressed-tensors",
                        str(tmp_path / "out")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert type(loaded).__name__ == "MistralForCausalLM"
    # Against the run's saved packed model on the reference backend (the run's own model was
    # prepared for its evaluation: int4 kernels with bf16 scales compute slightly differently).
    saved = checkpoint.load(tmp_path / "run" / "compressed")
    with torch.no_grad():
        ours, theirs = saved(x).logits, loaded.eval()(x).logits
    assert ((theirs - ours).abs().max() / ours.abs().max()).item() <= 1e-3
