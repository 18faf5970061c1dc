"""Sharded, world-size-independent initialization, and the trainer's model building.

Every rank builds the model on the meta device, applies parallelism
(:func:`olmo2.train.parallel.parallelize`), allocates only its own shards
(``to_empty``) and fills them in place (:func:`init_parameters_`). No rank ever
holds the full model and nothing is broadcast: rank 0's host memory is its
shard plus one generation block.

The values do not depend on the number of ranks, the mesh (FSDP or HSDP) or
the device: parameter ``name`` (its clean state-dict name) is cut along dim 0
into blocks of :func:`rows_per_block` rows, about :data:`BLOCK_ELEMENTS`
elements each, a function of the full shape alone; block ``b`` is drawn on the
CPU from its own ``torch.Generator`` seeded by :func:`block_seed` ``(seed,
name, b)``. A rank fills rows ``[start, end)`` of the full tensor (FSDP2 shards
dim 0, at any row) by drawing the blocks that overlap them and copying the
overlap, so any shard boundary gives exactly the values of a single process
that draws every block. The block size trades the fixed cost of a block
(seeding, a few small calls: about 0.1 ms, 6% of drawing 2**16 elements,
measured on a loaded CPU) against the extra rows a rank draws at its two
shard edges (at most two blocks per parameter): a rank of 32B over 64 draws
0-3.2% more than it keeps (2% on average over the ranks; 0.2-0.4% over 8).

The distribution is OLMo 2's (:meth:`olmo2.model.Olmo2ForCausalLM.parameter_init`):
a normal with std 0.02 truncated at +-3 std, drawn here by rejection (normal
samples, the ones outside the bounds redrawn in order from the same
generator), which is exactly the truncated normal and 2.4 times faster on
CPU than the inverse-CDF draw of ``nn.init.trunc_normal_`` (2**16-element
blocks, one thread); norm weights 1. The values differ from the model's sequential
:meth:`~olmo2.model.Olmo2ForCausalLM.init_weights` (one generator, parameter
after parameter), which cannot be split across ranks.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..config import Olmo2Config
from ..model import Olmo2ForCausalLM
from .parallel import parallelize

# Elements per generation block (fp32: 256 KiB); see the module docstring.
BLOCK_ELEMENTS = 1 << 16

# Names that wrappers insert between a module and its parameters (activation
# checkpointing, torch.compile); the seed keys on the name without them.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod")


def clean_name(name: str) -> str:
    """``name`` without the segments wrappers insert (``layers.0._checkpoint_wrapped_module.mlp``
    -> ``layers.0.mlp``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def block_seed(seed: int, name: str, block: int) -> int:
    """The generator seed of block ``block`` of parameter ``name`` (63 bits of BLAKE2b)."""
    digest = hashlib.blake2b(f"olmo2-init:{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rows_per_block(shape: tuple[int, ...] | torch.Size) -> int:
    """Rows of dim 0 per generation block: about :data:`BLOCK_ELEMENTS` elements, at least one row."""
    return max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))


