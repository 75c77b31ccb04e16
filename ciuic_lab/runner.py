"""One run from a config: load → calibrate → compress → evaluate. The CLI job (job.py) and the
Python API (api.py) both call `run`, so they compress the same way by construction.

    outcome = run(cfg)                                   # everything, as `python -m ciuic_lab.run`
    outcome = run(cfg, model=m, tokenizer=t, evaluate=False)   # compress a live model (the API)

Order, cheapest failure first: config checks (no weights read) → load → shape checks (N:M
divisibility, `<stage>.layers` patterns: need the model, not calibration) → dense evaluation →
calibration → compression → save → compressed evaluation. A run whose stages are all `none`
skips calibration and the walk: it measures the model as it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ciuic_lab import dist
from ciuic_lab.compress.tune.e2e import split_tune
from ciuic_lab.compress.walk.pipeline import CompressionReport, compress, dense_report, profile
from ciuic_lab.config import build_tune, validate
from ciuic_lab.errors import ConfigError
from ciuic_lab.eval.memory import PeakMemory
from ciuic_lab.hold import Compressed, Held, hold

log = logging.getLogger("ciuic_lab")


@dataclass
class Outcome:
    model: torch.nn.Module
    tokenizer: object
    report: CompressionReport
    metrics: dict = field(default_factory=dict)
    generations: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was skipped, and why


def calibration(tokenizer, cfg: DictConfig) -> torch.Tensor:
    from ciuic_lab.data.calibration import calibration_windows

    d = cfg.data
    return calibration_windows(tokenizer, int(d.calib_samples), int(d.calib_seqlen),
                               int(d.calib_seed), source=str(d.calib_source))


def run(cfg: DictConfig, *, model=None, tokenizer=None, out_dir: str | Path | None = None,
        evaluate: bool = True, metrics: dict | None = None) -> Outcome:
    """`metrics`, if given, is filled as measurements arrive, so a caller that records a failure
    keeps everything measured before it.

    How the model is held (`compress.stream`, `compress.offload`, else whole on the device) is
    chosen once, by `hold` (ciuic_lab/hold.py); what follows reads its provider and sink and never
    asks which. The dense baseline is measured in every mode (block by block when the model is not
    resident).
    """
    metrics = {} if metrics is None else metrics
    cfg, methods, device, world, held = load(cfg, model, tokenizer, out_dir, evaluate)
    notes = held.notes
    metrics["mem/weight_bytes_dense"] = held.dense_bytes
    suite = evaluate_dense(cfg, held, metrics, notes) if evaluate else None
    held.rotate(cfg, metrics, notes)
    report = compress_held(cfg, held, methods, device, world, metrics)
    done = held.compressed(cfg, device, out_dir, world, metrics)
    generations = evaluate_compressed(cfg, suite, held, done, report, out_dir, world, metrics,
                                      notes)
    return finish(held, done, report, world, metrics, generations, notes)


def load(cfg: DictConfig, model, tokenizer, out_dir, evaluate: bool):
    """Config checks (no weights read), the processes, then the model as `hold` picks, and the
    shape checks: (cfg, methods, device, world, held)."""
    from ciuic_lab.models.loader import pick_device, pick_dtype

    if cfg.compress.stream and model is not None:
        raise ConfigError("compress.stream: a streamed run reads the checkpoint itself; pass a "
                          "model name or path in the config, not a live model")
    methods = validate(cfg, None if model is None else model.config)  # before anything expensive
    torch.manual_seed(int(cfg.seed))
    device = pick_device(cfg.device)
    # Several processes (torchrun): every rank runs this function; the walks and perplexity
    # split their work (ciuic_lab/dist.py), rank 0 writes and measures what is not split.
    world = dist.init(cfg.compress.distributed, device)
    device = dist.local_device(device)
    if world.on and not world.main and cfg.progress:
        cfg = OmegaConf.merge(cfg, {"progress": False})  # one set of progress bars: rank 0's
    dtype = pick_dtype(cfg.model.dtype, device)
    m = cfg.model
    if m.get("gguf_file") and model is None:
        from ciuic_lab.models.fetch import convert_cached

        # A GGUF is converted once into the cache; from then on the run reads that directory.
        converted = convert_cached(m.name_or_path, m.gguf_file, revision=m.revision)
        cfg = OmegaConf.merge(cfg, {"model": {"name_or_path": str(converted), "gguf_file": None}})
    held = hold(cfg, device, dtype, model=model, tokenizer=tokenizer, out_dir=out_dir,
                evaluate=evaluate)
    profiles = profile(held.model)
    for method in methods:  # shape errors now: before the dense baseline and calibration
        method.check_shapes(profiles)
    return cfg, methods, device, world, held


def evaluate_dense(cfg: DictConfig, held: Held, metrics: dict, notes: list[str]):
    """The dense baseline, on the model as published: whole, or walked through the provider."""
    from ciuic_lab.eval.suite import Suite

    suite = Suite(cfg, held.tokenizer, held.model.config)
    metrics.update(suite.header())
    if held.walk_why is not None:
        metrics.update(suite.run_streamed(held.provider, "dense", notes, held.walk_why))
    else:
        metrics.update(suite.run(held.model, "dense"))
    return suite


def compress_held(cfg: DictConfig, held: Held, methods: list, device: torch.device, world,
                  metrics: dict) -> CompressionReport:
    """Calibrate, walk the provider's blocks into the sink (block tuning inside the walk), then
    distil end to end (`tune=e2e`: whole, or block by block); the time and peak memory of it
    all."""
    if not methods:
        metrics["time/compress_s"] = 0.0
        return dense_report(held.model)  # nothing to compress: no calibration, no walk
    calib = calibration(held.tokenizer, cfg)
    # the walk runs the block part; the e2e part distils the compressed model afterwards
    # against the dense model's distributions, taken before the walk replaces its weights
    block_tune, e2e = split_tune(build_tune(cfg))
    c = cfg.compress
    knobs = {"batch_size": int(c.batch_size), "progress": bool(cfg.progress),
             "min_expert_tokens": int(c.min_expert_tokens), "expert_chunk": int(c.expert_chunk),
             "activations": str(c.activations), "tune": block_tune}
    t0 = time.perf_counter()
    with PeakMemory(device) as dev_peak, PeakMemory("cpu") as host_peak:
        if e2e is not None:
            t_teacher = time.perf_counter()
            teacher = held.teacher(e2e, calib, int(c.expert_chunk))
            e2e_s = time.perf_counter() - t_teacher
        report = compress(held.provider, calib, methods, held.sink, **knobs)
        if e2e is not None:
            info = held.distil(e2e, teacher, bool(cfg.progress))
            del teacher
            e2e_s += info["seconds"]
            metrics["tune/e2e_kl_before"] = info["kl_before"]
            metrics["tune/e2e_kl_after"] = info["kl_after"]
            metrics["tune/e2e_kept"] = int(info["kept"])
    metrics["time/compress_s"] = time.perf_counter() - t0
    metrics["time/profile_s"] = report.profile_seconds
    if block_tune is not None or e2e is not None:
        metrics["time/tune_s"] = report.tune_seconds + (e2e_s if e2e is not None else 0.0)
        _tune_metrics(report, metrics)
    metrics["mem/compress_peak_device_bytes"] = dev_peak.peak_bytes
    metrics["mem/compress_peak_host_bytes"] = host_peak.peak_bytes
    metrics["calib/tokens"] = int(calib.numel())
    if world.on:  # each rank's own peaks and time: the balance of the split, and its cost
        mine = (dev_peak.peak_bytes, host_peak.peak_bytes, metrics["time/compress_s"])
        for r, (dev_b, host_b, secs) in enumerate(dist.gather_objects(mine)):
            metrics[f"dist/rank{r}/compress_peak_device_bytes"] = dev_b
            metrics[f"dist/rank{r}/compress_peak_host_bytes"] = host_b
            metrics[f"dist/rank{r}/compress_s"] = secs
    return report


def evaluate_compressed(cfg: DictConfig, suite, held: Held, done: Compressed,
                        report: CompressionReport, out_dir, world, metrics: dict,
                        notes: list[str]) -> list[dict]:
    """Serving memory in a fresh process, then the compressed model's evaluation: whole (its
    generations, and each layer's kernel in the table) or walked block by block."""
    if suite is None:
        return []
    if done.model is None:  # held nowhere whole: the walk is all there is to measure
        metrics.update(suite.run_streamed(done.walk(), "compressed", notes, done.why))
    if cfg.eval.serve_memory and world.main:
        from ciuic_lab.eval.serve_memory import serving_memory

        # Before the compressed evaluation: it prepares kernels in place, and a prepared model
        # cannot be saved for the fresh process to load.
        metrics.update(serving_memory(cfg, suite.windows, done.model, held.tokenizer, done.path,
                                      notes, out_dir, dense=held.on_device))
    if done.model is None:
        return []
    if done.walk is not None:
        metrics.update(suite.run_streamed(done.walk(), "compressed", notes, done.why))
        return []
    metrics.update(suite.run(done.model, "compressed"))
    for row in report.layers:  # what each layer computes with once prepared
        row["kernel"] = suite.kernels.get(row["name"], "reference")
    return suite.generations()


