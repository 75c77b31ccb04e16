"""One disk cache for results that are the same for every point of a sweep (dense baselines).

    cached("dense_ppl", key_parts, compute) -> dict

An entry lives at `$CIUIC_LAB_CACHE/<namespace>/<sha256>.json`. Its key is the caller's parts
(everything that changes the value: the weights' fingerprint, dtype, device, batch size, data)
plus this package's code version, so an upgrade never reads a stale number. Writes go to a
temporary file renamed into place, so parallel sweep jobs never see half a file; an unreadable
(torn, foreign) entry is recomputed, not trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from ciuic_lab.atomic import write_atomic

PACKAGE_DIR = Path(__file__).resolve().parent


def root() -> Path:
    return Path(os.environ.get("CIUIC_LAB_CACHE", Path.home() / ".cache" / "ciuic_lab"))


@functools.cache
def code_version() -> str:
    """sha256 over this package's Python sources: any change to the code invalidates the cache."""
    h = hashlib.sha256()
    for p in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(p.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def key(parts: list) -> str:
    return hashlib.sha256(json.dumps([[str(p) for p in parts], code_version()]).encode()).hexdigest()


def path_for(namespace: str, parts: list) -> Path:
    return root() / namespace / f"{key(parts)}.json"


def cached(namespace: str, parts: list, compute: Callable[[], dict]) -> dict:
    """compute() once per key, then read back from disk."""
    value = lookup(namespace, parts)
    if value is not None:
        return value
    value = dict(compute())
    store(namespace, parts, value)
    return value


def lookup(namespace: str, parts: list) -> dict | None:
    """The value stored under the key, or None (absent, torn or foreign: recompute)."""
    try:
        record = json.loads(path_for(namespace, parts).read_text())
        return dict(record["value"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(namespace: str, parts: list, value: dict) -> None:
    path = path_for(namespace, parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"parts": [str(p) for p in parts], "value": value}
    write_atomic(path, lambda f: json.dump(record, f, indent=1))
