"""One evaluation suite, run on the dense model and on the compressed one alike.

    suite = Suite(cfg, tokenizer, model_config)
    dense = suite.run(model, "dense")          # metrics with a `_dense` suffix (cached on disk)
    comp = suite.run(model, "compressed")      # the same metrics, unsuffixed

What it measures (each switchable in `eval`): WikiText-2 perplexity with the peak memory and wall
time of that evaluation, prefill tokens/s, lm-eval task accuracy, greedy generations. The dense
model's perplexity and accuracies are the same for every point of a sweep, so they are cached
(`ciuic_lab.cache`) under keys that hold everything that changes them: the weights' fingerprint,
dtype, device, batch size, windows, tasks and their files, the torch and transformers
versions, and the code version.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext

import torch
from omegaconf import DictConfig

from ciuic_lab import cache, dist
from ciuic_lab.eval.memory import PeakMemory
from ciuic_lab.eval.perplexity import model_device, perplexity

SUFFIX = {"dense": "_dense", "compressed": ""}


def eval_seqlen(cfg: DictConfig, model_config) -> int:
    """`eval.seqlen`, or the protocol's default min(2048, the model's max positions)."""
    if cfg.eval.seqlen is not None:
        return int(cfg.eval.seqlen)
    return min(2048, int(getattr(model_config, "max_position_embeddings", 2048)))


class Suite:
    def __init__(self, cfg: DictConfig, tokenizer, model_config):
        from ciuic_lab.data.wikitext import test_windows

        self.cfg, self.tok = cfg, tokenizer
        self.seqlen = eval_seqlen(cfg, model_config)
        windows = test_windows(tokenizer, self.seqlen)
        if cfg.eval.max_windows is not None:
            windows = windows[: int(cfg.eval.max_windows)]
        self.windows = windows
        self.progress = bool(cfg.progress)
        self.texts: dict[str, list[str]] = {}  # generations per model ("dense", "compressed")
        self.kernels: dict[str, str] = {}  # layer name -> kernel, once the model is prepared

    def header(self) -> dict:
        return {"eval/seqlen": self.seqlen, "eval/windows": int(self.windows.shape[0]),
                "eval/tokens": int(self.windows.shape[0] * (self.seqlen - 1))}

    def _key(self, model, *extra) -> list:
        return self._key_of(next(model.parameters()).dtype, model_device(model), *extra)

    def _key_of(self, dtype, device, *extra) -> list:
        return dense_key(self.cfg, dtype, device, *extra)

    def run(self, model, which: str) -> dict:
        """Every enabled measurement of `model`; keys carry the `_dense` suffix for the dense one.

        Quality (perplexity, lm-eval, generations) of a compressed model runs on its packed
        layers, or with `eval.quality_path=materialize` on their weights rebuilt once (the same
        numbers up to float rounding, at the dense model's speed). Then its packed layers are
        prepared for their kernels, and peak memory and speed are measured on that: what the
        compressed model really holds and how fast it really runs. `eval/path/*` records which
        path computed what.
        """
        from ciuic_lab.compress.store.serve import materialized, prepare_for_inference

        s, ev = SUFFIX[which], self.cfg.eval
        out: dict = {}
        path = "dense"
        if which == "compressed":
            path = str(ev.quality_path)
            if path not in ("packed", "materialize"):
                raise ValueError(f"eval.quality_path must be packed or materialize, got {path!r}")
        quality = materialized(model, next(model.parameters()).dtype) \
            if path == "materialize" else nullcontext()
        with quality:
            out.update(self._quality(model, which))
        if which == "compressed":
            dev = model_device(model)
            self.kernels = prepare_for_inference(model, dev, next(model.parameters()).dtype)
            out["eval/path/quality"] = "materialized" if path == "materialize" else "packed"
            out["eval/path/speed_memory"] = "packed (kernels where they fit)"
            out["kernels/layers_with_kernel"] = sum(k != "reference" for k in self.kernels.values())
        out.update(self._serving(model, which))
        return out

    def _quality(self, model, which: str) -> dict:
        s, ev = SUFFIX[which], self.cfg.eval
        out: dict = {}
        if which == "compressed" or ev.dense_baseline:
            out.update(self._perplexity(model, which))
        le = ev.lm_eval
        if not dist.world().main:  # rank 0 alone runs what is not split among ranks
            return out
        if le.enabled and (which == "compressed" or le.dense_baseline):
            t0 = time.perf_counter()
            out.update(self._lm_eval(model, which))
            out[f"time/lm_eval_s{s}"] = time.perf_counter() - t0
        gen = ev.generate
        if gen.enabled:
            from ciuic_lab.eval.generate import greedy_continuations

            self.texts[which] = greedy_continuations(model, self.tok, list(gen.prompts),
                                                     int(gen.max_new_tokens))
        return out

    def _serving(self, model, which: str) -> dict:
        """Peak memory of one evaluation batch's forward, and speed (prefill over windows,
        greedy decode with the KV cache), on the model as it is held."""
        s, ev = SUFFIX[which], self.cfg.eval
        dev = model_device(model)
        batch = self.windows[: int(ev.batch_size)].to(dev)
        with torch.no_grad(), PeakMemory(dev) as pm:
            model(input_ids=batch, use_cache=False)
        out = {f"mem/peak_bytes{s}": pm.peak_bytes, f"mem/peak_kind{s}": pm.kind}
        if ev.speed and dist.world().main:  # timed by rank 0 alone, the others idle meanwhile
            from ciuic_lab.eval.speed import decode_tokens_per_second, tokens_per_second

            out[f"speed/tokens_per_s{s}"] = tokens_per_second(
                model, self.windows, batch_size=1, max_windows=int(ev.speed_windows))
            prompt = self.windows[0, : min(self.seqlen, 128)]
            out[f"speed/decode_tokens_per_s{s}"] = decode_tokens_per_second(
                model, prompt, int(ev.decode_tokens))
        return out

    def run_streamed(self, provider, which: str, notes: list[str], why: str) -> dict:
        """Perplexity of a model walked block by block (`provider`: its blocks one at a time);
        what needs the whole model resident (lm-eval, generations, speed) is skipped with a note."""
        s, bs = SUFFIX[which], int(self.cfg.eval.batch_size)
        out: dict = {}

        def measure() -> dict:
            from ciuic_lab.eval.streamed import streamed_perplexity

            t0 = time.perf_counter()
            with PeakMemory(provider.device) as pm:
                ppl = streamed_perplexity(provider, self.windows, bs,
                                          int(self.cfg.compress.expert_chunk), self.progress,
                                          str(self.cfg.compress.activations), split=True)
            return {f"ppl/wikitext2{s}": ppl, f"mem/peak_bytes{s}": pm.peak_bytes,
                    f"mem/peak_kind{s}": pm.kind, f"time/eval_s{s}": time.perf_counter() - t0}

        if which == "compressed":
            out.update(measure())
        elif self.cfg.eval.dense_baseline:
            windows = hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()
            key = self._key_of(next(provider.model.parameters()).dtype, provider.device, bs,
                               windows, "streamed")
            out.update(_cached("dense_ppl", key, measure))
        ev = self.cfg.eval
        skipped = [name for name, on in (("lm-eval", ev.lm_eval.enabled and (
            which == "compressed" or ev.lm_eval.dense_baseline)), ("generations", ev.generate.enabled),
            ("speed", ev.speed)) if on]
        if skipped:
            notes.append(f"{which} model evaluated block by block ({why}): "
                         f"{', '.join(skipped)} skipped, they need the whole model resident")
        return out

    def generations(self) -> list[dict]:
        """Rows {prompt, dense, compressed} of the continuations both runs produced."""
        from ciuic_lab.eval.generate import side_by_side

        if "compressed" not in self.texts:
            return []
        comp = self.texts["compressed"]
        dense = self.texts.get("dense", [""] * len(comp))
        return side_by_side(list(self.cfg.eval.generate.prompts), dense, comp)

    # ---- the measurements ------------------------------------------------------------------
    def _perplexity(self, model, which: str) -> dict:
        s, bs = SUFFIX[which], int(self.cfg.eval.batch_size)

        def measure() -> dict:
            t0 = time.perf_counter()
            ppl = perplexity(model, self.windows, batch_size=bs, progress=self.progress,
                             split=True)
            return {f"ppl/wikitext2{s}": ppl, f"time/eval_s{s}": time.perf_counter() - t0}

        if which == "compressed":
            return measure()
        windows = hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()
        return _cached("dense_ppl", self._key(model, bs, windows), measure)

    def _lm_eval(self, model, which: str) -> dict:
        from ciuic_lab.eval.lm_eval_bridge import evaluate_tasks, lm_eval_version, task_files_hash

        le = self.cfg.eval.lm_eval
        kw = {"batch_size": int(le.batch_size), "limit": le.limit,
              "include_path": le.include_path, "num_fewshot": int(le.num_fewshot),
              "max_length": le.max_length, "progress": self.progress}
        tasks = list(le.tasks)

        def measure() -> dict:
            return evaluate_tasks(model, self.tok, tasks, **kw)

        if which == "compressed":
            return measure()
        parts = self._key(model, tasks, sorted((k, str(v)) for k, v in kw.items() if k != "progress"),
                          task_files_hash(le.include_path), lm_eval_version())
        return {f"{k}_dense": v for k, v in cache.cached("dense_lm_eval", parts, measure).items()}


def _cached(namespace: str, parts: list, measure) -> dict:
    """`cache.cached`; in a distributed run, where `measure` is collective (perplexity split
    among ranks), rank 0 decides hit or miss for everyone, so no rank measures alone."""
    w = dist.world()
    if not w.on:
        return cache.cached(namespace, parts, measure)
    value = dist.broadcast_object(cache.lookup(namespace, parts) if w.main else None)
    if value is None:
        value = dict(measure())
        if w.main:
            cache.store(namespace, parts, value)
    return value


def dense_key(cfg, dtype, device, *extra) -> list:
    """The cache key of a dense-model measurement: the model's files, seed, dtype, device kind
    and the library versions, then what the measurement adds (`extra`)."""
    import transformers

    from ciuic_lab.models.loader import fingerprint

    m = cfg.model
    # A torch or transformers upgrade can change kernels, attention or loading, and with them
    # the dense numbers: a cached value is only reused under the versions that computed it.
    return [*fingerprint(m.name_or_path, m.revision), str(cfg.seed), str(dtype),
            torch.device(device).type, f"torch {torch.__version__}",
            f"transformers {transformers.__version__}", *extra]
