"""Process groups and parallelism, applied to the model from outside.

:func:`parallelize` wraps the blocks of ``model.model.layers`` in this order
(torchtitan's): activation checkpointing, ``torch.compile``, then FSDP2
(``fully_shard`` per block, then the root) or DDP. The model's own code does
not change, and its state-dict names stay clean (the checkpoint code reads
them through ``torch.distributed.checkpoint.state_dict``).

FSDP2 shards over every rank by default; with ``parallel.shard_degree = k``
(HSDP) it shards within groups of k consecutive ranks (a node, say) and
replicates across the world / k groups: a 2-D mesh ("replicate", "shard"),
given to ``fully_shard``, which then all-gathers and reduce-scatters within a
group and all-reduces gradients across groups. Every rank is still one
data-parallel rank (its own slice of the batch).

Precision on GPU is bf16: with FSDP2 through its ``MixedPrecisionPolicy``
(bf16 parameters in compute, fp32 master weights and gradient reduction),
otherwise through ``torch.autocast``. On CPU everything is fp32.

Launch with ``torchrun --nproc_per_node=N -m olmo2.train ...``: NCCL on GPU
(one device per local rank), gloo on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")


def runtime_problem(device: str, kernel_backend: str = "auto") -> str | None:
    """Why this machine cannot run on ``device`` with ``kernel_backend``, or None
    (checked by ``olmo2-train`` before training, ``--dry-run`` included)."""
    if device == "cuda" and not torch.cuda.is_available():
        return (f"device=cuda but this machine has no usable CUDA device (torch {torch.__version__}, "
                "torch.cuda.is_available() is False); use --device=cpu or auto")
    if kernel_backend == "auto":
        return None
    import olmo2_kernels

    device_type = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    info = olmo2_kernels.backend_info()["backends"].get(kernel_backend)
    reason = None if info is None else info["unavailable_reason"].get(device_type)
    if reason:
        return f"kernel_backend={kernel_backend} cannot run on {device_type}: {reason}"
    return None


def init_distributed(device: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); a single process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        import_group_default_binders()
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def import_group_default_binders() -> None:
    """Import, before the process group exists, the torch modules that bind it at import.

    ``torch.distributed.nn.functional`` spells its defaults ``group=group.WORLD``,
    evaluated once, when the module is first imported. torch imports it lazily (its
    first use of dynamo imports FSDP1 and sharded tensors, which import it: building a
    model on the meta device does). Imported after ``init_process_group``, ten function
    defaults hold the default group for the life of the process, so
    :func:`destroy_distributed` could not release it (measured with torch 2.13).
    """
    import torch.distributed.nn  # noqa: F401


def destroy_distributed() -> bool:
    """Leave the process group and release it now; True when it was released.

    Releasing the group matters on gloo: each collective runs on a worker thread,
    which wakes the caller and only then drops its reference to the collective's
    tensors, and that last reference takes the GIL. If the interpreter has begun to
    shut down by then, Python ends the thread inside a C++ destructor and the process
    dies by SIGABRT ("terminate called without an active exception"), which
    ``torchrun`` reports as a failed rank, after a run that did its work. The group's
    destructor joins those threads (with the GIL released), so once it has run no
    thread is left to race the exit. It runs here if nothing else holds the group:
    ``destroy_process_group`` forgets it, the collections let go of models (module
    hooks are reference cycles) that no one uses any more, and DTensor's caches,
    which keep the device mesh of every FSDP2 parameter (see
    :func:`drop_dtensor_caches`), are emptied. A group that is still held (an FSDP2
    model alive) is left to the exit: False.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return True
    try:
        group = weakref.ref(dist.group.WORLD)
    except TypeError:  # a torch whose ProcessGroup takes no weak references: released or not, unknown
        group = None
    gc.collect()
    drop_dtensor_caches()
    dist.destroy_process_group()
    gc.collect()
    return group is not None and group() is None


def drop_dtensor_caches() -> None:
    """Empty DTensor's caches, which hold the device meshes and so the process groups.

    DTensor caches its sharding decisions, redistribution plans and mesh topologies,
    keyed by the arguments' specs or meshes; a spec holds its ``DeviceMesh``, and the
    mesh its process groups. Every FSDP2 parameter is a DTensor (making its
    ``nn.Parameter`` alone runs ``detach``), so after any FSDP2 run these caches keep
    the mesh, and with it the default group, alive after the model is gone. One is in
    C++ (torch 2.13's dispatch fast path), out of the garbage collector's sight; the
    rest are ``functools`` caches at module level, on methods, and one per operator
    strategy in closures. Measured with torch 2.13: an FSDP2 Olmo2 is freed when
    dropped (with or without a training step), and the default group is released
    once these are emptied, not before. torch names no public way to empty them; the
    private ones used are looked up and skipped where a torch lacks them. Emptying
    costs the next DTensor operators a fresh propagation, nothing else.
    """
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor was ever made
        return
    try:
        from torch.distributed.tensor import debug
    except ImportError:
        return
    clear = getattr(debug, "_clear_sharding_prop_cache", None)  # torch 2.13: the Python and C++ caches
    if clear is not None:
        clear()
    redistribute = sys.modules.get("torch.distributed.tensor._redistribute")
    clear = getattr(redistribute, "clear_redistribute_planner_cache", None)  # torch 2.13: planners
    if clear is not None:
        clear()
    import functools

    cache_type = functools._lru_cache_wrapper  # the type of every lru_cache and cache (CPython 3.5+)
    for obj in gc.get_objects():  # every functools cache that DTensor's modules made
        # type(), not isinstance: that reads __class__, which some torch objects answer with a warning
        if type(obj) is cache_type and str(getattr(obj, "__module__", "")).startswith("torch.distributed.tensor"):
            obj.cache_clear()


