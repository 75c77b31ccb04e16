"""One run: validate → load → dense baseline → compress → evaluate → result.json + W&B.

Called by the Hydra entry point for each job of a sweep. Every failure, including a bad config,
is recorded in the job's result.json before it propagates, so a sweep never loses a point
silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig

from ciuic_lab.config import to_container, validate


def _cache_dir() -> Path:
    return Path(os.environ.get("CIUIC_LAB_CACHE", Path.home() / ".cache" / "ciuic_lab"))


def _dense_key(cfg: DictConfig, windows: torch.Tensor, dtype: torch.dtype, device: str) -> str:
    """Changes whenever the dense model, its dtype/device or the evaluation windows change."""
    from ciuic_lab.models.loader import resolve

    kind, target = resolve(cfg.model.name_or_path)
    ident = [kind, target, str(cfg.model.revision), str(dtype), device, str(cfg.seed)]
    if kind == "local":
        ident += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                  for p in sorted(Path(target).glob("*.safetensors"))]
    h = hashlib.sha256(json.dumps(ident).encode())
    h.update(windows.numpy().tobytes())
    return h.hexdigest()[:24]


def dense_baseline(cfg: DictConfig, model, windows, batch_size: int, progress: bool) -> dict:
    """Perplexity and peak memory of the uncompressed model, cached on disk per model and data."""
    from ciuic_lab.eval.memory import PeakMemory
    from ciuic_lab.eval.perplexity import perplexity

    dev = next(model.parameters()).device
    key = _dense_key(cfg, windows, next(model.parameters()).dtype, dev.type)
    path = _cache_dir() / "dense" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    with PeakMemory(dev) as pm:
        ppl = perplexity(model, windows, batch_size=batch_size, progress=progress)
    out = {"ppl/wikitext2_dense": ppl, "mem/peak_bytes_dense": pm.peak_bytes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


# Keys that do not change what a job computes: ignored when deciding whether to resume.
_VOLATILE = ("tracker", "progress", "force")


def config_hash(config: dict) -> str:
    """sha256 of the resolved config without presentation keys (tracking, progress bars)."""
    core = {k: v for k, v in config.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def completed(out_dir: Path, chash: str) -> dict | None:
    """The metrics of a finished identical job in out_dir, if there is one."""
    from ciuic_lab.track.result import read_result

    path = out_dir / "result.json"
    if not path.exists():
        return None
    try:
        res = read_result(path)
    except (ValueError, OSError):
        return None  # a torn or foreign file: recompute
    if res.get("status") == "ok" and res.get("config_hash") == chash:
        return res["metrics"]
    return None


def run_job(cfg: DictConfig, out_dir: str | Path, job_name: str | None = None,
            overrides: list[str] | None = None) -> dict:
    """Run one configured job; returns the metrics. Writes out_dir/result.json in every case.

    A job whose out_dir already holds an ok result.json for the identical resolved config is
    skipped (sweep resume); `+force=true` recomputes it.
    """
    from omegaconf import OmegaConf

    from ciuic_lab.track.result import write_result

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        config = to_container(cfg)
    except Exception:  # an unresolvable interpolation: keep the raw config
        config = OmegaConf.to_container(cfg, resolve=False)
    chash = config_hash(config)
    if not OmegaConf.select(cfg, "force", default=False):
        done = completed(out_dir, chash)
        if done is not None:
            print(f"skipped: {out_dir} already holds a complete result for this config (+force=true reruns it)")
            return done
    extra = {"overrides": list(overrides or []), "config_hash": chash}
    metrics: dict = {}
    layers: list[dict] = []
    tracker = None
    try:
        stages = validate(cfg)  # before anything expensive
        from ciuic_lab.track.tracker import Tracker

        tracker = Tracker(mode=cfg.tracker.mode, project=cfg.tracker.project,
                          group=cfg.tracker.group, name=job_name, config=config, dir=str(out_dir),
                          entity=cfg.tracker.get("entity"), tags=list(cfg.tracker.get("tags") or []))
        metrics, layers, generations = _measure(cfg, stages, out_dir)
        tracker.log(metrics)
        tracker.log_table("layers", layers)
        if generations:
            tracker.log_table("generations", generations)
        write_result(out_dir, config=config, metrics=metrics, layers=layers, status="ok", error=None,
                     extra={**extra, "generations": generations})
        _print_summary(metrics)
        return metrics
    except BaseException as e:
        write_result(out_dir, config=config, metrics=metrics, layers=layers, status="failed",
                     error="".join(traceback.format_exception(type(e), e, e.__traceback__)),
                     extra=extra)
        raise
    finally:
        if tracker is not None:
            tracker.finish()


def _lm_eval(cfg: DictConfig, model, tok, dense: bool) -> dict:
    """Task accuracies (lm-eval, in-process); the dense model's are cached on disk."""
    from ciuic_lab.eval.lm_eval_bridge import cached_dense_accuracy, evaluate_tasks

    le = cfg.eval.lm_eval
    kw = dict(batch_size=int(le.batch_size), limit=le.limit, include_path=le.include_path,
              num_fewshot=int(le.num_fewshot), max_length=le.max_length, progress=bool(cfg.progress))
    tasks = list(le.tasks)

    def run():
        return evaluate_tasks(model, tok, tasks, **kw)

    if not dense:
        return run()
    from ciuic_lab.models.loader import resolve

    key = [*resolve(cfg.model.name_or_path), str(cfg.model.revision), str(cfg.seed),
           str(next(model.parameters()).dtype), json.dumps(tasks), json.dumps(kw, default=str)]
    out = cached_dense_accuracy(key, run, include_path=le.include_path)
    return {f"{k}_dense": v for k, v in out.items()}


