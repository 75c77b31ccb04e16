"""What a run config may name: checked before anything in it is instantiated or loaded.

Hydra's `instantiate` calls whatever a `_target_` names, so a config (a command line, a study
YAML, a sweep's search space) could otherwise call any importable function with any arguments.
Only the lab's own callables are let through: a stage's method (a `Method` subclass of that
stage, the lab's or a contributor's, see README CONTRIBUTING) and the rotations its conf/rotate
files name. A `_target_` anywhere else in the tree is refused.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ciuic_lab.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("prune", "lowrank", "quant")
# Hydra's own node (launcher, sweeper, callbacks) is instantiated by Hydra before a job starts;
# the job cannot guard it, and the lab's code never instantiates it.
HYDRA = "hydra"


def tree(cfg: DictConfig) -> dict:
    """The config as plain containers, without Hydra's node (interpolations resolved if they
    can be: an unresolvable one fails later, naming its own key)."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != HYDRA])
    try:
        return OmegaConf.to_container(job, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(job, resolve=False)


def check_targets(node: dict, path: str = "") -> None:
    """Every `_target_` in the tree (nested ones too: instantiate is recursive) is the lab's."""
    for key, value in node.items():
        here = f"{path}.{key}" if path else str(key)
        if key == "_target_":
            _check_target(path, value)
        elif isinstance(value, dict):
            check_targets(value, here)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    check_targets(item, f"{here}[{i}]")


def _check_target(owner: str, target) -> None:
    if owner in STAGES:
        method_class(owner, target)
    elif owner == "rotate":
        if target not in lab_targets("rotate"):
            raise ConfigError(f"rotate._target_: {target!r} is not one of the lab's rotations "
                              f"({', '.join(sorted(lab_targets('rotate')))})")
    else:
        where = f"{owner}._target_" if owner else "_target_"
        raise ConfigError(f"{where}: only a stage ({', '.join(STAGES)}) or rotate may name a "
                          f"callable; refusing {target!r}")


def method_class(stage: str, target) -> type:
    """The Method subclass `target` names, imported; ConfigError if it is anything else."""
    # Hydra's own resolver, as instantiate uses it (get_object would also log the failure).
    from hydra._internal.utils import _locate

    from ciuic_lab.compress.base import Method

    key = f"{stage}._target_"
    # The standard library holds no method, and importing some of it does things (antigravity).
    if not isinstance(target, str) or target.split(".")[0] in (*sys.stdlib_module_names,
                                                                 "builtins"):
        raise ConfigError(f"{key}: {target!r} is not a {stage} method")
    try:
        obj = _locate(target)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot import {target!r} ({' '.join(str(e).split())})") from None
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise ConfigError(f"{key}: {target!r} is not a {stage} method (a subclass of "
                          "ciuic_lab.compress.base.Method)")
    if obj.stage != stage:
        raise ConfigError(f"{stage}: {target} is a {obj.stage} method, not a {stage} method")
    return obj


@functools.cache
def lab_targets(group: str) -> frozenset[str]:
    """The `_target_`s the lab's own conf/<group>/*.yaml files name."""
    found = set()
    for path in (CONF_DIR / group).glob("*.yaml"):
        body = yaml.safe_load(path.read_text()) or {}
        if isinstance(body.get("_target_"), str):
            found.add(body["_target_"])
    return frozenset(found)
