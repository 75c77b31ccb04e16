"""Config checks and stage building, shared by the CLI and the Python API.

Everything here is cheap: it runs before any model is loaded, so a bad value fails in a second
with a message naming its key.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ciuic_lab.compress.base import ConfigError, Method

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("prune", "lowrank", "quant")


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The run config as the CLI would compose it (conf/run.yaml + overrides), without running."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="run", overrides=list(overrides or []))


def build_stages(cfg: DictConfig) -> list[Method]:
    """Instantiate the enabled stages in `cfg.stages` order, checking every value."""
    from hydra.utils import instantiate

    order = list(cfg.stages)
    for s in order:
        if s not in STAGES:
            raise ConfigError(f"stages: unknown stage {s!r}; stages are {', '.join(STAGES)}")
    if len(set(order)) != len(order):
        raise ConfigError(f"stages: each stage may appear once, got {order}")
    methods = []
    for s in order:
        group = cfg.get(s)
        if group is None or "_target_" not in group:
            continue  # `<stage>=none`
        try:
            m = instantiate(group, _convert_="all")
        except Exception as e:  # Hydra wraps the dataclass' own error; surface the key
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if isinstance(cause, ConfigError):
                raise cause from None
            if isinstance(cause, TypeError) and "unexpected keyword" in str(cause):
                key = str(cause).split("'")[-2] if "'" in str(cause) else "?"
                raise ConfigError(f"{s}.{key}: unknown key for {group._target_} (if the recipe "
                                  "set it, add recipe=none)") from None
            raise
        if m.stage != s:
            raise ConfigError(f"{s}: {group._target_} is a {m.stage} method, not a {s} method")
        methods.append(m)
    for m in methods:
        if m.alone and len(methods) > 1:
            others = " ".join(f"{x.stage}=none" for x in methods if x is not m)
            raise ConfigError(f"{m.stage}: {type(m).__name__} runs alone; set {others}")
    return methods


def validate(cfg: DictConfig) -> list[Method]:
    """All cheap checks of a run config; returns the stages. Raises ConfigError / ModelNotFound."""
    from ciuic_lab.models.loader import resolve

    methods = build_stages(cfg)
    resolve(cfg.model.name_or_path)
    ev = cfg.eval
    if ev.seqlen is not None and int(ev.seqlen) < 2:
        raise ConfigError(f"eval.seqlen: must be >= 2 or null, got {ev.seqlen}")
    if ev.max_windows is not None and int(ev.max_windows) < 1:
        raise ConfigError(f"eval.max_windows: must be >= 1 or null, got {ev.max_windows}")
    for key in ("calib_samples", "calib_seqlen"):
        if int(cfg.data[key]) < 1:
            raise ConfigError(f"data.{key}: must be >= 1, got {cfg.data[key]}")
    if cfg.tracker.mode not in ("online", "offline", "disabled", "auto"):
        raise ConfigError(f"tracker.mode: must be online, offline, disabled or auto; got {cfg.tracker.mode!r}")
    if cfg.get("save") and any(m.alone for m in methods):
        raise ConfigError("save: the lab's checkpoint format holds its own packed layers; a "
                          "bitsandbytes baseline is not saved (save=false)")
    return methods


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