def finish(held: Held, done: Compressed, report: CompressionReport, world, metrics: dict,
           generations: list[dict], notes: list[str]) -> Outcome:
    """Sizes, the distributed note, and the outcome; no rank leaves while another may still
    need it."""
    metrics.update(_sizes(report, done.weight_bytes, held.dense_params))
    metrics["dist/world_size"] = world.size
    if world.on:
        notes.append(f"distributed over {world.size} processes: calibration batches and "
                     "perplexity windows split among ranks, layers and routed experts divided "
                     "by cost (the per-layer table's `dist_rank` and `layer_s`); lm-eval, "
                     "generations, speed and serving memory measured by rank 0 alone")
        dist.barrier()
    for note in notes:
        log.warning(note)
    return Outcome(done.model, held.tokenizer, report, metrics, generations, notes)


def _tune_metrics(report: CompressionReport, metrics: dict) -> None:
    """How much tuning lowered its own loss over the tuned blocks and routed experts: the mean
    ratio after/before (< 1: it helped), and how many kept their tuned form."""
    if report.tuned:
        ratios = [u["loss_after"] / max(u["loss_before"], 1e-30) for u in report.tuned]
        metrics["tune/loss_ratio"] = sum(ratios) / len(ratios)
        metrics["tune/units_kept"] = sum(bool(u["kept"]) for u in report.tuned)
        metrics["tune/units"] = len(report.tuned)