def trunc_normal_(out: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill the contiguous fp32 CPU tensor ``out`` from a normal with ``std``, truncated
    at +-3 std (closed), by rejection: out-of-bounds entries are redrawn, in index
    order, from ``generator`` until none is left."""
    flat = out.view(-1)
    flat.normal_(0.0, std, generator=generator)
    bound = 3.0 * std
    redo = (flat.abs() > bound).nonzero().view(-1)
    while redo.numel():
        draw = torch.empty(redo.numel(), dtype=flat.dtype).normal_(0.0, std, generator=generator)
        inside = draw.abs() <= bound
        flat[redo[inside]] = draw[inside]
        redo = redo[~inside]
    return out


def fill_rows_(out: torch.Tensor, kind: str, std: float, seed: int, name: str,
               full_shape: tuple[int, ...] | torch.Size, row_start: int) -> None:
    """Write rows ``[row_start, row_start + len(out))`` of parameter ``name``'s full
    values (shape ``full_shape``) into ``out`` (any device and dtype)."""
    if kind == "ones":
        out.fill_(1.0)
        return
    if kind != "trunc_normal":
        raise ValueError(f"init: unknown initialization {kind!r} for parameter {name}")
    if not full_shape:  # a scalar: one row of one element
        full_shape, out = (1,), out.view(1)
    n_rows, rows = full_shape[0], out.shape[0]
    if rows == 0:
        return
    per_block = rows_per_block(full_shape)
    buffer = torch.empty(per_block * math.prod(full_shape[1:]), dtype=torch.float32)
    generator = torch.Generator()
    row_end = row_start + rows
    for block in range(row_start // per_block, (row_end - 1) // per_block + 1):
        first, last = block * per_block, min((block + 1) * per_block, n_rows)
        values = buffer[: (last - first) * math.prod(full_shape[1:])].view(last - first, *full_shape[1:])
        generator.manual_seed(block_seed(seed, name, block))
        trunc_normal_(values, std, generator)
        lo, hi = max(first, row_start), min(last, row_end)
        out[lo - row_start: hi - row_start].copy_(values[lo - first: hi - first])


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of ``param`` (a plain tensor, or the local shard of a DTensor
    sharded along dim 0 and replicated otherwise) and the full-tensor row it starts at."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(param, DTensor):
        return param, 0
    for placement in param.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
            raise ValueError(f"init: a parameter placed as {param.placements} (only dim-0 shards and replicas, "
                             "as FSDP2 and HSDP place them, can be initialized by rows)")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"init: local shard of shape {tuple(local.shape)}, expected {tuple(shape)}")
    return local, (offset[0] if offset else 0)


@torch.no_grad()
def init_parameters_(model: nn.Module, seed: int, spec: dict[str, tuple[str, float]] | None = None) -> int:
    """Initialize this rank's part of every parameter of ``model`` in place, keyed by
    ``seed`` and the clean parameter name, the same for any sharding; returns the
    number of elements written. ``spec``: name -> (kind, std), default the model's
    :meth:`~olmo2.model.Olmo2ForCausalLM.parameter_init`."""
    if spec is None:
        spec = {clean_name(k): v for k, v in model.parameter_init().items()}
    written = 0
    threads = torch.get_num_threads()
    # One thread: the generator is serial anyway, and on 256 KiB blocks intra-op
    # threads only add wake-ups (a 32B shard of 64 took 155 s with 2 threads and
    # 12 s with 1 on a loaded 2-core machine). torchrun sets one thread per rank too.
    torch.set_num_threads(1)
    try:
        for raw_name, param in model.named_parameters():
            name = clean_name(raw_name)
            if name not in spec:
                raise ValueError(f"init: no initialization is described for parameter {name}")
            local, row_start = local_rows(param)
            if local.is_meta:
                raise ValueError(f"init: parameter {name} is on the meta device; allocate it first (to_empty)")
            kind, std = spec[name]
            fill_rows_(local, kind, std, seed, name, tuple(param.shape), row_start)
            written += local.numel()
    finally:
        torch.set_num_threads(threads)
    return written


def build_model(config: Olmo2Config, strategy: str, device: torch.device, precision: str, seed: int, *,
                activation_checkpointing: bool = False, compile: bool = False, reduce_fp32: bool = True,
                shard_degree: int | None = None, materialize: bool = True, init_values: bool = True) -> nn.Module:
    """The trainer's model: built on meta, parallelized (``strategy`` "fsdp", "ddp" or
    "none"), allocated on ``device`` and initialized with :func:`init_parameters_`
    from ``seed``. FSDP allocates and fills only this rank's shards; DDP and a single
    process fill the full tensors (the same values). ``materialize=False`` stops
    after parallelizing (FSDP: the sharded model on meta, for sizing).
    ``init_values=False`` allocates without initializing: for a model whose every
    parameter a checkpoint load is about to overwrite (the trainer's resume, which
    refuses a checkpoint that lacks one); refused for a model with buffers outside
    its state dict (non-persistent), which no load would fill."""
    model = Olmo2ForCausalLM.from_config(config, device="meta")
    if not init_values:
        in_state = set(model.state_dict())
        unfilled = [name for name, _ in model.named_buffers() if name not in in_state]
        if unfilled:
            raise ValueError(f"build_model: init_values=False would leave the non-persistent buffers {unfilled} "
                             "uninitialized (no checkpoint holds them)")
    if strategy != "fsdp":  # DDP wraps an allocated model (it broadcasts rank 0's at construction)
        if not materialize:
            raise ValueError("build_model: materialize=False is for strategy='fsdp'")
        model.to_empty(device=device)
        if init_values:
            init_parameters_(model, seed)
        return parallelize(model, strategy, device, precision, activation_checkpointing, compile, reduce_fp32)
    model = parallelize(model, "fsdp", device, precision, activation_checkpointing, compile, reduce_fp32,
                        shard_degree=shard_degree)
    if materialize:
        model.to_empty(device=device)
        if init_values:
            init_parameters_(model, seed)
    return model
