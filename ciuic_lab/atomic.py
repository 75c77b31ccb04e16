"""Files and directories that appear whole or not at all.

    write_atomic(path, lambda f: json.dump(record, f))   # a reader never sees half a file
    tmp = temp_dir_beside(dst); ...fill tmp...; swap_in_dir(tmp, dst)

Everything is built beside its destination (same directory, so same file system: the final
os.replace / rename is atomic) and only then renamed over it, so a process killed mid-way leaves
the previous version intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Replace `path` with what `write(f)` writes to a fresh file, all of it or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        _umask_mode(Path(tmp), 0o666)  # mkstemp makes it private; a result is not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text))


def temp_dir_beside(dst: str | Path) -> Path:
    """A new empty directory next to `dst`, to be filled and then swapped in with swap_in_dir.
    Leftovers of killed processes (their pid is in the name) are removed first, since a crashed
    checkpoint or conversion can be gigabytes."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(dst)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(dst) + _owner(), dir=dst.parent))
    _umask_mode(tmp, 0o777)  # it becomes dst: as readable as a plain mkdir would make it
    return tmp


def swap_in_dir(new: str | Path, dst: str | Path) -> Path:
    """Put the finished directory `new` at `dst`, replacing what was there.

    The old directory is renamed away before the new one is renamed in and deleted only after, so
    at every instant `dst` is either the complete old or the complete new one (or, for the moment
    between the two renames, absent: never a mixture)."""
    new, dst = Path(new), Path(dst)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{_prefix(dst)}{_owner()}old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
    os.rename(new, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def _prefix(dst: Path) -> str:
    return f".{dst.name}.tmp-"


def _owner() -> str:
    # The host too: on a file system shared by several machines a pid means nothing elsewhere.
    return f"{os.getpid()}@{socket.gethostname()}@"


def _remove_orphans(dst: Path) -> None:
    for p in dst.parent.glob(f"{_prefix(dst)}*@*@*"):
        pid, host, _ = p.name[len(_prefix(dst)):].split("@", 2)
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _umask_mode(p: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    p.chmod(mode & ~umask)


def _fsync_dir(d: Path) -> None:
    """Make a rename durable; some file systems cannot open a directory, and lose nothing else."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
