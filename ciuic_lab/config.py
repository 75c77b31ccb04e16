"""Config checks and stage building, shared by the CLI and the Python API.

Everything here is cheap: it runs before any model is loaded, so a bad value fails in a second
with a message naming its key.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ciuic_lab import schema
from ciuic_lab.compress.base import Method
from ciuic_lab.errors import ConfigError
from ciuic_lab.schema import CONF_DIR, STAGES


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The run config as the CLI would compose it (conf/run.yaml + overrides), without running."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="run", overrides=list(overrides or []))


def build_methods(cfg: DictConfig) -> list[Method]:
    """Instantiate the enabled stages in `cfg.stages` order, checking every value (and first,
    that the config holds no key the schema does not know and names no callable the lab does
    not register)."""
    schema.check(cfg)
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
        methods.append(_instantiate(group))
    for m in methods:
        if m.alone and len(methods) > 1:
            others = " ".join(f"{x.stage}=none" for x in methods if x is not m)
            raise ConfigError(f"{m.stage}: {type(m).__name__} runs alone; set {others}")
    return methods


def build_tune(cfg: DictConfig):
    """The tuning pass of `tune=<option>`, checked, or None (`tune=none`). Its `_target_` was
    checked against conf/tune's own (schema.check, in build_methods) before this runs."""
    group = cfg.get("tune")
    if group is None or "_target_" not in group:
        return None
    return _instantiate(group)


def _instantiate(group: DictConfig):
    """Build a config group's `_target_` (already checked by schema.check), surfacing the
    dataclass' own ConfigError that Hydra wraps, so the message still names the key."""
    from hydra.utils import instantiate

    try:
        return instantiate(group, _convert_="all")
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def validate(cfg: DictConfig, model_config=None) -> list[Method]:
    """All cheap checks of a run config; returns the methods. Raises ConfigError / ModelNotFound.

    Reads no weights: the model's config.json (for its maximum positions; `model_config` when
    the caller already holds the model) and the calibration text are the most it touches.
    """
    from ciuic_lab.data.calibration import check_source
    from ciuic_lab.models.loader import load_config, resolve

    methods = build_methods(cfg)
    tune = build_tune(cfg)
    if tune is not None and not methods:
        raise ConfigError("tune: there is nothing to tune when every stage is none")
    gguf = cfg.model.get("gguf_file")
    if model_config is None:
        resolve(cfg.model.name_or_path, gguf)
        model_config = load_config(cfg.model.name_or_path, cfg.model.trust_remote_code,
                                   cfg.model.revision, gguf)
    ev = cfg.eval
    if ev.seqlen is not None and int(ev.seqlen) < 2:
        raise ConfigError(f"eval.seqlen: must be >= 2 or null, got {ev.seqlen}")
    if ev.max_windows is not None and int(ev.max_windows) < 1:
        raise ConfigError(f"eval.max_windows: must be >= 1 or null, got {ev.max_windows}")
    if ev.serve_memory and int(ev.serve_windows) < 1:
        raise ConfigError(f"eval.serve_windows: must be >= 1, got {ev.serve_windows}")
    for key in ("calib_samples", "calib_seqlen"):
        if int(cfg.data[key]) < 1:
            raise ConfigError(f"data.{key}: must be >= 1, got {cfg.data[key]}")
    # Positions beyond the model's trained range run silently with meaningless numbers.
    max_pos = getattr(model_config, "max_position_embeddings", None)
    for key, value in (("eval.seqlen", ev.seqlen), ("data.calib_seqlen", cfg.data.calib_seqlen)):
        if value is not None and max_pos is not None and int(value) > int(max_pos):
            raise ConfigError(f"{key}: {value} is beyond the model's max_position_embeddings "
                              f"({max_pos})")
    if cfg.compress.stream and cfg.compress.offload:
        raise ConfigError("compress.stream: streaming already keeps one block at a time; "
                          "drop compress.offload")
    if cfg.compress.stream and resolve(cfg.model.name_or_path)[0] == "random":
        raise ConfigError(f"compress.stream: {cfg.model.name_or_path} is built in memory and has "
                          "no checkpoint to stream from; save it (save_pretrained) and stream that "
                          "directory")
    if cfg.compress.stream and not methods:
        raise ConfigError("compress.stream: every stage is none, there is nothing to stream")
    if cfg.compress.activations not in ("auto", "device", "host", "disk"):
        raise ConfigError(f"compress.activations: must be auto, device, host or disk, got "
                          f"{cfg.compress.activations!r}")
    _check_distributed(cfg, tune)
    if int(cfg.compress.expert_chunk) < 1:
        raise ConfigError(f"compress.expert_chunk: must be >= 1, got {cfg.compress.expert_chunk}")
    if cfg.eval.stream not in ("auto", True, False):
        raise ConfigError(f"eval.stream: must be auto, true or false, got {cfg.eval.stream!r}")
    try:
        check_source(str(cfg.data.calib_source))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.calib_source: {e}") from None
    _check_rotate(cfg, model_config)
    if cfg.tracker.mode not in ("online", "offline", "disabled", "auto"):
        raise ConfigError(f"tracker.mode: must be online, offline, disabled or auto; got {cfg.tracker.mode!r}")
    return methods


