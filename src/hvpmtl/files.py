"""Writing files whole: :func:`atomic_write` and the :class:`DiskFullError` it raises.

Below every other layer (data, backbones, engine, eval and viz all write through it), so that a
crash or a full disk never leaves a half-written file where a complete one was.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["DiskFullError", "atomic_write", "is_disk_full"]


class DiskFullError(OSError):
    """A write failed because the disk is full (ENOSPC); the previous file, if any, is kept."""

    def __str__(self) -> str:
        return str(self.strerror)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], opener: Callable[..., IO[bytes]] = open) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path``.

    ``opener(tmp_path, "wb")`` opens the temporary file. A full disk raises :class:`DiskFullError`
    naming ``path``; the temporary file never stays behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with opener(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        if is_disk_full(err):
            kept = "the previous file is kept" if path.exists() else "nothing was written"
            raise DiskFullError(errno.ENOSPC, f"disk full (ENOSPC) while writing {path}; {kept}") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ENOSPC (or a full quota) is behind ``err``; torch.save buries it under its own error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False
