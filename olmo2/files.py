"""Writing files so that a reader sees the old content or the new, never a mix.

:func:`atomic_write` is the one way files are written in ``olmo2`` (configs,
checkpoint metadata, ``latest`` pointers, token files, tokenizers, copies):
a temporary file in the same folder, flushed and fsynced, then renamed over
the target; on an error the temporary file is removed and the target is left
as it was. Folders of many files (checkpoints) are written the same way one
level up: into a temporary folder that is then renamed.

:func:`file_digests` checksums files (the checkpoint manifests): sha256 from
``hashlib``, several files at once in threads (``hashlib`` releases the GIL on
large buffers). Measured on this project's 2-core machine (an Intel Xeon with
the SHA extensions, one core, a 512 MiB file in the page cache, the machine
shared, load average about 4): sha256 470-510 MB/s, blake2b 380-405 MB/s, md5
about 300 MB/s; hence sha256, about 2 s per GB per core.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Iterable, Iterator

HASH_NAME = "sha256"
_CHUNK = 8 << 20


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
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from exc  # say which file
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


def file_digest(path: str | os.PathLike) -> str:
    """The :data:`HASH_NAME` hex digest of a file, read in 8 MiB chunks."""
    digest = hashlib.new(HASH_NAME)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(paths: Iterable[str | os.PathLike], threads: int | None = None) -> list[str]:
    """:func:`file_digest` of each path, in order, hashed in up to ``threads`` threads
    (default: the CPU count, at most 8)."""
    paths = list(paths)
    workers = max(1, min(threads or min(os.cpu_count() or 1, 8), len(paths) or 1))
    if workers == 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(file_digest, paths))


def disk_full_error(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """``OSError(ENOSPC, "no space left on device", path)`` when ``exc`` (or what it
    wraps) is a full disk, else None.

    ``torch.save`` reports a short write as ``RuntimeError: [enforce fail at
    inline_container.cc] . unexpected pos ...`` with no errno; that is taken for
    a full disk when the file system has under 1% or 256 MiB free.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return OSError(errno.ENOSPC, "no space left on device", os.fspath(exc.filename or path))
        text = str(exc)
        if "No space left on device" in text:
            return OSError(errno.ENOSPC, "no space left on device", os.fspath(path))
        if "unexpected pos" in text and _nearly_full(path):
            return OSError(errno.ENOSPC, "no space left on device", os.fspath(path))
        exc = exc.__cause__ or exc.__context__
    return None


def _nearly_full(path: str | os.PathLike) -> bool:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return False
    return usage.free < max(256 << 20, usage.total // 100)