def _measure(cfg: DictConfig, stages, out_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    from ciuic_lab.api import calibration
    from ciuic_lab.compress.pipeline import compress_model
    from ciuic_lab.data.wikitext import test_windows
    from ciuic_lab.eval.memory import PeakMemory, stored_bytes
    from ciuic_lab.eval.perplexity import perplexity
    from ciuic_lab.eval.speed import tokens_per_second
    from ciuic_lab.models.loader import load, pick_device, pick_dtype

    torch.manual_seed(int(cfg.seed))
    progress = bool(cfg.progress)
    device = pick_device(cfg.device)
    # Layer-by-layer: the model waits on CPU, one block at a time is compressed on `device`.
    offload = bool(cfg.compress.offload) and device.type != "cpu"
    model, tok = load(cfg.model.name_or_path, dtype=pick_dtype(cfg.model.dtype, device),
                      device="cpu" if offload else str(device),
                      trust_remote_code=cfg.model.trust_remote_code,
                      experts_implementation=cfg.model.experts_implementation,
                      seed=int(cfg.seed), revision=cfg.model.revision)
    max_pos = int(getattr(model.config, "max_position_embeddings", 2048))
    seqlen = int(cfg.eval.seqlen) if cfg.eval.seqlen is not None else min(2048, max_pos)
    windows = test_windows(tok, seqlen)
    if cfg.eval.max_windows is not None:
        windows = windows[: int(cfg.eval.max_windows)]
    bs = int(cfg.eval.batch_size)

    metrics: dict = {"eval/seqlen": seqlen, "eval/windows": int(windows.shape[0]),
                     "eval/tokens": int(windows.shape[0] * (seqlen - 1))}
    dense_params = sum(p.numel() for p in model.parameters())
    metrics["mem/weight_bytes_dense"] = stored_bytes(model)
    if cfg.eval.dense_baseline and not offload:
        metrics.update(dense_baseline(cfg, model, windows, bs, progress))
    le, gen = cfg.eval.lm_eval, cfg.eval.generate
    if le.enabled and le.dense_baseline and not offload:
        metrics.update(_lm_eval(cfg, model, tok, dense=True))
    if gen.enabled and not offload:
        from ciuic_lab.eval.generate import greedy_continuations
        dense_text = greedy_continuations(model, tok, list(gen.prompts), int(gen.max_new_tokens))

    calib = calibration(tok, cfg)
    t0 = time.perf_counter()
    with PeakMemory(device) as cpm:
        report = compress_model(model, calib, stages, batch_size=int(cfg.compress.batch_size),
                                progress=progress, device=device,
                                min_expert_tokens=int(cfg.compress.min_expert_tokens))
    metrics["time/compress_s"] = time.perf_counter() - t0
    metrics["mem/compress_peak_bytes"] = cpm.peak_bytes
    model.to(device)  # packed: fits where the dense model may not
    if cfg.save:
        from ciuic_lab.compress.checkpoint import save

        save(model, out_dir / "compressed", tokenizer=tok, run_config=to_container(cfg))
    experts = [r for r in report.layers if r["kind"] == "expert"]
    if experts:
        metrics["calib/expert_tokens_min"] = min(r["calib_tokens"] for r in experts)
        metrics["calib/experts_fallback"] = sum(r["fallback"] for r in experts)

    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    with PeakMemory(dev) as pm:
        metrics["ppl/wikitext2"] = perplexity(model, windows, batch_size=bs, progress=progress)
    metrics["time/eval_s"] = time.perf_counter() - t0
    metrics["mem/peak_bytes"] = pm.peak_bytes
    metrics["mem/peak_kind"] = pm.kind
    if cfg.eval.speed:
        metrics["speed/tokens_per_s"] = tokens_per_second(
            model, windows, batch_size=1, max_windows=int(cfg.eval.speed_windows))
    if le.enabled:
        t0 = time.perf_counter()
        metrics.update(_lm_eval(cfg, model, tok, dense=False))
        metrics["time/lm_eval_s"] = time.perf_counter() - t0
    generations: list[dict] = []
    if gen.enabled:
        from ciuic_lab.eval.generate import greedy_continuations, side_by_side
        comp_text = greedy_continuations(model, tok, list(gen.prompts), int(gen.max_new_tokens))
        generations = side_by_side(list(gen.prompts),
                                   dense_text if not offload else [""] * len(comp_text), comp_text)

    totals = report.totals()
    weight_bytes = stored_bytes(model)
    metrics.update({
        "mem/weight_bytes": weight_bytes,
        "size/bits_per_param": totals["bits_per_param"],
        "size/ratio_vs_fp16": totals["ratio_vs_fp16"],
        "size/compressed_params": totals["params"],
        "size/compressed_bytes": totals["bytes"],
        "size/model_bits_per_param": 8 * weight_bytes / dense_params,
        "size/model_ratio_vs_fp16": 16 * dense_params / (8 * weight_bytes),
        "calib/tokens": int(calib.numel()),
    })
    params = {r["name"]: r["params"] for r in report.layers}
    for stage, alloc in report.allocations.items():
        metrics[f"alloc/{stage}"] = _mean_budget(alloc, params)
    return metrics, report.layers, generations


def _mean_budget(alloc: dict, params: dict[str, int]) -> float | None:
    """Parameter-weighted mean of a stage's per-layer budgets: the figure its policy meets."""
    pairs = [(v, params.get(k, 0)) for k, v in alloc.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _print_summary(m: dict) -> None:
    rows = [
        ("WikiText-2 ppl (dense → compressed)",
         f"{m.get('ppl/wikitext2_dense', float('nan')):.3f} → {m['ppl/wikitext2']:.3f}"),
        ("bits/param, compressed layers", f"{m['size/bits_per_param']:.3f}"),
        ("ratio vs fp16, compressed layers", f"{m['size/ratio_vs_fp16']:.2f}x"),
        ("model weight bytes (dense → stored)",
         f"{m['mem/weight_bytes_dense']:,} → {m['mem/weight_bytes']:,}"),
        ("peak memory during eval", f"{m['mem/peak_bytes'] / 2**20:.1f} MiB ({m['mem/peak_kind']})"),
        ("compress / eval time", f"{m['time/compress_s']:.1f} s / {m['time/eval_s']:.1f} s"),
    ]
    if "speed/tokens_per_s" in m:
        rows.append(("prefill speed", f"{m['speed/tokens_per_s']:.0f} tokens/s"))
    if "acc/mean" in m:
        rows.append(("lm-eval acc/mean (dense → compressed)",
                     f"{m.get('acc/mean_dense', float('nan')):.4f} → {m['acc/mean']:.4f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
