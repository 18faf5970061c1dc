"""The edge of every command: expected failures as one line, ``<prog>: <what> (<path>)``, exit 2.

Expected failures are what a user can cause and fix: a bad config value or
file, missing or malformed data, a damaged checkpoint, a locked run folder, a
full disk, an unavailable device or kernel backend, training that went
non-finite. Anything else is a bug and keeps its traceback. ``OLMO2_DEBUG=1``
or ``--debug`` shows the traceback of the expected ones too.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from typing import Callable, Sequence

from olmo2_kernels import BackendUnavailableError

EXIT_ERROR = 2
DEBUG_FLAG = "--debug"

# What a user can cause and fix (the messages name what and where).
EXPECTED: tuple[type[BaseException], ...] = (OSError, ValueError, BackendUnavailableError, ImportError)


def expected_errors() -> tuple[type[BaseException], ...]:
    """:data:`EXPECTED` plus the trainer's own (imported here so the light commands stay light),
    and FloatingPointError: olmo2-sft, olmo2-dpo and olmo2-rl stop a diverged run with it."""
    from ..train.checkpoint import CheckpointError
    from ..train.runlock import RunLockedError
    from ..train.stability import NonFiniteLossError, NonFiniteStateError

    return EXPECTED + (CheckpointError, RunLockedError, NonFiniteLossError, NonFiniteStateError, FloatingPointError)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    return os.environ.get("OLMO2_DEBUG", "") not in ("", "0") or DEBUG_FLAG in (argv or ())


def one_line(exc: BaseException, prog: str) -> str:
    """The message of ``exc`` as one line, without a repeated ``prog:`` prefix."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on device ({exc.filename or '?'})"
    if isinstance(exc, json.JSONDecodeError):
        text = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror[0].lower()}{exc.strerror[1:]} ({exc.filename})"
    else:
        text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = "; ".join(lines)
    while text.startswith(f"{prog}: "):
        text = text[len(prog) + 2:]
    return text


def report(prog: str, exc: BaseException, debug: bool) -> int:
    """Print ``exc`` as ``prog: message`` (with the traceback first when ``debug``); return 2."""
    if debug:
        traceback.print_exception(exc)
    print(f"{prog}: {one_line(exc, prog)}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def run(prog: str, body: Callable[[], int], argv: Sequence[str] | None = None,
        expected: tuple[type[BaseException], ...] | None = None) -> int:
    """``body()``, its expected failures turned into one line and exit 2, Ctrl-C into exit 130."""
    debug = debug_requested(argv)
    try:
        return body()
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130
    except (expected or EXPECTED) as exc:
        return report(prog, exc, debug)
