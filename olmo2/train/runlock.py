"""One run per run folder: an advisory lock on ``<run_dir>/.lock``.

:class:`RunLock` takes ``fcntl.flock`` on the lock file (exclusive, without
waiting) and writes who holds it: host, pid and start time. The kernel drops a
flock when its process dies, however it dies, so a lock can only be "stale" in
what the file says: a run killed with SIGKILL leaves its host and pid behind,
and the next run takes the lock over saying whose it was. A live holder makes
the next run refuse with one line naming it (:class:`RunLockedError`). On file
systems without flock (some network mounts answer ENOLCK or EOPNOTSUPP) the
file's content decides: a live pid on this host holds the run, a dead one is
taken over.

A clean release empties the file (still holding the lock), then unlocks; the
file itself stays, so two runs never race on creating and deleting it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}"


class RunLock:
    """``with RunLock(run_dir): ...`` or :meth:`acquire` / :meth:`release`."""

    def __init__(self, run_dir: str | os.PathLike, log: Callable[[str], None] = print) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.log = log
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 4096):
            raw += chunk
        try:
            holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            holder = self._lock(fd)
            host = socket.gethostname()
            if holder.get("pid") is not None and holder.get("pid") != os.getpid():
                dead = holder.get("host") == host and isinstance(holder["pid"], int) and not _alive(holder["pid"])
                state = "which is no longer running" if dead else "which no longer holds it"
                self.log(f"taking over the lock of {self.run_dir} left by {_describe(holder)}, {state} ({self.path})")
            record = json.dumps({"host": host, "pid": os.getpid(), "started": time.time()}).encode()
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, record + b"\n")
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _lock(self, fd: int) -> dict:
        """Take the flock (or decide from the content where flock is unsupported);
        return what the file said before."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refusal(self._read(fd)) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            holder = self._read(fd)
            pid = holder.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and holder.get("host") == socket.gethostname() \
                    and _alive(pid):
                raise self._refusal(holder) from None
            return holder
        return self._read(fd)

    def _refusal(self, holder: dict) -> RunLockedError:
        who = _describe(holder) if holder else "another process"
        return RunLockedError(f"run folder {self.run_dir} is in use by {who}; wait for it to finish or stop it, "
                              f"or use another run_name ({self.path})")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
