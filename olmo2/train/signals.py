"""Graceful stop: SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) finish
the current step, save a checkpoint and stop; a second signal stops at once.

:class:`GracefulStop` installs the handlers (in the main thread) for as long as
it is entered. The first signal only sets :attr:`GracefulStop.signum`; the
trainer looks at it after each step (with several ranks the flag travels in
the step's one all-reduce, so every rank stops after the same step), saves, and
raises :class:`TrainingStopped`. A second signal raises :class:`StopNow` from
wherever the program is (a save in progress is abandoned; its temporary folder
is never mistaken for a checkpoint). Either way ``olmo2-train`` exits with
``128 + signal number``: 130 for SIGINT, 143 for SIGTERM (:data:`EXIT_CODES`),
after one line saying what was saved.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopNow(BaseException):
    """A second signal: stop at once (a BaseException, so nothing on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class TrainingStopped(Exception):
    """The run stopped on a signal after a step; ``checkpoint`` is what it saved (or None)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, note: str = ""):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        saved = f"checkpoint {checkpoint} saved" if checkpoint else f"nothing saved{note}"
        super().__init__(f"stopped by {signal_name(signum)} after step {step}; {saved}; "
                         "run the same command again to continue")


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class GracefulStop:
    """``with GracefulStop() as stop: ...``; ``stop.signum`` is the first signal received, or None."""

    def __init__(self, log: Callable[[str], None] = _stderr, prog: str = "olmo2-train") -> None:
        self.log = log
        self.prog = prog
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self.log(f"{self.prog}: {signal_name(signum)} received: finishing this step, then saving a checkpoint "
                     f"and stopping (send it again to stop at once)")
            return
        raise StopNow(signum)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
