"""The runs of a W&B group as the same DataFrame `results.load` builds from result.json files.

Every job logs its resolved config as the W&B run config and its metrics as the run summary
(ciuic_lab.job via track.tracker), so `cfg.<dotted key>` columns come from run.config and metric
columns from run.summary, under the same names. What only result.json knows (the error text, the
per-layer table) is not here; what only W&B knows (run id, url, state) is added as wandb_* columns.

    from ciuic_lab.track.wandb_results import load_wandb
    from ciuic_lab.track.results import pareto
    df = load_wandb("ciuic_lab", "ablation_stages_2026-11-27_10-00-00")
    front = pareto(df)

wandb is imported only when no `api` is passed, and needs online access (a configured key);
offline runs are read with results.load(sweep_dir), or after `wandb sync`.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from ciuic_lab.track.results import flatten, frame

PRIMARY = "ppl/wikitext2"  # every ok job logs it; a run without it never finished measuring
SUMMARY_JOB = "sweep-summary"  # job_type of the callback's per-sweep summary run
_FAILED_STATES = ("failed", "crashed", "killed", "preempted")
_NONFINITE = {"NaN": math.nan, "nan": math.nan, "Infinity": math.inf, "inf": math.inf,
              "-Infinity": -math.inf, "-inf": -math.inf}


def _summary(run) -> dict:
    """A run's summary as a plain dict (public-API runs expose `summary_metrics`)."""
    s = getattr(run, "summary_metrics", None)
    if s is None:
        s = getattr(run, "summary", None) or {}
        s = getattr(s, "_json_dict", s)
    return dict(s)


def summary_metrics(summary: dict) -> dict:
    """Metric columns from a W&B summary: scalars only, W&B's own keys (_step, _runtime, ...) and
    media/table references dropped, NaN/Infinity strings back to floats."""
    out = {}
    for k, v in summary.items():
        if k.startswith("_") or isinstance(v, (dict, list, tuple)):
            continue  # tables, images, histograms are {"_type": ...} references
        if isinstance(v, str) and v in _NONFINITE:
            v = _NONFINITE[v]
        out[k] = v
    return out


def run_status(state: str | None, metrics: dict) -> str:
    """ok | failed | running, as result.json would say. A failed job still closes its W&B run
    normally (state finished) but without metrics, so `finished` alone does not mean ok."""
    if state in ("running", "pending"):
        return "running"
    if state == "finished" and PRIMARY in metrics:
        return "ok"
    return "failed"


def _created(v: Any) -> str | None:
    """W&B's created_at (UTC, often without offset or with Z) in result.json's format."""
    if v is None:
        return None
    try:
        t = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return str(v)
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="seconds")


def row(run) -> dict:
    """One DataFrame row from one W&B run, with the columns results.row gives a result.json."""
    metrics = summary_metrics(_summary(run))
    state = getattr(run, "state", None)
    status = run_status(state, metrics)
    # A job's W&B name is its overrides joined by commas ("default" when there were none).
    name = getattr(run, "name", None)
    config = {k: v for k, v in dict(getattr(run, "config", None) or {}).items()
              if not k.startswith("_")}
    r = {"run_dir": getattr(run, "url", None), "status": status,
         "error": None if status != "failed" else f"W&B run state {state!r}, no {PRIMARY} logged",
         "created": _created(getattr(run, "created_at", None)),
         "overrides": "" if name == "default" else name,
         "wandb_id": getattr(run, "id", None), "wandb_state": state,
         "wandb_group": getattr(run, "group", None)}
    r.update(flatten(config, "cfg."))
    r.update(metrics)
    return r


def _api(api):
    if api is not None:
        return api
    from ciuic_lab.track.tracker import api_key_configured

    if not api_key_configured():
        raise RuntimeError("load_wandb reads from the W&B server: set WANDB_API_KEY or run "
                           "`wandb login`; for offline runs use results.load(sweep_dir)")
    import wandb

    return wandb.Api(timeout=60)


def load_wandb(project: str, group: str | None = None, *, entity: str | None = None,
               api=None, include_summary: bool = False) -> pd.DataFrame:
    """One row per W&B run of `project` (in `group`, if given): run_dir (the run's url), status,
    error, created, overrides, cfg.<dotted key>, metrics, wandb_id, wandb_state, wandb_group.

    `api` is a wandb.Api (or anything with `.runs(path, filters=..., order=...)`); None makes one.
    The sweep's summary run (job_type sweep-summary) is left out unless include_summary.
    """
    api = _api(api)
    path = project if entity is None or "/" in project else f"{entity}/{project}"
    filters = {"group": group} if group is not None else {}
    runs = api.runs(path, filters=filters, order="+created_at")
    return frame([row(r) for r in runs
                  if include_summary or getattr(r, "job_type", None) != SUMMARY_JOB])
