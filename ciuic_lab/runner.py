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

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from ciuic_lab.compress.pipeline import CompressionReport, compress_model, dense_report, profile
from ciuic_lab.config import to_container, validate
from ciuic_lab.eval.memory import PeakMemory, stored_bytes


@dataclass
class Outcome:
    model: torch.nn.Module
    tokenizer: object
    report: CompressionReport
    metrics: dict = field(default_factory=dict)
    generations: list[dict] = field(default_factory=list)


def calibration(tokenizer, cfg: DictConfig) -> torch.Tensor:
    from ciuic_lab.data.calibration import calibration_windows

    d = cfg.data
    return calibration_windows(tokenizer, int(d.calib_samples), int(d.calib_seqlen),
                               int(d.calib_seed), source=str(d.calib_source))


def run(cfg: DictConfig, *, model=None, tokenizer=None, out_dir: str | Path | None = None,
        evaluate: bool = True, metrics: dict | None = None) -> Outcome:
    """`metrics`, if given, is filled as measurements arrive, so a caller that records a failure
    keeps everything measured before it."""
    from ciuic_lab.models.loader import load, pick_device, pick_dtype

    methods = validate(cfg, None if model is None else model.config)  # before anything expensive
    torch.manual_seed(int(cfg.seed))
    device = pick_device(cfg.device)
    # Layer-by-layer: the model waits on CPU, one block at a time is compressed on `device`.
    offload = bool(cfg.compress.offload) and device.type != "cpu"
    if model is None:
        model, tokenizer = load(cfg.model.name_or_path, dtype=pick_dtype(cfg.model.dtype, device),
                                device="cpu" if offload else str(device),
                                trust_remote_code=cfg.model.trust_remote_code,
                                experts_implementation=cfg.model.experts_implementation,
                                seed=int(cfg.seed), revision=cfg.model.revision)
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
        if not offload:
            metrics.update(suite.run(model, "dense"))

    if methods:
        calib = calibration(tokenizer, cfg)
        t0 = time.perf_counter()
        with PeakMemory(device) as cpm:
            report = compress_model(model, calib, methods,
                                    batch_size=int(cfg.compress.batch_size),
                                    progress=bool(cfg.progress), device=device,
                                    min_expert_tokens=int(cfg.compress.min_expert_tokens))
        metrics["time/compress_s"] = time.perf_counter() - t0
        metrics["mem/compress_peak_bytes"] = cpm.peak_bytes
        metrics["calib/tokens"] = int(calib.numel())
    else:
        report = dense_report(model)  # nothing to compress: no calibration, no walk
        metrics["time/compress_s"] = 0.0
    model.to(device)  # packed: fits where the dense model may not
    if cfg.save and out_dir is not None:
        from ciuic_lab.compress.checkpoint import save

        save(model, Path(out_dir) / "compressed", tokenizer=tokenizer, run_config=to_container(cfg))

    generations: list[dict] = []
    if suite is not None:
        metrics.update(suite.run(model, "compressed"))
        generations = suite.generations()
    metrics.update(_sizes(report, stored_bytes(model), dense_params))
    return Outcome(model, tokenizer, report, metrics, generations)


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
    pairs = [(v, params.get(k, 0)) for k, v in alloc.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None
