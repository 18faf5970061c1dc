"""One rank of a big run, simulated in this process under torch's fake process group.

``python -m olmo2.train.simulate --config configs/olmo2-32b-stage1.yaml --world 64 [--shard_degree 8] [--rank 0] [--init]``

The fake backend (``torch.testing._internal.distributed.fake_pg``) answers every
collective at once without moving data, so one process can play rank ``rank``
of a ``world``-rank job. Here it runs the trainer's own model building
(:func:`olmo2.train.init.build_model`: meta, activation checkpointing, FSDP2
or HSDP through :func:`olmo2.train.parallel.parallelize`), the trainer's AdamW
(:func:`olmo2.train.optim.build_adamw`) with its state set up for every
parameter by one step on meta shards, the checkpoint's state dicts
(``get_model_state_dict`` / ``get_optimizer_state_dict``) and the local save
plan of ``torch.distributed.checkpoint`` (what this rank would write; nothing
is written). It reports this rank's bytes: parameters, optimizer states and
the save plan, all read from the sharded tensors themselves, beside the
planner's prediction (:func:`olmo2.train.planner.plan_memory`) for the same
rank: parameters (FSDP2's padded buffers) and AdamW state are equal to the byte.

With ``init`` the rank's shards are allocated on the CPU and initialized for
real (:func:`olmo2.train.init.init_parameters_`); the peak resident memory that
adds over the process before it (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) is measured. For 32B over 64 ranks that is about
2 GB and 10 s on one core of a loaded CPU; HSDP 8 x 8 would need 16 GB, so the
default leaves shards on meta.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch

from ..config import Olmo2Config, num_parameters
from ..model import Olmo2ForCausalLM
from .config import TrainConfig
from .init import build_model, init_parameters_

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def expected_shard_bytes(config: Olmo2Config, shards: int, shard_index: int, element_size: int = 4) -> int:
    """The bytes of shard ``shard_index`` of ``shards`` of every parameter, as FSDP2 cuts
    dim 0 (``torch.chunk``: ``ceil(rows / shards)`` rows per shard, the last ones
    shorter or empty), computed from the parameter shapes alone."""
    model = Olmo2ForCausalLM.from_config(config, device="meta")
    total = 0
    for param in model.parameters():
        rows = param.shape[0]
        per = math.ceil(rows / shards)
        mine = max(0, min(rows, (shard_index + 1) * per) - shard_index * per)
        total += mine * math.prod(param.shape[1:]) * element_size
    return total


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _fsdp_storage_bytes(model: torch.nn.Module) -> int | None:
    """The bytes of FSDP2's sharded parameter buffers (each local shard padded to
    ``ceil(rows / shards)`` rows), read from FSDP2's own state; None when this torch
    does not expose it."""
    total, found = 0, False
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", None) if get_state is not None else None
        for fsdp_param in getattr(group, "fsdp_params", None) or ():
            data = getattr(fsdp_param, "_sharded_param_data", None)
            if data is None:
                return None
            total += data.numel() * data.element_size()
            found = True
    return total if found else None


def expected_coordinate(rank: int, mesh: tuple[int, ...]) -> tuple[int, ...]:
    return (rank,) if len(mesh) == 1 else (rank // mesh[1], rank % mesh[1])


def simulate(cfg: TrainConfig, world: int, shard_degree: int | None = None, rank: int = 0,
             init: bool = False) -> dict[str, Any]:
    """Play rank ``rank`` of ``world`` for the training config ``cfg`` (see the module
    docstring; ``shard_degree`` default ``cfg.parallel.shard_degree``); returns the
    measured figures, with the planner's (:func:`olmo2.train.planner.plan_memory`)
    beside them.

    Initializes the fake default process group and destroys it before returning;
    the process must not be in another one.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .checkpoint import _train_state_dicts
    from .optim import build_adamw
    from .parallel import check_shard_degree, fsdp_mesh_shape
    from .planner import plan_memory

    if shard_degree is None:
        shard_degree = cfg.parallel.shard_degree
    if world < 1:
        raise ValueError(f"simulate: --world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"simulate: rank must be in [0, {world}), got {rank}")
    check_shard_degree(shard_degree, world, "fsdp")
    if dist.is_initialized():
        raise RuntimeError("simulate: this process is already in a process group")
    config, par = cfg.model, cfg.parallel
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        mesh = fsdp_mesh_shape(world, shard_degree)
        shards = mesh[-1]
        out: dict[str, Any] = {"run_name": cfg.run_name, "world": world, "shard_degree": shards, "mesh": list(mesh), "rank": rank,
                               "shard_index": rank % shards, "parameters": num_parameters(config),
                               "activation_checkpointing": par.activation_checkpointing}
        start = time.perf_counter()
        sharded = build_model(config, "fsdp", torch.device("cpu"), "fp32", cfg.seed,
                              activation_checkpointing=par.activation_checkpointing, shard_degree=shard_degree,
                              materialize=False)
        out["build_seconds"] = time.perf_counter() - start
        first = next(sharded.parameters())
        if tuple(first.device_mesh.get_coordinate()) != expected_coordinate(rank, mesh):
            # DTensor reuses an equal mesh made under an earlier fake group in this process.
            raise RuntimeError(f"simulate: the sharded model sits at mesh coordinate "
                               f"{first.device_mesh.get_coordinate()}, not rank {rank}'s; simulate one "
                               "mesh shape per process")
        out["param_bytes"] = _local_bytes(sharded.parameters())
        out["param_storage_bytes"] = _fsdp_storage_bytes(sharded)
        out["expected_param_bytes"] = expected_shard_bytes(config, shards, rank % shards)

        if init:
            before_kib = _status_kib("VmRSS")
            reset = _reset_peak_rss()
            start = time.perf_counter()
            sharded.to_empty(device="cpu")
            elements = init_parameters_(sharded, cfg.seed)
            out["init_seconds"] = time.perf_counter() - start  # one thread (see olmo2.train.init)
            peak_kib = _status_kib("VmHWM")
            out["init_elements"] = elements
            if before_kib is not None and peak_kib is not None:
                out["init_peak_rss_bytes"] = (peak_kib - before_kib) * 1024
                out["peak_rss_reset"] = reset  # False: VmHWM may include an earlier peak (an upper bound)
            sharded.to_empty(device="meta")  # give the memory back before the optimizer on meta

        optimizer = build_adamw(sharded, lr=1e-4, fused=False)
        start = time.perf_counter()
        state = _train_state_dicts(sharded, optimizer)  # sets up AdamW's state: one step on zero gradients
        out["optimizer_seconds"] = time.perf_counter() - start
        moments = [value for per_param in optimizer.state.values() for key, value in per_param.items()
                   if key != "step"]
        steps = [per_param["step"] for per_param in optimizer.state.values() if "step" in per_param]
        out["optimizer_tensors"] = sorted({key for per_param in optimizer.state.values() for key in per_param})
        out["optimizer_bytes"] = _local_bytes(moments) + _local_bytes(steps)

        planner = DefaultSavePlanner()
        planner.set_up_planner(state, is_coordinator=rank == 0)
        plan = planner.create_local_plan()
        out["checkpoint_plan_items"] = len(plan.items)
        out["checkpoint_plan_bytes"] = sum(math.prod(item.tensor_data.chunk.sizes)
                                           * item.tensor_data.properties.dtype.itemsize
                                           for item in plan.items if item.tensor_data is not None)
        predicted = plan_memory(cfg, world_size=world, shard_degree=shard_degree, gpu="h100", rank=rank)
        out["planner_param_bytes"] = predicted.parameters
        out["planner_optimizer_bytes"] = predicted.optimizer
        return out
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m olmo2.train.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a training config YAML (configs/olmo2-32b-stage1.yaml, ...)")
    parser.add_argument("--preset", default=None, help="a training preset (olmo2-7b, olmo2-13b, ...)")
    parser.add_argument("--world", type=int, default=64, help="ranks in the simulated job (default 64)")
    parser.add_argument("--shard_degree", type=int, default=None,
                        help="HSDP shard group size (default: the config's parallel.shard_degree, else all ranks)")
    parser.add_argument("--rank", type=int, default=0, help="the rank to play (default 0)")
    parser.add_argument("--init", action="store_true", help="allocate and initialize this rank's shards for real")
    args, overrides = parser.parse_known_args(argv)  # the rest: --key=value config overrides
    from .config import resolve

    try:
        cfg = resolve(args.config, overrides, preset=args.preset)
        result = simulate(cfg, args.world, args.shard_degree, args.rank, init=args.init)
    except ValueError as exc:  # a bad config, rank or shard degree: one line, exit 2
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
