"""The lab's error types, shared by every layer of the code (and imported by none of them back).

Each names what is wrong and where (a config key, a layer, a file), so the message alone says
what to change. They are raised before expensive work wherever the problem can be known then.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value, named by its key (raised before any expensive work)."""


class ModelNotFound(FileNotFoundError):
    """`model.name_or_path` (or a fetchable model) that cannot be resolved to weights."""


class UnsupportedModel(ValueError):
    """An architecture no adapter knows."""


class CheckpointError(ValueError):
    """A checkpoint (ours, or a source checkpoint being streamed) that cannot be used as it is."""


class JobLocked(RuntimeError):
    """A job directory another live run is writing (named, with that run's pid when known)."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError('<key>: <msg>') unless `cond`."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_positive_ints(obj, names, group: str) -> None:
    """Each of `obj`'s attributes `names` is a positive integer (a bool is not), else
    ConfigError naming `<group>.<name>`."""
    for name in names:
        value = getattr(obj, name)
        check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
              f"{group}.{name}", f"must be a positive integer, got {value!r}")
