"""Results of many runs as one pandas DataFrame, and their Pareto frontier."""

from __future__ import annotations

import glob
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ciuic_lab.track import FRONTIER, PEAK_MEMORY, SERVE_MEMORY
from ciuic_lab.track.result import RESULT_NAME, read_result

BASE_COLUMNS = ["run_dir", "status", "error", "created", "overrides"]


def find_results(path_or_glob: str | Path | Iterable[str | Path]) -> list[Path]:
    """result.json files named by a directory (searched recursively), a file, a glob, or a list."""
    if not isinstance(path_or_glob, (str, Path)):
        found = [p for item in path_or_glob for p in find_results(item)]
        return sorted(set(found), key=_natural_key)
    s = str(path_or_glob)
    paths = [Path(p) for p in glob.glob(s, recursive=True)] if glob.has_magic(s) else [Path(s)]
    out: set[Path] = set()
    for p in paths:
        if p.is_dir():
            out.update(p.rglob(RESULT_NAME))
        elif p.is_file():
            out.add(p)
        elif not glob.has_magic(s):
            raise FileNotFoundError(f"no such result file or directory: {p}")
    return sorted(out, key=_natural_key)


def _natural_key(p: Path) -> list:
    # job 10 after job 9, not after job 1
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict → dotted keys; lists become JSON strings so every cell is a scalar."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def _overrides(record: dict, run_dir: Path) -> str | None:
    """The command-line overrides of a job: from result.json, else Hydra's .hydra/overrides.yaml."""
    ov = record.get("overrides")
    if ov is None:
        f = run_dir / ".hydra" / "overrides.yaml"
        if f.is_file():
            import yaml

            ov = yaml.safe_load(f.read_text())
    if ov is None:
        return None
    return ov if isinstance(ov, str) else ",".join(map(str, ov))


def row(path: str | Path) -> dict:
    """One DataFrame row from one result.json: base columns, cfg.* columns, metric columns."""
    path = Path(path)
    rec = read_result(path)
    r = {"run_dir": str(path.parent), "status": rec.get("status"), "error": rec.get("error"),
         "created": rec.get("created"), "overrides": _overrides(rec, path.parent)}
    r.update(flatten(rec.get("config") or {}, "cfg."))
    r.update(rec.get("metrics") or {})
    return r


def load(path_or_glob: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per run: run_dir, status, error, created, overrides, cfg.<dotted key>, metrics."""
    return frame([row(p) for p in find_results(path_or_glob)])


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with the base columns first (present even when empty)."""
    df = pd.DataFrame(rows)
    for c in BASE_COLUMNS:
        if c not in df.columns:
            df[c] = pd.Series(dtype=object)
    rest = [c for c in df.columns if c not in BASE_COLUMNS]
    return df[BASE_COLUMNS + rest]


def load_layers(path_or_glob: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """The per-layer tables of many runs stacked, with a run_dir column to join on."""
    frames = []
    for p in find_results(path_or_glob):
        layers = read_result(p).get("layers") or []
        if layers:
            frames.append(pd.DataFrame(layers).assign(run_dir=str(Path(p).parent)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_dir"])


def pareto(df: pd.DataFrame, x: str = FRONTIER[0], y: str = FRONTIER[1]) -> pd.DataFrame:
    """Rows no other row beats on both x and y (both minimised), sorted by x.

    Failed rows and rows with a missing or non-finite x or y are left out. Exact duplicates of a
    frontier point are all kept: neither dominates the other.
    """
    if df.empty or x not in df.columns or y not in df.columns:
        return df.iloc[0:0]
    ok = df["status"].eq("ok") if "status" in df.columns else pd.Series(True, index=df.index)
    xs = pd.to_numeric(df[x], errors="coerce")
    ys = pd.to_numeric(df[y], errors="coerce")
    finite = xs.map(_finite) & ys.map(_finite)
    cand = pd.DataFrame({"x": xs, "y": ys})[ok & finite]
    cand = cand.sort_values(["x", "y"], kind="mergesort")
    keep, best_x, best_y = [], None, math.inf
    for idx, cx, cy in zip(cand.index, cand["x"], cand["y"]):
        if cy < best_y:
            keep.append(idx)
            best_x, best_y = cx, cy
        elif cy == best_y and cx == best_x:
            keep.append(idx)
    return df.loc[keep]


def serve_memory(df: pd.DataFrame, suffix: str = "") -> tuple[pd.Series, str | None]:
    """Bytes serving each row's model took (`mem/serve_peak_bytes`, `suffix` "_dense" for the
    dense model's), and a note when some rows (results from before it was measured, or runs that
    skipped it) fall back to `mem/peak_bytes`, the run's own in-process peak, which also holds
    what compression left behind; None when none do."""
    serve = _numeric(df, SERVE_MEMORY + suffix)
    peak = _numeric(df, PEAK_MEMORY + suffix)
    fallback = serve.isna() & peak.notna()
    note = None
    if fallback.any():
        note = (f"{int(fallback.sum())} of {len(df)} runs have no {SERVE_MEMORY}{suffix}: their "
                f"memory is {PEAK_MEMORY}{suffix}, the run's in-process peak (it also holds what "
                f"compression left behind)")
    return serve.where(~fallback, peak), note


def _numeric(df: pd.DataFrame, col: str) -> pd.Series:
    if col not in df.columns:
        return pd.Series(float("nan"), index=df.index)
    return pd.to_numeric(df[col], errors="coerce")


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))
