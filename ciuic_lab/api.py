"""Python API: the same compression the CLI runs, for scripts and notebooks.

    model, tok = ciuic_lab.load("tiny-random-deepseek-v3")
    model, report = ciuic_lab.compress(model, tok, ["prune.sparsity=0.5", "quant.bits=4"])
    report.totals()  # {'bits_per_param': ..., 'ratio_vs_fp16': ..., ...}
"""

from __future__ import annotations

from omegaconf import DictConfig

from ciuic_lab.compress.pipeline import CompressionReport, compress_model
from ciuic_lab.config import build_stages, compose


def calibration(tokenizer, cfg: DictConfig):
    from ciuic_lab.data.calibration import calibration_windows

    d = cfg.data
    return calibration_windows(tokenizer, int(d.calib_samples), int(d.calib_seqlen),
                               int(d.calib_seed), source=str(d.calib_source))


def compress(model, tokenizer, cfg_or_overrides: DictConfig | list[str] | None = None,
             progress: bool = True) -> tuple[object, CompressionReport]:
    """Compress `model` in place with the stages of a run config (or CLI-style overrides).

    Returns (model, report); report.layers is the per-layer table, report.totals() the sizes
    read from the packed storage.
    """
    cfg = cfg_or_overrides if isinstance(cfg_or_overrides, DictConfig) else compose(cfg_or_overrides)
    stages = build_stages(cfg)
    windows = calibration(tokenizer, cfg)
    report = compress_model(model, windows, stages, batch_size=int(cfg.compress.batch_size),
                            progress=progress)
    return model, report
