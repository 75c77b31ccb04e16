"""A thin Weights & Biases run that never prompts and never imports wandb when disabled.

GPU machines may lack wandb or a network: `disabled` needs neither, `offline` writes a run
directory to `wandb sync` later, `auto` picks online only where an API key is configured.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from typing_extensions import Self

log = logging.getLogger("ciuic_lab")
MODES = ("online", "offline", "disabled", "auto")


def api_key_configured() -> bool:
    """True if W&B could log in without asking: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(mode: str) -> str:
    """online | offline | disabled. `auto` honours WANDB_MODE if set (tests set it to disabled),
    else online with a configured key, else offline."""
    if mode not in MODES:
        raise ValueError(f"tracker.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if api_key_configured() else "offline"


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep, from its directory: multirun/2026-11-27/10-00-00 ->
    2026-11-27_10-00-00. The jobs (ciuic_lab.run) and the end-of-sweep summary both use it."""
    p = Path(sweep_dir)
    return f"{p.parent.name}_{p.name}" if p.parent.name else p.name


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Tracker:
    """One W&B run. `log` also sets the run summary, so the last value is what tables show."""

    def __init__(self, mode: str, project: str, group: str | None = None, name: str | None = None,
                 config: dict | None = None, dir: str | Path = ".", *, entity: str | None = None,
                 tags: list[str] | None = None, job_type: str | None = None):
        self.mode = resolve_mode(mode)
        self.summary: dict = {}  # what was logged, kept locally in every mode
        self.run = None
        if self.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        Path(dir).mkdir(parents=True, exist_ok=True)
        kwargs = {"project": project, "entity": entity, "group": group, "name": name,
                  "job_type": job_type, "config": config or {}, "dir": str(dir),
                  "tags": list(tags or []) or None, "reinit": "create_new",
                  "settings": wandb.Settings(console="off", silent=True)}
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as e:
            if self.mode != "online":
                raise
            # A network or login failure must not cost a compression run: keep it for `wandb sync`.
            log.warning("W&B online init failed (%s); logging offline instead", e)
            self.mode = "offline"
            self.run = wandb.init(mode="offline", **kwargs)

    @property
    def run_dir(self) -> Path | None:
        """The W&B run's own directory (…/wandb/<run>/), None when disabled."""
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, metrics: dict) -> None:
        self.summary.update(metrics)
        if self.run is None:
            return
        numeric = {k: v for k, v in metrics.items() if _numeric(v)}
        if numeric:
            self.run.log(numeric)
        # Strings (e.g. mem/peak_kind) and None belong in the summary, not in history charts.
        self.run.summary.update({k: v for k, v in metrics.items() if v is not None})

    def log_table(self, key: str, rows: list[dict]) -> None:
        if self.run is None:
            return
        import wandb

        columns: list[str] = []
        for r in rows:
            columns += [c for c in r if c not in columns]
        data = [[_cell(r.get(c)) for c in columns] for r in rows]
        self.run.log({key: wandb.Table(columns=columns or ["empty"], data=data,
                                       allow_mixed_types=True)})

    def log_image(self, key: str, png_path: str | Path) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Image(str(png_path))})

    def finish(self, exit_code: int | None = None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


def _cell(v):
    """Table cells: scalars as they are; non-finite floats as None so the table stays valid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)