# ---------------------------------------------------------------------- wrappers
def _blocks(model: nn.Module) -> nn.ModuleList:
    try:
        return model.model.layers
    except AttributeError:
        raise TypeError(
            f"parallelize: expected an Olmo2ForCausalLM-like model with blocks in model.model.layers, "
            f"got {type(model).__name__}"
        ) from None


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block in the backward (non-reentrant checkpointing)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = _blocks(model)
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` each block (replaced by its compiled wrapper, so FSDP2's
    hooks stay outside the compiled region; state-dict names are cleaned by
    ``torch.distributed.checkpoint.state_dict``)."""
    layers = _blocks(model)
    for i, block in enumerate(layers):
        layers[i] = torch.compile(block)


def _fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def check_shard_degree(shard_degree: int | None, world_size: int, strategy: str) -> None:
    """A ``parallel.shard_degree`` that this world and (resolved) strategy can use, else ValueError."""
    if shard_degree is None:
        return
    if strategy != "fsdp" and shard_degree != 1:
        raise ValueError(f"parallel.shard_degree={shard_degree} needs parallel.strategy=fsdp (HSDP shards with "
                         f"FSDP2 and replicates across groups), but the strategy is {strategy!r} with "
                         f"{world_size} rank(s)")
    if world_size % shard_degree:
        raise ValueError(f"parallel.shard_degree={shard_degree} must divide the world size ({world_size} ranks) "
                         f"into replicate groups of equal size")


def fsdp_mesh_shape(world_size: int, shard_degree: int | None) -> tuple[int, ...]:
    """(world,) for flat FSDP; (replicate, shard) = (world / k, k) for HSDP with k < world."""
    if shard_degree is None or shard_degree == world_size:
        return (world_size,)
    return (world_size // shard_degree, shard_degree)


def fsdp_mesh(device_type: str, shard_degree: int | None = None):
    """The device mesh FSDP2 shards over: 1-D ("shard",) over every rank, or the
    2-D ("replicate", "shard") mesh of HSDP; ranks r with the same r // k share
    a shard group (consecutive ranks: one node when k is the GPUs per node)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    check_shard_degree(shard_degree, world, "fsdp")
    shape = fsdp_mesh_shape(world, shard_degree)
    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def apply_fsdp(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None,
               reduce_dtype: torch.dtype | None, shard_degree: int | None = None) -> nn.Module:
    """FSDP2 (HSDP with ``shard_degree`` < world): shard each block, then the root
    (embedding, final norm, LM head)."""
    fully_shard, MixedPrecisionPolicy = _fsdp_api()
    mesh = fsdp_mesh(device.type, shard_degree)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = _blocks(model)
    for i, block in enumerate(layers):
        # The root gathers right after the last block's forward; keeping that
        # block unsharded until the backward saves one all-gather.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy == "auto":
        return "fsdp" if world_size > 1 else "none"
    if strategy in ("fsdp", "ddp") and world_size == 1:
        return "none"
    return strategy


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def parallelize(model: nn.Module, strategy: str, device: torch.device, precision: str,
                activation_checkpointing: bool = False, compile: bool = False,
                reduce_fp32: bool = True, shard_degree: int | None = None) -> nn.Module:
    """Apply activation checkpointing, compile and the data-parallel ``strategy``
    ("fsdp", "ddp", "none") to ``model`` (already on ``device`` or on meta for FSDP;
    ``shard_degree``: FSDP's shard group size, None for all ranks); returns the
    module to call."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if strategy == "fsdp":
        bf16 = precision == "bf16"
        return apply_fsdp(model, device, torch.bfloat16 if bf16 else None,
                          torch.float32 if (bf16 and reduce_fp32) else None, shard_degree)
    if strategy == "ddp":
        return apply_ddp(model, device)
    if strategy == "none":
        return model
    raise ValueError(f"strategy must be 'fsdp', 'ddp' or 'none', got {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (FSDP2 and the block wrappers keep the model object)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def autocast_context(device: torch.device, precision: str, strategy: str):
    """bf16 autocast where FSDP2's mixed precision does not already cast (GPU, not FSDP)."""
    if precision == "bf16" and strategy != "fsdp":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def no_grad_sync(model: nn.Module, last_micro_batch: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-batch."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _param_groups(module: nn.Module) -> list:
    """An FSDP2 module's parameter groups (private state: torch 2.13 keeps a list
    ``_fsdp_param_groups``, earlier releases one ``_fsdp_param_group`` or None)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    if not hasattr(state, "_fsdp_param_group"):
        raise RuntimeError(f"gathered_weights: torch {torch.__version__}'s FSDP2 state has neither _fsdp_param_groups "
                           "nor _fsdp_param_group; this torch is not supported for sampling under FSDP")
    group = state._fsdp_param_group
    return [] if group is None else [group]


@contextlib.contextmanager
def gathered_weights(model: nn.Module):
    """FSDP2: all-gather every parameter once on entry and keep them gathered until exit,
    so code that calls submodules directly (the KV-cache sampler) runs with full weights
    and no collective per call: ranks may then run different numbers of forwards (each
    rank's samples stop at their own lengths). Costs one full copy of the weights per
    rank for the duration. Collective on entry; a no-op for DDP or one process."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield model
        return
    # The root must be lazily initialized first (as its forward would), else the first
    # block to run would take itself for the root. A private method: no public one exists.
    modules[0]._get_fsdp_state()._lazy_init()
    resharded = [any(g.post_forward_mesh_info is not None for g in _param_groups(m)) for m in modules]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m, flag in zip(modules, resharded):
            m.reshard()
            m.set_reshard_after_forward(flag, recurse=False)
