"""Python API: the same run the CLI does (ciuic_lab.runner.run), for scripts and notebooks.

    from ciuic_lab.api import compress
    model, tok = ciuic_lab.load("tiny-random-deepseek-v3")
    model, report = compress(model, tok, ["prune.sparsity=0.5", "quant.bits=4"])
    report.totals()  # {'bits_per_param': ..., 'ratio_vs_fp16': ..., ...}
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ciuic_lab.compress.walk.pipeline import CompressionReport
from ciuic_lab.config import compose
from ciuic_lab.runner import run


def compress(model, tokenizer, cfg_or_overrides: DictConfig | list[str] | None = None,
             progress: bool = True) -> tuple[object, CompressionReport]:
    """Compress `model` in place with the stages of a run config (or CLI-style overrides),
    exactly as the CLI does (device, offload, expert fallbacks included), without evaluating.

    Returns (model, report); report.layers is the per-layer table, report.totals() the sizes
    read from the packed storage.
    """
    cfg = cfg_or_overrides if isinstance(cfg_or_overrides, DictConfig) else compose(cfg_or_overrides)
    cfg = OmegaConf.merge(cfg, {"progress": bool(progress)})
    outcome = run(cfg, model=model, tokenizer=tokenizer, evaluate=False)
    return outcome.model, outcome.report