def _check_distributed(cfg: DictConfig, tune) -> None:
    """`compress.distributed`'s value, and what a distributed run cannot do yet."""
    from ciuic_lab import dist

    if not dist.wanted(cfg.compress.distributed):  # raises on a bad value
        return
    if tune is not None:
        raise ConfigError("compress.distributed: tuning (tune=block|e2e|full) is not split "
                          "among processes yet; use tune=none, or run in one process "
                          "(without torchrun, or compress.distributed=false)")


def rotations_on(cfg: DictConfig) -> bool:
    r = cfg.get("rotate")
    return r is not None and bool(r.get("residual") or r.get("value_path") or r.get("online"))


def _check_rotate(cfg: DictConfig, model_config) -> None:
    from ciuic_lab.compress.rotate.fused import NO_RESIDUAL, RESIDUAL, VALUE_PATH
    from ciuic_lab.compress.rotate.online import ONLINE_SITES

    if not rotations_on(cfg):
        return
    r = cfg.rotate
    if r.residual not in (None, "hadamard", "random"):
        raise ConfigError(f"rotate.residual: must be null, hadamard or random, got {r.residual!r}")
    bad = [s for s in r.online if s not in ONLINE_SITES]
    if bad:
        raise ConfigError(f"rotate.online: unknown sites {bad}; choose from {list(ONLINE_SITES)}")
    mt = model_config.model_type
    if r.residual and mt in NO_RESIDUAL:
        raise ConfigError(f"rotate.residual: {mt} cannot have its residual stream rotated: "
                          f"{NO_RESIDUAL[mt]}. Use rotate.residual=null (rotate.value_path and "
                          f"rotate.online still apply)")
    if r.residual and mt not in RESIDUAL or r.value_path and mt not in VALUE_PATH:
        raise ConfigError(f"rotate: no rotation layout for model_type {mt!r} "
                          f"(compress/rotate/fused.py RESIDUAL knows {sorted(RESIDUAL)})")
    # A streamed run applies the fused rotations to each block as it loads and always writes a
    # checkpoint, which has no place for run-time rotation modules (below).
    if cfg.compress.stream and r.online:
        raise ConfigError("rotate.online: run-time rotations cannot be streamed (a streamed run "
                          "writes a checkpoint, which cannot hold them yet); use the fused "
                          "rotations only (rotate=hadamard) or compress.stream=false")
    # A checkpoint stores packed layers by name on the architecture's own skeleton, which has no
    # run-time rotation modules to load into.
    if r.online and cfg.get("save"):
        raise ConfigError("rotate.online: a model with run-time rotations cannot be saved yet; "
                          "use save=false, or only the fused rotations (rotate=hadamard)")


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
