"""Pareto plot of a sweep: every ok run, the frontier as a staircase, dense baseline.

Draws on an Agg canvas directly (no pyplot), so it never changes the backend of a notebook or
GUI session that calls it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def varying_config_columns(df: pd.DataFrame) -> list[str]:
    """cfg.* columns whose value differs between rows: what a sweep changed."""
    cols = []
    for c in df.columns:
        if c.startswith("cfg.") and df[c].astype(str).nunique(dropna=False) > 1:
            cols.append(c)
    return cols


def point_labels(df: pd.DataFrame, label_cols: Sequence[str] | None = None,
                 short: bool = False) -> list[str]:
    """A label per row: its overrides if known, else the varying config values. `short` drops
    the group prefix of each key (prune.sparsity -> sparsity) where that stays unambiguous.
    Overrides that every row shares (model=..., eval.max_windows=...) are left out: they tell
    the rows of a sweep apart no better than the sweep directory does."""
    if label_cols is None and "overrides" in df.columns and df["overrides"].notna().all():
        labels = _drop_shared_terms([str(v) for v in df["overrides"]])
        labels = [lab or "default" for lab in labels]
    else:
        cols = varying_config_columns(df) if label_cols is None else list(label_cols)
        labels = [",".join(str(r[c]) if c == "overrides" else f"{c.removeprefix('cfg.')}="
                           f"{_short(r[c])}" for c in cols) for _, r in df.iterrows()]
    return _drop_prefixes(labels) if short else labels


# An override list split at the commas that start a new key (a list value keeps its commas).
_TERM_START = re.compile(r",(?=[+~]*[\w./-]+=)")


def _drop_shared_terms(labels: list[str]) -> list[str]:
    if len(labels) < 2:
        return labels
    terms = [_TERM_START.split(lab) if lab else [] for lab in labels]
    shared = set(terms[0]).intersection(*terms[1:])
    return [",".join(t for t in ts if t not in shared) for ts in terms]


_KEY = re.compile(r"(?<![\w.])((?:[\w-]+\.)+)([\w-]+)=")


def _drop_prefixes(labels: list[str]) -> list[str]:
    full = {m.group(1) + m.group(2) for lab in labels for m in _KEY.finditer(lab)}
    leaves = [k.rsplit(".", 1)[-1] for k in full]
    if len(set(leaves)) != len(leaves):
        return labels  # two groups share a leaf name (e.g. prune.bits, quant.bits): keep them
    return [_KEY.sub(lambda m: m.group(2) + "=", lab) for lab in labels]


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _is_study(term: str) -> bool:
    return term.lstrip("+~").startswith("experiment=")


def studies(df: pd.DataFrame) -> list[str] | None:
    """The `+experiment=` study of each row, from its overrides, when the rows come from more than
    one study (a joint summary of several sweep dirs, e.g. multirun/frontiers/<model>); else None."""
    if "overrides" not in df.columns or df.empty:
        return None
    names = []
    for v in df["overrides"]:
        terms = _TERM_START.split(v) if isinstance(v, str) else []
        names.append(next((t.split("=", 1)[1] for t in terms if _is_study(t)), "other"))
    return names if len(set(names)) > 1 else None


def pareto_plot(df: pd.DataFrame, front: pd.DataFrame, x: str, y: str, path: str | Path,
                label_cols: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Save a PNG of y against x for the ok rows of df, with `front` drawn as a staircase."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ok = df
    if "status" in df.columns:
        ok = df[df["status"] == "ok"]
    if x in ok.columns and y in ok.columns:
        xs = pd.to_numeric(ok[x], errors="coerce")
        ys = pd.to_numeric(ok[y], errors="coerce")
        good = xs.map(math.isfinite) & ys.map(math.isfinite)
        ok, xs, ys = ok[good], xs[good], ys[good]
    else:
        ok = ok.iloc[0:0]
        xs = ys = pd.Series(dtype=float)

    if ok.empty:
        ax.text(0.5, 0.5, "no successful runs with finite values", ha="center", va="center",
                transform=ax.transAxes)
    else:
        groups = studies(ok)
        labels = point_labels(ok, label_cols, short=True)
        if groups is None:
            ax.scatter(xs, ys, s=18, color="tab:blue", alpha=0.7, label="runs", zorder=2)
        else:  # a joint summary of several studies: one colour each, labels without the study
            labels = [",".join(t for t in _TERM_START.split(lab) if not _is_study(t)) or name
                      for lab, name in zip(labels, groups)]
            for k, name in enumerate(dict.fromkeys(groups)):
                sel = [g == name for g in groups]
                ax.scatter(xs[sel], ys[sel], s=18, color=f"C{k % 10}", alpha=0.8, label=name,
                           zorder=2)
        # past ~20 points every label overlaps: name only the frontier's
        named = set(front.index) if len(ok) > 20 else set(ok.index)
        for idx, label, px, py in zip(ok.index, labels, xs, ys):
            if idx in named:
                ax.annotate(label, (px, py), xytext=(3, 3), textcoords="offset points",
                            fontsize=6, alpha=0.8)
        if not front.empty:
            fx = pd.to_numeric(front[x]).to_numpy()
            fy = pd.to_numeric(front[y]).to_numpy()
            # black, hollow markers: the colour underneath still says which study a point is from
            ax.step(fx, fy, where="post", color="black", lw=1.2, label="Pareto frontier",
                    zorder=3)
            ax.scatter(fx, fy, s=42, facecolors="none", edgecolors="black", zorder=4)
        dense_col = f"{y}_dense"
        if dense_col in ok.columns:
            dense = pd.to_numeric(ok[dense_col], errors="coerce").dropna()
            dense = dense[dense.map(math.isfinite)]
            if not dense.empty:
                ax.axhline(float(dense.median()), color="gray", ls="--", lw=1,
                           label=f"dense ({float(dense.median()):.3g})")
                ys = pd.concat([ys, dense])
        lo, hi = float(ys.min()), float(ys.max())
        if lo > 0 and hi / lo > 10:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(True, alpha=0.3, which="both")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return path
