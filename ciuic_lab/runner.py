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
from omegaconf import DictConfig

from ciuic_lab import dist
from ciuic_lab.compress.pipeline import (
    CompressionReport,
    compress_model,
    compress_streamed,
    dense_report,
    profile,
)
from ciuic_lab.compress.tune.e2e import split_tune
from ciuic_lab.config import build_tune, rotations_on, to_container, validate
from ciuic_lab.errors import ConfigError
from ciuic_lab.eval.memory import PeakMemory, stored_bytes

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

    Three ways to hold the model (`compress.stream`, `compress.offload`):
      memory   the model on the device (the default)
      offload  the model in host memory, one block at a time on the device
      stream   never the whole model: a meta skeleton, blocks read from the checkpoint's shards
               and the compressed blocks written to `<out_dir>/compressed` as they finish
    The dense baseline is measured in every mode (block by block when the model is not resident).
    """
    from ciuic_lab.models.loader import load, load_tokenizer, pick_device, pick_dtype, skeleton

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
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(cfg, {"progress": False})  # one set of progress bars: rank 0's
    dtype = pick_dtype(cfg.model.dtype, device)
    stream = bool(cfg.compress.stream)
    offload = bool(cfg.compress.offload) and device.type != "cpu"
    notes: list[str] = []
    # eval.stream=true on a model held in memory: walk it block by block all the same (as a model
    # too large for the device would be), rather than ignore the setting.
    walk_eval = evaluate and not stream and cfg.eval.stream is True
    if walk_eval:
        notes.append("eval.stream=true: the dense and compressed models were evaluated block by "
                     "block from memory (Resident), not as whole models")
    m = cfg.model
    if m.get("gguf_file") and model is None:
        from omegaconf import OmegaConf

        from ciuic_lab.models.fetch import convert_cached

        # A GGUF is converted once into the cache; from then on the run reads that directory.
        converted = convert_cached(m.name_or_path, m.gguf_file, revision=m.revision)
        cfg = OmegaConf.merge(cfg, {"model": {"name_or_path": str(converted), "gguf_file": None}})
        m = cfg.model
    source = None
    if stream:
        from ciuic_lab.models.source import CheckpointSource

        source = CheckpointSource.open(m.name_or_path, m.revision)  # every shard checked first
        model = skeleton(m.name_or_path, dtype, m.trust_remote_code, m.revision)
        tokenizer = load_tokenizer(m.name_or_path, m.trust_remote_code)
    elif model is None:
        model, tokenizer = load(m.name_or_path, dtype=dtype, device="cpu" if offload else str(device),
                                trust_remote_code=m.trust_remote_code,
                                experts_implementation=m.experts_implementation,
                                seed=int(cfg.seed), revision=m.revision)
    profiles = profile(model)
    for method in methods:  # shape errors now: before the dense baseline and calibration
        method.check_shapes(profiles)

    metrics = {} if metrics is None else metrics
    metrics["mem/weight_bytes_dense"] = stored_bytes(model)
    dense_params = sum(p.numel() for p in model.parameters())
    suite = None
    if evaluate:
        from ciuic_lab.eval.suite import Suite

        suite = Suite(cfg, tokenizer, model.config)
        metrics.update(suite.header())
        if stream:
            from ciuic_lab.compress.blocks import Streamed

            dense = Streamed(skeleton(m.name_or_path, dtype, m.trust_remote_code, m.revision),
                             source, device)
            metrics.update(suite.run_streamed(dense, "dense", notes, "compress.stream=true"))
            del dense
        elif offload or walk_eval:
            from ciuic_lab.compress.blocks import Resident

            why = "eval.stream=true" if walk_eval else "compress.offload=true"
            metrics.update(suite.run_streamed(Resident(model, device), "dense", notes, why))
        else:
            metrics.update(suite.run(model, "dense"))

    transform = None
    if rotations_on(cfg) and stream:  # applied to each part as it loads, inside the walks
        from ciuic_lab.compress.rotate.streamed import StreamedRotation

        r = cfg.rotate
        transform = StreamedRotation(model.config, r.residual, bool(r.value_path), int(r.seed))
        metrics["rotate/runtime_bytes"] = 0
        notes.append("rotate: fused rotations applied to each block as it loads (their time is "
                     "part of time/compress_s)")
    elif rotations_on(cfg):  # after the dense baseline: it is measured on the model as published
        from hydra.utils import instantiate

        t0 = time.perf_counter()
        info = instantiate(cfg.rotate)(model)
        metrics["rotate/runtime_bytes"] = int(info["runtime_bytes"])
        metrics["rotate/untied_head_bytes"] = int(info["untied_head_bytes"])
        metrics["time/rotate_s"] = time.perf_counter() - t0

    compressed_dir = None
    if methods:
        calib = calibration(tokenizer, cfg)
        # the walk runs the block part; the e2e part distils the compressed model afterwards
        # against the dense model's distributions, taken before the walk replaces its weights
        block_tune, e2e = split_tune(build_tune(cfg))
        knobs = {"batch_size": int(cfg.compress.batch_size), "progress": bool(cfg.progress),
                 "min_expert_tokens": int(cfg.compress.min_expert_tokens),
                 "expert_chunk": int(cfg.compress.expert_chunk),
                 "activations": str(cfg.compress.activations), "tune": block_tune}
        t0 = time.perf_counter()
        with PeakMemory(device) as dev_peak, PeakMemory("cpu") as host_peak:
            if e2e is not None:
                t_teacher = time.perf_counter()
                teacher = e2e.teacher(model, calib)
                e2e_s = time.perf_counter() - t_teacher
            if stream:
                compressed_dir = _stream_dir(out_dir)
                if world.on:  # rank 0 writes it, every rank reads it
                    compressed_dir = Path(dist.broadcast_object(str(compressed_dir)))
                report = compress_streamed(m.name_or_path, compressed_dir, calib, methods, device,
                                           dtype, trust_remote_code=m.trust_remote_code,
                                           revision=m.revision, source=source,
                                           transform=transform, **knobs)
            else:
                report = compress_model(model, calib, methods, device=device, **knobs)
            if e2e is not None:
                info = e2e.run(model, teacher, progress=bool(cfg.progress))
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
    else:
        if stream:
            raise ConfigError("compress.stream: every stage is none, there is nothing to stream")
        report = dense_report(model)  # nothing to compress: no calibration, no walk
        metrics["time/compress_s"] = 0.0

    if stream:
        from ciuic_lab.compress.store import checkpoint

        size = checkpoint.stored_bytes(compressed_dir)
        if transform is not None:  # known once the walk has loaded (and untied) the ends
            metrics["rotate/untied_head_bytes"] = transform.untied_head_bytes
        resident = _fits(size, device) if cfg.eval.stream == "auto" else not cfg.eval.stream
        if world.on:  # one decision for every rank: the two evaluations split differently
            resident = dist.broadcast_object(resident)
        if resident:
            model = checkpoint.load(compressed_dir, device)
        else:
            model = None
            if suite is not None:
                why = ("eval.stream=true" if cfg.eval.stream is True
                       else f"{size / 2**30:.1f} GiB does not fit {device}")
                metrics.update(suite.run_streamed(checkpoint.Stored(compressed_dir, device),
                                                  "compressed", notes, why))
        weight_bytes = size
    else:
        if not walk_eval:  # its blocks visit the device one at a time
            model.to(device)  # packed: fits where the dense model may not
        if cfg.save and out_dir is not None and world.main:
            from ciuic_lab.compress.store.checkpoint import save

            compressed_dir = save(model, Path(out_dir) / "compressed", tokenizer=tokenizer,
                                  run_config=to_container(cfg))
        weight_bytes = stored_bytes(model)

    if suite is not None and cfg.eval.serve_memory and world.main:
        from ciuic_lab.eval.serve_memory import serving_memory

        # Before the compressed evaluation: it prepares kernels in place, and a prepared model
        # cannot be saved for the fresh process to load.
        metrics.update(serving_memory(cfg, suite.windows, model, tokenizer, compressed_dir, notes,
                                      out_dir, dense=not (stream or offload)))

    generations: list[dict] = []
    if suite is not None and walk_eval:
        from ciuic_lab.compress.blocks import Resident

        metrics.update(suite.run_streamed(Resident(model, device), "compressed", notes,
                                          "eval.stream=true"))
    elif suite is not None and model is not None:
        metrics.update(suite.run(model, "compressed"))
        generations = suite.generations()
        for row in report.layers:  # what each layer computes with once prepared
            row["kernel"] = suite.kernels.get(row["name"], "reference")
    metrics.update(_sizes(report, weight_bytes, dense_params))
    metrics["dist/world_size"] = world.size
    if world.on:
        notes.append(f"distributed over {world.size} processes: calibration batches and "
                     "perplexity windows split among ranks, layers and routed experts divided "
                     "by cost (the per-layer table's `dist_rank` and `layer_s`); lm-eval, "
                     "generations, speed and serving memory measured by rank 0 alone")
        dist.barrier()  # no rank leaves while another may still need it
    for note in notes:
        log.warning(note)
    return Outcome(model, tokenizer, report, metrics, generations, notes)


def _tune_metrics(report: CompressionReport, metrics: dict) -> None:
    """How much tuning lowered its own loss over the tuned blocks and routed experts: the mean
    ratio after/before (< 1: it helped), and how many kept their tuned form."""
    if report.tuned:
        ratios = [u["loss_after"] / max(u["loss_before"], 1e-30) for u in report.tuned]
        metrics["tune/loss_ratio"] = sum(ratios) / len(ratios)
        metrics["tune/units_kept"] = sum(bool(u["kept"]) for u in report.tuned)
        metrics["tune/units"] = len(report.tuned)


def _stream_dir(out_dir) -> Path:
    """Where a streamed run writes its compressed model: <out_dir>/compressed, or a temporary
    directory (kept: it is the run's result) when there is no run directory."""
    if out_dir is not None:
        return Path(out_dir) / "compressed"
    import tempfile

    return Path(tempfile.mkdtemp(prefix="ciuic_compressed_"))


def _fits(nbytes: int, device: torch.device) -> bool:
    """Whether a model of `nbytes` weights can be evaluated resident on `device` (with room for
    activations: a fifth more on a GPU, half more on the host)."""
    if device.type == "cuda":
        return nbytes * 1.2 < torch.cuda.mem_get_info(device)[0]
    import psutil

    return nbytes * 1.5 < psutil.virtual_memory().available


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
