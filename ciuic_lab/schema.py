"""What a run config may hold and name: checked before anything in it is instantiated or loaded.

Keys: the schema is the lab's own conf/ files. A group's keys are the union of what its options
set (their `defaults` includes followed); a stage or rotation that names a `_target_` takes that
callable's parameters instead (a method's knobs are its dataclass fields), so a contributor's
method brings its own. A typo (`+compress.strem=true`) fails naming its key instead of being
silently ignored.

Callables: Hydra's `instantiate` calls whatever a `_target_` names, so a config (a command line,
a study YAML, a sweep's search space) could otherwise call any importable function with any
arguments. Only the lab's own callables are let through: a stage's method (a `Method` subclass
of that stage, the lab's or a contributor's, see README CONTRIBUTING) and the rotations and
tuning passes its conf/rotate and conf/tune files name. A `_target_` anywhere else in the tree is refused.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ciuic_lab.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("prune", "lowrank", "quant")
# each lands under its own name
GROUPS = ("model", "data", "eval", "tracker", "rotate", "tune", *STAGES)
# Hydra's own node (launcher, sweeper, callbacks) is instantiated by Hydra before a job starts;
# the job cannot guard it, and the lab's code never instantiates it.
HYDRA = "hydra"
# Top-level keys no conf/ file sets but the code reads: `+force=true` (job.py: recompute a
# finished job), `+objectives=[...]` (run.py: what a multi-objective sweep minimises).
OPTIONAL = ("force", "objectives", HYDRA)
# Groups whose options are global deltas (`@package _global_`): only an empty option (recipe=none)
# leaves a node under the group's name, and it must stay empty.
GLOBAL_GROUPS = ("recipe", "experiment")


def check(cfg: DictConfig) -> None:
    """Callables first: resolving a stage's knobs imports its method."""
    job = tree(cfg)
    check_targets(job)
    check_keys(job)


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
    elif owner in ("rotate", "tune"):
        if target not in lab_targets(owner):
            raise ConfigError(f"{owner}._target_: {target!r} is not one of the lab's own "
                              f"({', '.join(sorted(lab_targets(owner)))})")
    else:
        where = f"{owner}._target_" if owner else "_target_"
        raise ConfigError(f"{where}: only a stage ({', '.join(STAGES)}), rotate or tune may "
                          f"name a callable; refusing {target!r}")


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


def check_keys(node: dict) -> None:
    """Every key is one the schema knows (top level, each group, nested groups like eval.lm_eval)."""
    schema = {**_file_keys(CONF_DIR / "run.yaml"), **dict.fromkeys(OPTIONAL),
              **{g: {} for g in GLOBAL_GROUPS}}
    for key, value in node.items():
        if key in GROUPS:
            _check_group(key, value)
        elif key not in schema:
            raise _unknown(str(key), key, [*schema, *GROUPS])
        else:
            _check_nested(value, schema[key], str(key))


def _check_group(group: str, node) -> None:
    if not isinstance(node, dict):
        return
    if "_target_" not in node:  # a stage set to none still holds what a recipe set for it
        _check_nested(node, group_schema(group), group)
        return
    params = _parameters(group, node["_target_"])
    if params is None:  # takes **kwargs: any knob is its own business
        return
    # Hydra's special keys (`_partial_` for a rotation) only as the lab's own files use them.
    allowed = {k for k in group_schema(group) if k.startswith("_")} | params
    for key in node:
        if key not in allowed:
            hint = " (if the recipe set it, add recipe=none)" if group in STAGES else ""
            raise _unknown(f"{group}.{key}", key, allowed,
                           f"unknown key for {node['_target_']}{hint}")


def _parameters(group: str, target: str) -> set[str] | None:
    from hydra._internal.utils import _locate

    fn = method_class(group, target) if group in STAGES else _locate(target)
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _check_nested(node, schema, path: str) -> None:
    if not isinstance(node, dict) or not isinstance(schema, dict):
        return  # a leaf, or a free mapping (per-layer overrides, kind_bits)
    for key, value in node.items():
        here = f"{path}.{key}"
        if key not in schema:
            raise _unknown(here, key, schema)
        _check_nested(value, schema[key], here)


def _unknown(path: str, key, known, what: str = "unknown key") -> ConfigError:
    names = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = (f"; did you mean {close[0]!r}?" if close else
            f"; known here: {', '.join(names)}" if names else "; nothing may be set here")
    return ConfigError(f"{path}: {what}{hint}")


@functools.cache
def group_schema(group: str) -> dict:
    """The keys any of the lab's conf/<group> options sets, nested as they nest."""
    schema: dict = {}
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        _merge(schema, _file_keys(path))
    return schema


def _file_keys(path: Path) -> dict:
    """{key: nested keys (a dict) or None (a leaf)} of one YAML, with the files it includes
    from its own group (`defaults: [_common]`)."""
    body = yaml.safe_load(path.read_text()) or {}
    out: dict = {}
    for entry in body.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_":
            _merge(out, _file_keys(path.with_name(f"{entry}.yaml")))
    _merge(out, _shape(body))
    return out


def _shape(value):
    return {k: _shape(v) for k, v in value.items()} if isinstance(value, dict) else None


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if key not in into:
            into[key] = value
        elif isinstance(into[key], dict) and isinstance(value, dict):
            _merge(into[key], value)
        elif into[key] != value:
            into[key] = None  # a mapping in one option, a scalar in another: leave it free
