"""Files written whole or not at all: a crash or a full disk mid-write never leaves a truncated result."""
from __future__ import annotations

import os
import tempfile
from typing import IO, Callable

__all__ = ["atomic_write"]


def _file_mode(path: str) -> int:
    """The replaced file's permissions, or what ``open`` would give a new file (mkstemp's are owner-only)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    The rename is atomic on POSIX and Windows, so ``path`` holds either its old
    content or the complete new one; the temporary file is removed on failure.
    """
    directory = os.path.dirname(os.path.abspath(path))
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