def _sizes(report: CompressionReport, weight_bytes: int, dense_params: int) -> dict:
    totals = report.totals()
    out = {
        "mem/weight_bytes": weight_bytes,
        "size/bits_per_param": totals["bits_per_param"],
        "size/ratio_vs_fp16": totals["ratio_vs_fp16"],
        "size/compressed_params": totals["params"],
        "size/compressed_bytes": totals["bytes"],
        "size/model_bits_per_param": 8 * weight_bytes / dense_params,
        "size/model_ratio_vs_fp16": 16 * dense_params / (8 * weight_bytes),
    }
    experts = [r for r in report.layers if r["kind"] == "expert" and "calib_tokens" in r]
    if experts:
        out["calib/expert_tokens_min"] = min(r["calib_tokens"] for r in experts)
        out["calib/experts_fallback"] = sum(r["fallback"] for r in experts)
    params = {r["name"]: r["params"] for r in report.layers}
    for stage, alloc in report.allocations.items():
        out[f"alloc/{stage}"] = _mean_budget(alloc, params)
    return out


def _mean_budget(alloc: dict, params: dict[str, int]) -> float | None:
    """Parameter-weighted mean of a stage's per-layer budgets: the figure its policy meets."""
    pairs = [(v.get("bits") if isinstance(v, dict) else v, params.get(k, 0))
             for k, v in alloc.items()]
    pairs = [(v, w) for v, w in pairs if isinstance(v, (int, float)) and not isinstance(v, bool)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None
