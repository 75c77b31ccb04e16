"""tune=e2e walked block by block (compress/tune/e2e_walk.py): the same distillation as the
resident form, for a model held by a provider (offloaded, or a compressed checkpoint on disk)."""

import copy
import hashlib

import pytest
import torch

from ciuic_lab.compress.lowrank.svdllm import SVDLLM
from ciuic_lab.compress.prune.sparsegpt import SparseGPT
from ciuic_lab.compress.quant.gptq import GPTQ
from ciuic_lab.compress.store import checkpoint
from ciuic_lab.compress.tune import e2e_walk
from ciuic_lab.compress.tune.e2e import E2ETune
from ciuic_lab.compress.walk.blocks import Resident
from ciuic_lab.compress.walk.pipeline import compress_model, compress_streamed
from ciuic_lab.models import tiny

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
CPU = torch.device("cpu")


def _methods():
    return [SparseGPT(0.5), GPTQ(3, 32), SVDLLM(ratio=0.05, factor_bits=8)]


def _tiny(arch):
    torch.manual_seed(0)
    return tiny.build(arch, vocab=256)


def _compressed(model):
    compress_model(model, CALIB, _methods(), batch_size=2, progress=False)
    return model


@pytest.mark.parametrize("arch", ["tiny-random-llama", "tiny-random-deepseek-v3"])
def test_the_walked_teacher_is_the_resident_teacher(arch):
    e2e = E2ETune(topk=16, batch_size=4)
    model = _tiny(arch)
    resident = e2e.teacher(model, CALIB)
    walked = e2e_walk.teacher(e2e, Resident(model, CPU), CALIB, expert_chunk=3)
    assert torch.equal(walked.windows, resident.windows)
    torch.testing.assert_close(walked.logp, resident.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(walked.rest, resident.rest, atol=1e-5, rtol=0)
    assert (walked.index == resident.index).float().mean() > 0.99  # ties may swap order


@pytest.mark.parametrize("arch", ["tiny-random-llama", "tiny-random-deepseek-v3"])
def test_the_block_walk_distils_as_the_resident_form_does(arch):
    """Same windows, same steps, same Adam: the same KL before and after and the same stored
    values (to float rounding: the backward is split at block boundaries)."""
    e2e = E2ETune(iters=6, batch_size=4, topk=16, lr=1e-2)
    dense = _tiny(arch)
    teacher = e2e.teacher(dense, CALIB)
    a = _compressed(dense)
    b = copy.deepcopy(a)
    ra = e2e.run(a, teacher)
    rb = e2e_walk.run(e2e, Resident(b, CPU), teacher)
    assert ra["kept"] and rb["kept"]
    assert rb["kl_before"] == pytest.approx(ra["kl_before"], rel=1e-6)
    assert rb["kl_after"] == pytest.approx(ra["kl_after"], rel=1e-4)
    assert rb["kl_after"] < rb["kl_before"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        if sa[k].is_floating_point():
            torch.testing.assert_close(sb[k].float(), sa[k].float(), atol=2e-3, rtol=2e-3,
                                       msg=k)
        else:  # codes, masks, zero points: frozen, identical
            assert torch.equal(sa[k], sb[k]), k
    assert e2e.kl(b, teacher) == pytest.approx(rb["kl_after"], rel=1e-5)


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.is_file()}


def _stored(tmp_path, arch, e2e):
    """(the dense model, its teacher, a streamed compressed checkpoint of it)."""
    dense = _tiny(arch)
    dense.save_pretrained(tmp_path / "src")
    teacher = e2e.teacher(dense, CALIB)
    out = tmp_path / "ckpt"
    compress_streamed(str(tmp_path / "src"), out, CALIB, _methods(), CPU, torch.float32,
                      batch_size=2, progress=False)
    return dense, teacher, out


def test_a_stored_checkpoint_is_distilled_and_rewritten_whole(tmp_path):
    """compress.stream's form: the compressed model is a checkpoint; the walk reads it block by
    block and writes the distilled one in its place (other files carried over). Its KL is what
    the walk reports, and it is the in-memory distillation's to float rounding."""
    e2e = E2ETune(iters=5, batch_size=4, topk=16, lr=1e-2)
    dense, teacher, out = _stored(tmp_path, "tiny-random-deepseek-v3", e2e)
    (out / "tokenizer.json").write_text("{}")  # stands for the tokenizer saved beside the shards
    before, nbytes = _digests(out), checkpoint.stored_bytes(out)
    info = e2e_walk.run(e2e, checkpoint.Stored(out, CPU), teacher)
    assert info["kept"] and info["kl_after"] < info["kl_before"]
    assert checkpoint.stored_bytes(out) == nbytes  # values change, bits/param does not
    checkpoint.verify(out)
    after = _digests(out)
    assert after["tokenizer.json"] == before["tokenizer.json"]
    assert after.keys() == before.keys()
    assert any(after[k] != before[k] for k in after if k.startswith("blocks-"))
    loaded = checkpoint.load(out, CPU)
    assert e2e.kl(loaded, teacher) == pytest.approx(info["kl_after"], rel=1e-5)
    in_memory = _compressed(copy.deepcopy(dense))
    ref = e2e.run(in_memory, teacher)
    assert info["kl_after"] == pytest.approx(ref["kl_after"], rel=1e-3)


def test_a_walk_that_hurts_leaves_the_checkpoint_untouched(tmp_path, monkeypatch):
    def scramble(e2e, provider, teacher, state, progress, activations):
        for i in range(len(provider)):  # every trained tensor flipped: a much worse model
            block = provider.load(i)
            trained = state.block(i, block)
            provider.release(i, block)
            with torch.no_grad():
                for ps in trained.packed.values():
                    for p in ps.values():
                        p.mul_(-3)

    monkeypatch.setattr(e2e_walk, "_fit", scramble)
    e2e = E2ETune(iters=1, batch_size=4, topk=16)
    _, teacher, out = _stored(tmp_path, "tiny-random-llama", e2e)
    before = _digests(out)
    info = e2e_walk.run(e2e, checkpoint.Stored(out, CPU), teacher)
    assert not info["kept"] and info["kl_after"] == info["kl_before"]
    assert _digests(out) == before


def test_a_streamed_run_distils_its_checkpoint_like_the_in_memory_run(tmp_path):
    """`compress.stream=true tune=full` through the runner: the teacher walked from the shards,
    the block part inside the streamed walk, the e2e part on the written checkpoint; the result
    is the in-memory run's to float rounding, and the checkpoint it leaves is the one measured."""
    from ciuic_lab import runner
    from ciuic_lab.config import compose
    from ciuic_lab.models.loader import load_tokenizer

    arch = "tiny-random-deepseek-v3"
    tok = load_tokenizer(arch)
    torch.manual_seed(0)
    tiny.build(arch, vocab=len(tok)).save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    quick = ["model=hub", f"model.name_or_path={tmp_path / 'src'}", "eval.max_windows=2",
             "eval.seqlen=64", "data.calib_samples=4", "data.calib_seqlen=32", "progress=false",
             "eval.lm_eval.enabled=false", "eval.generate.enabled=false", "eval.speed=false",
             "eval.serve_memory=false", "tracker=none", "eval.dense_baseline=false", "tune=full",
             "tune.block.iters=2", "tune.e2e.iters=4", "tune.e2e.topk=8", "tune.e2e.lr=0.01"]
    streamed = runner.run(compose([*quick, "compress.stream=true"]), out_dir=tmp_path / "s")
    in_memory = runner.run(compose(quick), out_dir=tmp_path / "m")
    s, m = streamed.metrics, in_memory.metrics
    assert s["tune/e2e_kept"] == 1 and s["tune/e2e_kl_after"] < s["tune/e2e_kl_before"]
    assert s["tune/e2e_kl_before"] == pytest.approx(m["tune/e2e_kl_before"], rel=1e-5)
    assert s["tune/e2e_kl_after"] == pytest.approx(m["tune/e2e_kl_after"], rel=1e-3)
    assert s["ppl/wikitext2"] == pytest.approx(m["ppl/wikitext2"], rel=1e-3)
    assert s["size/bits_per_param"] == m["size/bits_per_param"]
    checkpoint.verify(tmp_path / "s" / "compressed")
