"""result.json: the record one run leaves in its directory, whatever happened to it.

Strict JSON has no NaN or Infinity, so non-finite floats are stored as null and their original
value is kept in `nonfinite` ({dotted key: "nan" | "inf" | "-inf"}); `read_result` puts them back.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ciuic_lab.atomic import write_atomic

RESULT_NAME = "result.json"
STATUSES = ("ok", "failed")


def _plain(v: Any) -> Any:
    """Tensors, numpy scalars/arrays and paths as plain Python values."""
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):  # torch / numpy
        return v.tolist()
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    if isinstance(v, (Path, os.PathLike)):
        return os.fspath(v)
    return v


def _json_safe(v: Any, path: str, nonfinite: dict) -> Any:
    v = _plain(v)
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        nonfinite[path] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x, _join(path, k), nonfinite) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_json_safe(x, _join(path, i), nonfinite) for i, x in enumerate(v)]
    return str(v)  # enums, dtypes, devices: their names are what a reader wants


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def write_result(run_dir: str | Path, *, config: dict, metrics: dict, layers: list[dict],
                 status: str, error: str | None, extra: dict | None = None) -> Path:
    """Write run_dir/result.json atomically (a reader never sees half a file); returns its path."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "status": status,
        "error": error,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "metrics": metrics,
        "layers": layers,
    }
    for k, v in (extra or {}).items():
        if k in record:
            raise ValueError(f"extra key {k!r} would overwrite a result.json field")
        record[k] = v
    nonfinite: dict[str, str] = {}
    safe = _json_safe(record, "", nonfinite)
    safe["nonfinite"] = nonfinite

    def write(f):
        json.dump(safe, f, indent=1, allow_nan=False)
        f.write("\n")

    return write_atomic(run_dir / RESULT_NAME, write)


def _restore(v: Any, path: str, nonfinite: dict) -> Any:
    if v is None and path in nonfinite:
        return float(nonfinite[path])
    if isinstance(v, dict):
        return {k: _restore(x, _join(path, k), nonfinite) for k, x in v.items()}
    if isinstance(v, list):
        return [_restore(x, _join(path, i), nonfinite) for i, x in enumerate(v)]
    return v


def read_result(path: str | Path) -> dict:
    """A result.json (or the run directory holding one) as a dict, non-finite floats restored."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_NAME
    record = json.loads(path.read_text())
    nonfinite = record.get("nonfinite") or {}
    if nonfinite:
        record = _restore(record, "", nonfinite)
    return record
