"""Writing files so that a reader sees the old content or the new, never a mix.

:func:`atomic_write` is the one way files are written in ``olmo2`` (configs,
checkpoint metadata, ``latest`` pointers, token files, tokenizers, copies):
a temporary file in the same folder, flushed and fsynced, then renamed over
the target; on an error the temporary file is removed and the target is left
as it was. Folders of many files (checkpoints) are written the same way one
level up: into a temporary folder that is then renamed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` appears complete or not at all.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (bytes). The temporary file sits next
    to ``path`` (same file system, so the rename is atomic) and is fsynced
    before the rename, and the folder after it.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file ``src`` to ``dst`` through :func:`atomic_write`."""
    with open(src, "rb") as source, atomic_write(dst, "wb") as target:
        shutil.copyfileobj(source, target)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a folder's entries (a rename inside it); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
