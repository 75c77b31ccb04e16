"""Layer-name patterns: dotted parts, each a shell glob, matching a contiguous run of a name.

`layers.0` matches block 0 but not block 10; `mlp.experts.*` every routed expert; `down_proj`
every down projection. Used by per-layer overrides (`<stage>.layers`) and anywhere else a user
names layers. This form works on the Hydra command line, where quoted regex keys do not parse.
"""

from __future__ import annotations

from fnmatch import fnmatchcase


def pattern_parts(pattern) -> list[str]:
    return [p for p in str(pattern).split(".") if p]


def name_matches(pattern: str, name: str) -> bool:
    """Whether the dotted parts of `pattern` (globs) match a contiguous run of `name`'s parts."""
    pat, parts = pattern_parts(pattern), name.split(".")
    return any(all(fnmatchcase(parts[i + j], p) for j, p in enumerate(pat))
               for i in range(len(parts) - len(pat) + 1))
