"""What the multi-rank CPU tests share: a free TCP port for the rendezvous, a
spawn that fails instead of hanging, and the record of how a rank left its
process group (whether ``destroy_distributed`` released the default group and
joined its gloo threads, counted in ``/proc/self/task``: Linux, where the suite
runs). A gloo thread still dropping a collective's tensors when the interpreter
shuts down aborts the process (see ``olmo2.train.parallel.destroy_distributed``)."""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, world: int, port: int, timeout_s: float = 300) -> None:
    """Join a ``world``-rank gloo group on ``port`` as torchrun would start ``rank`` (its
    environment variables set, one thread)."""
    import datetime

    import torch
    import torch.distributed as dist

    from olmo2.train.parallel import import_group_default_binders

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import_group_default_binders()  # or ten default arguments hold the group: see its docstring
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def leave_and_record(path: str, leave: Callable[[], bool] | None = None) -> bool:
    """Run ``leave`` (default ``destroy_distributed``) and write to ``path`` whether it
    released the group and how many threads ended with it; returns what ``leave`` did."""
    if leave is None:
        from olmo2.train.parallel import destroy_distributed as leave
    threads = len(os.listdir("/proc/self/task"))
    released = leave()
    with open(path, "w") as f:
        json.dump({"released": released, "threads_joined": threads - len(os.listdir("/proc/self/task"))}, f)
    return released


def assert_released(prefix, world: int = 2) -> None:
    """Each rank's record (``<prefix><rank>.json``, by :func:`leave_and_record`): the default
    group released and its gloo threads joined."""
    for rank in range(world):
        with open(f"{prefix}{rank}.json") as f:
            teardown = json.load(f)
        assert teardown["released"] is True and teardown["threads_joined"] > 0, (rank, teardown)


def spawn_with_deadline(fn, args: tuple, nprocs: int, deadline_s: float) -> None:
    """``torch.multiprocessing.spawn`` joined with a deadline: ranks still running after
    ``deadline_s`` are killed and the test fails (a rank waiting for another, not a hang)."""
    import torch.multiprocessing as mp

    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} ranks did not finish within {deadline_s} s (a rank waiting for another?)")
