"""End of a Hydra sweep: results table, Pareto set, plot, printed summary, W&B summary run.

Jobs may have run in other processes (launchers), so everything is read back from the
result.json files on disk. Re-run by hand with `python -m ciuic_lab.track.callback SWEEP_DIR`.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ciuic_lab.track import FRONTIER
from ciuic_lab.track.plots import pareto_plot, point_labels
from ciuic_lab.track.results import load, pareto, serve_memory
from ciuic_lab.track.tracker import sweep_group

log = logging.getLogger("ciuic_lab")
X, Y = FRONTIER
ACC = "acc/mean"


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def summary_table(df: pd.DataFrame, front: pd.DataFrame) -> str:
    """A fixed-width text table: one line per run, frontier runs starred; serving memory and the
    lm-eval mean accuracy are columns when any run measured them (a note says where memory fell
    back to the in-process peak)."""
    headers = ["", "overrides", "status", "bits/param", "ratio", "ppl", "ppl dense"]
    mem, note = serve_memory(df)
    mem_dense, _ = serve_memory(df, "_dense")
    has_mem = bool(mem.notna().any())
    if has_mem:
        headers += ["serve MiB", "dense"]
    acc = ACC in df.columns and df[ACC].notna().any()
    if acc:
        headers += ["acc/mean", "acc dense"]
    labels = point_labels(df) if not df.empty else []
    rows = []
    for (idx, r), label in zip(df.iterrows(), labels):
        rows.append(["*" if idx in front.index else "", label or "default", r.get("status"),
                     _fmt(r.get(X), ".3f"), _fmt(r.get("size/ratio_vs_fp16"), ".2f"),
                     _fmt(r.get(Y), ".3f"), _fmt(r.get(f"{Y}_dense"), ".3f")])
        if has_mem:
            rows[-1] += [_fmt(mem[idx] / 2**20, ".1f"), _fmt(mem_dense[idx] / 2**20, ".1f")]
        if acc:
            rows[-1] += [_fmt(r.get(ACC), ".3f"), _fmt(r.get(f"{ACC}_dense"), ".3f")]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [headers, ["-" * w for w in widths], *rows]]
    if has_mem and note:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _missing(v) -> bool:
    return v is None or (pd.api.types.is_scalar(v) and bool(pd.isna(v)))


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (a number in one run, text in another) made uniform: numbers
    if they all are, else text; parquet needs one type per column."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype != object:
            continue
        kinds = {type(v) for v in out[c] if not _missing(v)}
        if kinds and kinds <= {int, float}:
            out[c] = pd.to_numeric(out[c])
        elif len(kinds) > 1:
            out[c] = out[c].map(lambda v: None if _missing(v) else str(v))
    return out


def summarize_sweep(sweep_dir: str | Path, tracker_cfg: dict | None = None, x: str = X,
                    y: str = Y, echo: bool = True) -> dict[str, Path]:
    """Write results.parquet, pareto.parquet, pareto.png and summary.txt into sweep_dir, print the
    table, and log a W&B summary run (mode from tracker_cfg; none if tracker_cfg is None)."""
    sweep_dir = Path(sweep_dir)
    df = load(sweep_dir)
    front = pareto(df, x, y)
    paths = {"results": sweep_dir / "results.parquet", "pareto": sweep_dir / "pareto.parquet",
             "plot": sweep_dir / "pareto.png", "summary": sweep_dir / "summary.txt"}
    _parquet_safe(df).to_parquet(paths["results"])
    _parquet_safe(front).to_parquet(paths["pareto"])
    group = (tracker_cfg or {}).get("group") or sweep_group(sweep_dir)
    pareto_plot(df, front, x, y, paths["plot"], title=f"sweep {group}")

    n_ok = int((df["status"] == "ok").sum())
    text = f"sweep {sweep_dir}: {len(df)} runs, {n_ok} ok, {len(df) - n_ok} failed"
    if df.empty:
        text += "\nno result.json found"
    else:
        text += f", {len(front)} on the {x} vs {y} frontier (*)\n" + summary_table(df, front)
        if n_ok == 0:
            text += "\nno successful run: see the error column of results.parquet"
    paths["summary"].write_text(text + "\n")
    if echo:
        print(text)

    if tracker_cfg is not None:
        _log_summary_run(tracker_cfg, group, sweep_dir, df, front, paths["plot"], n_ok)
    return paths


def _log_summary_run(tracker_cfg: dict, group: str, sweep_dir: Path, df: pd.DataFrame,
                     front: pd.DataFrame, png: Path, n_ok: int) -> None:
    from ciuic_lab.track.tracker import Tracker

    tracker = Tracker(mode=tracker_cfg.get("mode", "disabled"),
                      project=tracker_cfg.get("project", "ciuic_lab"), group=group,
                      name=f"{group}-summary", job_type="sweep-summary",
                      config={"sweep_dir": str(sweep_dir)}, dir=str(sweep_dir),
                      entity=tracker_cfg.get("entity"), tags=tracker_cfg.get("tags"))
    try:
        tracker.log({"sweep/runs": len(df), "sweep/ok": n_ok, "sweep/failed": len(df) - n_ok,
                     "sweep/pareto_points": len(front)})
        tracker.log_table("pareto", _table_rows(front))
        tracker.log_table("results", _table_rows(df))
        tracker.log_image("pareto_plot", png)
    finally:
        tracker.finish()


def _table_rows(df: pd.DataFrame) -> list[dict]:
    keep = [c for c in df.columns if not c.startswith("cfg.") and c != "error"]
    return df[keep].astype(object).where(df[keep].notna(), None).to_dict("records")


class SweepSummary(Callback):
    """Hydra callback (hydra.callbacks.sweep_summary) summarising a sweep when it ends."""

    def __init__(self, x: str = X, y: str = Y):
        self.x, self.y = x, y

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        tracker_cfg = None
        if config.get("tracker") is not None:
            tracker_cfg = OmegaConf.to_container(config.tracker, resolve=True)
        try:
            summarize_sweep(sweep_dir, tracker_cfg, x=self.x, y=self.y)
        except Exception:
            # Every job's result.json is already on disk; a summary failure must not turn a
            # finished sweep into a failed command. Loud, and re-runnable by hand.
            log.exception("sweep summary failed; re-run: python -m ciuic_lab.track.callback %s",
                          sweep_dir)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Summarise a finished sweep directory.")
    ap.add_argument("sweep_dir")
    ap.add_argument("--tracker-mode", default="disabled")
    ap.add_argument("--project", default="ciuic_lab")
    ap.add_argument("--group", default=None)
    a = ap.parse_args()
    summarize_sweep(a.sweep_dir, {"mode": a.tracker_mode, "project": a.project, "group": a.group})
    sys.exit(0)
