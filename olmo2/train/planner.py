"""Memory and speed planner: what one training step of a :class:`TrainConfig`
holds per GPU, whether that fits, and how fast it should run
(``olmo2-train --plan``).

Memory, in bytes per rank, by part (:class:`MemoryPlan`):

* ``parameters``: the fp32 master weights. With FSDP2 (and HSDP) each
  parameter is split on dim 0 over the shard group of ``S`` ranks; dim 0 is
  padded to a multiple of ``S`` and every rank holds ``ceil(dim0 / S)`` rows
  (``FSDPParam._sharded_param_data``), so these bytes are the same on every
  rank. DDP and a single process hold every parameter.
* ``gradients``: fp32 gradients of this rank's shard. FSDP2 reduce-scatters
  into a padded buffer and keeps the gradients as views of it, so they are
  padded like the parameters.
* ``optimizer``: AdamW's ``exp_avg`` and ``exp_avg_sq`` in fp32, created by
  ``zeros_like`` on the sharded parameters, hence of the *unpadded* local
  shard (rank 0 holds the most: ``ceil(dim0 / S)`` rows, later ranks fewer or
  none), plus the 4-byte ``step`` tensor per parameter.
* ``activations`` / ``activations_checkpointed``: what the forward of one
  micro-batch saves for the backward, without and with per-block activation
  checkpointing. Per block and token (``b`` bytes per activation element, 2 in
  bf16, 4 in fp32; ``d`` hidden, ``q``/``kv`` the q and k/v projection widths,
  ``I`` the MLP width), counted from what the ops save (autograd's
  ``save_for_backward``): the block input read by q/k/v (``d``); q and k
  before QK-norm (``q + kv``) and after QK-norm + RoPE, with v (``q + 2 kv``),
  and the two norms' fp32 rstd; the attention output (``q``) and its fp32
  logsumexp (one per head; flash/SDPA kernels keep no T x T matrix), the
  o_proj input (``q``, the copy that the head transpose makes); the
  post-attention norm input (``d``) and rstd; the MLP input ``h`` (``d``);
  gate and up (``2 I``) and the SwiGLU output (``I``); the post-MLP norm input
  (``d``) and rstd: ``b (4 d + 3 q + 3 kv + 3 I) + 4 (4 + heads)``. Outside
  the blocks: RoPE's cos/sin tables, the final norm's input, output and rstd,
  the token ids and targets. With checkpointing a block keeps only its input,
  and one block's activations exist again while it is recomputed in the
  backward. The test ``tests/test_planner.py`` checks this count against
  autograd's saved tensors of a real block.
* ``loss_buffer``: the fused linear cross-entropy
  (:mod:`olmo2_kernels.linear_cross_entropy`) of one micro-batch of ``N``
  tokens, at its largest (the end of its forward): the gradients it computes
  in the forward and keeps for the backward (``dhidden``, N x d in the
  activation dtype, and ``dweight``, V x d in the head weight's dtype), the
  fp32 (V x d) ``dweight`` accumulator and its cast, the (chunk x V) logits
  buffer (fp32 on CUDA, where ``torch.mm(out_dtype=float32)`` exists, and a
  bf16 copy of its gradient) and the per-token fp32 values, with the chunk
  size of :func:`olmo2_kernels.linear_cross_entropy.default_chunk_size`.
* ``communication``: FSDP2's unsharded parameters and gradient buffers. The
  root group (embedding, final norm, LM head) stays gathered from the start of
  the forward to the end of the backward; a block is gathered for its forward
  and again for its backward with the next one prefetched (two blocks), and
  the last block is not resharded after the forward. In the backward the
  block's unsharded gradients (param dtype) and their reduce-dtype copy for
  the reduce-scatter exist, for the block or, at the end, the root. DDP: its
  gradient buckets, a second copy of the gradients that DDP allocates at
  construction and keeps for the whole run.
* ``allowance``: on a GPU, 1 GiB for the CUDA context, cuBLAS workspaces and
  NCCL, plus 5% of the rest for the caching allocator's fragmentation; none on
  CPU (the CPU tests measure tensor bytes, not the process).

Not every part is alive at once: gradients appear as activations are freed,
and the gathered parameters and gradient buffers come and go per block.
:attr:`MemoryPlan.total` is parameters + optimizer (+ DDP's buckets) + the
largest of three moments, plus the allowance:

* the end of the forward: all activations, the loss buffer, the gathered
  parameters, and the gradients when earlier micro-batches of the step
  already made them;
* the end of the backward: all gradients, the gathered parameters and the
  gradient buffers, the first block's activations and its backward's
  temporaries: the gradients of the SwiGLU output, gate and up (``3 N I``)
  less the down projection's and the norm's saved tensors already freed
  (``N I + N d``);
* the optimizer step: all gradients and the optimizer's temporaries (none for
  the fused CUDA AdamW; one parameter's size for torch's per-tensor loop).

Precision: bf16 activations (2 bytes) on a GPU as FSDP2's mixed precision
runs them; with DDP or one GPU, torch.autocast keeps the residual stream in
fp32, so there the activation figures are somewhat low. fp32 on CPU.

Checked against measurement on CPU (``tests/test_planner.py``): the block
count against autograd's saved tensors, the parameter, gradient and optimizer
bytes exactly (one process, and FSDP2 shards under a fake process group), and
the total within 10% of the measured peak tensor memory, in one process and
with FSDP2 on two gloo ranks. Not yet against a GPU.

Speed: ``flops_per_token`` (:func:`olmo2.config.flops_per_token`, the
project's convention) times tokens per second equals ``mfu`` times the GPU's
dense bf16 peak (:data:`olmo2.hardware.PEAK_BF16_FLOPS`). The default MFU,
40%, is OLMo-core's reported figure for its OLMo 2 1B script on H100s, and
between what OLMo-core's published H100 throughputs imply at this FLOP count:
7B about 10,000 tokens/s per GPU, 45%; 13B about 4,600, 39%. It is an
assumption, not a measurement; ``--mfu`` changes it. The speed does not depend
on the layout (communication time is not modelled). GPU memory is the total
``nvidia-smi`` reports (H100 80 GB: 81,559 MiB = 79.6 GiB; A100 80 GB: 81,920
MiB = 80.0 GiB, as listed in modal-labs/modal-client PR 2797 and seen in NCCL
issue logs); the CUDA context and NCCL come out of it through the allowance.
For the H200 the vendor's 141 GB (131.3 GiB) is used, a lower bound: its
``nvidia-smi`` total was not checked here.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import FLOPS_CONVENTION, flops_per_token, num_parameters
from ..hardware import PEAK_BF16_FLOPS
from ..model import Olmo2ForCausalLM
from .config import ConfigError, TrainConfig
from .parallel import resolve_strategy

# MFU assumed by the speed estimate (OLMo-core: ~40% for its OLMo 2 1B H100 script).
DEFAULT_MFU = 0.40
GIB = 2**30
# Per-GPU allowance for the CUDA context, cuBLAS workspaces and NCCL buffers.
CONTEXT_BYTES = 1 * GIB
# Share of the planned bytes allowed for the caching allocator's fragmentation.
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class Gpu:
    name: str
    # Device memory in bytes (see the module docstring for each figure's source).
    memory: int | None
    # Dense bf16 peak FLOP/s.
    peak_flops: float | None


GPUS: dict[str, Gpu] = {
    "h100": Gpu("H100 SXM 80 GB", 81559 * 2**20, PEAK_BF16_FLOPS["H100"]),  # nvidia-smi total
    "h200": Gpu("H200 141 GB", 141 * 10**9, PEAK_BF16_FLOPS["H200"]),  # vendor figure, a lower bound
    "a100": Gpu("A100 80 GB", 81920 * 2**20, PEAK_BF16_FLOPS["A100"]),  # nvidia-smi total
    "cpu": Gpu("CPU", None, None),
}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU (rank ``rank``) of one training step, by part (see the module docstring)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    loss_buffer: int
    # Optimizer-step temporaries (the per-tensor AdamW loop's largest parameter; 0 when fused).
    optimizer_temporaries: int
    # Of ``communication``: the gathered parameters alive in the forward and backward (root
    # group and two blocks), and the gradient buffers of the backward (the root's unsharded
    # gradients, held to its reduce-scatter at the end, and one reduce-scatter's input).
    gathered: int
    gradient_buffers: int
    # Of ``communication``: buffers alive for the whole run (DDP's gradient buckets).
    persistent_buffers: int
    # One block's activations: alive again while a checkpointed block is recomputed.
    block_activations: int
    # The block backward's largest temporaries beyond its saved activations.
    backward_temporaries: int
    activation_checkpointing: bool
    # Gradients already exist during the forward (gradient accumulation over micro-batches).
    gradients_during_forward: bool
    # Allocator/context allowance applied on a GPU (0 on CPU).
    gpu: str = "h100"
    gpu_memory: int | None = None
    allowance_fixed: int = 0
    allowance_fraction: float = 0.0
    # Layout facts, for the printout.
    strategy: str = "none"
    world_size: int = 1
    shard_degree: int = 1
    micro_batch_tokens: int = 0
    grad_accum: int = 1
    precision: str = "fp32"

    @property
    def activations_used(self) -> int:
        return self.activations_checkpointed if self.activation_checkpointing else self.activations

    @property
    def moments(self) -> dict[str, int]:
        """The bytes beyond parameters and optimizer at the step's three largest moments."""
        grads_fwd = self.gradients if self.gradients_during_forward else 0
        return {
            "end of forward": self.gathered + grads_fwd + self.activations_used + self.loss_buffer,
            "end of backward": (self.gathered + self.gradient_buffers + self.gradients + self.block_activations
                                + self.backward_temporaries),
            "optimizer step": self.gradients + self.optimizer_temporaries,
        }

    @property
    def peak_moment(self) -> str:
        moments = self.moments
        return max(moments, key=moments.get)

    @property
    def communication(self) -> int:
        return self.gathered + self.gradient_buffers + self.persistent_buffers

    @property
    def tensors(self) -> int:
        """Planned tensor bytes at the peak, before the allowance."""
        return self.parameters + self.optimizer + self.persistent_buffers + max(self.moments.values())

    @property
    def allowance(self) -> int:
        return int(self.allowance_fixed + self.allowance_fraction * self.tensors)

    @property
    def total(self) -> int:
        return self.tensors + self.allowance

    @property
    def fits(self) -> bool | None:
        """Whether :attr:`total` fits in the GPU's memory (None on CPU: no limit known)."""
        return None if self.gpu_memory is None else self.total <= self.gpu_memory


@dataclass(frozen=True)
class SpeedPlan:
    flops_per_token: int
    mfu: float
    peak_flops: float
    tokens_per_second_per_gpu: float
    tokens_per_second: float
    step_seconds: float
    global_batch_tokens: int


# ---------------------------------------------------------------------- helpers
def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"planner: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise ConfigError(f"planner: gpu must be one of {sorted(GPUS)}, got {name!r}")
    return GPUS[name]


def shard_rows(dim0: int, shard: int, rank: int = 0) -> tuple[int, int]:
    """``(padded, local)`` rows of a dim-0 FSDP2 shard: every rank stores ``ceil(dim0 / shard)``
    rows (dim 0 padded to a multiple of ``shard``); rank ``rank`` owns ``local`` of them."""
    per = -(-dim0 // shard)
    local = max(0, min(per, dim0 - rank * per))
    return per, local


def activation_bytes_per_block_token(cfg, act_bytes: int) -> int:
    """Bytes one block saves for the backward per token (see the module docstring)."""
    d, inter = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    return act_bytes * (4 * d + 3 * q + 3 * kv + 3 * inter) + 4 * (4 + cfg.num_attention_heads)


def _resolved_shard_degree(cfg: TrainConfig, world_size: int, shard_degree: int | None) -> int:
    if shard_degree is None:
        shard_degree = getattr(cfg.parallel, "shard_degree", None)
    if shard_degree is None or shard_degree == 0:
        return world_size
    _check_int("shard_degree", shard_degree)
    if world_size % shard_degree:
        raise ConfigError(f"planner: shard_degree ({shard_degree}) must divide the world size ({world_size})")
    return shard_degree


# ---------------------------------------------------------------------- memory
def plan_memory(cfg: TrainConfig, *, world_size: int, shard_degree: int | None = None, gpu: str = "h100",
                rank: int = 0) -> MemoryPlan:
    """Per-rank memory of one training step of ``cfg`` on ``world_size`` ranks.

    ``shard_degree``: ranks a parameter is sharded over (FSDP2: the world; HSDP:
    the shard dimension of the mesh); default ``cfg.parallel.shard_degree`` when
    the config has it, else the world. ``gpu``: a key of :data:`GPUS` ("cpu":
    fp32, no allowance, no limit). ``rank``: whose optimizer shard (rank 0
    holds the most). Raises :class:`ConfigError` (one line) on a batch that does
    not split over the ranks or a bad argument.
    """
    _check_int("world_size", world_size)
    _check_int("rank", rank, minimum=0)
    device = _gpu(gpu)
    strategy = resolve_strategy(cfg.parallel.strategy, world_size)
    shard = _resolved_shard_degree(cfg, world_size, shard_degree) if strategy == "fsdp" else 1
    if strategy == "fsdp":
        rank = rank % shard  # its index in its shard group (groups of consecutive ranks)
    on_gpu = gpu != "cpu"
    precision = cfg.parallel.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    if precision == "bf16" and not on_gpu:
        raise ConfigError("planner: parallel.precision=bf16 is for GPUs; use fp32 (or auto) with gpu=cpu")
    act = 2 if precision == "bf16" else 4
    grad_accum = cfg.grad_accum_steps(world_size)
    model_cfg = cfg.model
    n_tokens = cfg.micro_batch_tokens
    seq = cfg.data.seq_len
    d, vocab = model_cfg.hidden_size, model_cfg.vocab_size

    meta = Olmo2ForCausalLM.from_config(model_cfg, device="meta")
    blocks = list(meta.model.layers)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root_params = [p for p in meta.parameters() if id(p) not in in_blocks]

    # Parameters, gradients (padded shards), optimizer (this rank's unpadded shard).
    params_numel = 0
    optim_numel = 0
    largest_local = 0
    n_tensors = 0
    for p in meta.parameters():
        n_tensors += 1
        rest = p.numel() // p.shape[0]
        if strategy == "fsdp":
            padded, local = shard_rows(p.shape[0], shard, rank)
            params_numel += padded * rest
            optim_numel += local * rest
            largest_local = max(largest_local, local * rest)
        else:
            params_numel += p.numel()
            optim_numel += p.numel()
            largest_local = max(largest_local, p.numel())
    parameters = 4 * params_numel
    gradients = 4 * params_numel
    fused = cfg.optim.fused if cfg.optim.fused is not None else on_gpu
    optimizer = 2 * 4 * optim_numel + 4 * n_tensors
    optimizer_temporaries = 0 if fused else 4 * largest_local

    # Activations of one micro-batch.
    per_block_token = activation_bytes_per_block_token(model_cfg, act)
    block_activations = n_tokens * per_block_token
    rope_tables = 2 * seq * model_cfg.head_dim * 4
    outside = rope_tables + n_tokens * (2 * d * act + 4) + 3 * n_tokens * 8  # final norm; ids, labels, targets
    layers = model_cfg.num_hidden_layers
    activations = layers * block_activations + outside
    activations_checkpointed = layers * n_tokens * d * act + block_activations + outside
    backward_temporaries = n_tokens * act * max(2 * model_cfg.intermediate_size - d, 0)

    # Fused linear cross-entropy, at the end of its forward.
    from olmo2_kernels.linear_cross_entropy import default_chunk_size

    chunk = default_chunk_size(n_tokens, d, vocab)
    head_bytes = act  # the head weight as the op sees it (FSDP2 bf16 compute copy, or fp32)
    logits_bytes = 4 if on_gpu else act
    chunk_buffers = chunk * vocab * (logits_bytes + (head_bytes if logits_bytes != head_bytes else 0))
    dweight_acc = vocab * d * 4
    dweight_cast = vocab * d * head_bytes if head_bytes != 4 else 0
    loss_buffer = chunk_buffers + dweight_acc + dweight_cast + n_tokens * d * act + n_tokens * (4 * 4 + 1)

    # Communication buffers.
    gathered = gradient_buffers = persistent_buffers = 0
    param_bytes = act  # FSDP2 gathers in the compute dtype
    reduce_bytes = 4 if (precision == "fp32" or cfg.parallel.reduce_fp32) else 2
    if strategy == "fsdp" and shard > 1:
        block_numel = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        root_numel = sum(p.numel() for p in root_params)
        gathered = root_numel * param_bytes + 2 * block_numel * param_bytes
        reduce_copy = reduce_bytes if reduce_bytes != param_bytes else 0
        gradient_buffers = root_numel * param_bytes + max(block_numel * (param_bytes + reduce_copy),
                                                          root_numel * reduce_copy)
    elif strategy == "ddp":
        persistent_buffers = gradients  # the buckets: a second copy of the gradients

    allowance_fixed = CONTEXT_BYTES if on_gpu else 0
    return MemoryPlan(
        parameters=parameters, gradients=gradients, optimizer=optimizer, activations=activations,
        activations_checkpointed=activations_checkpointed, loss_buffer=loss_buffer, gathered=gathered,
        gradient_buffers=gradient_buffers, persistent_buffers=persistent_buffers,
        optimizer_temporaries=optimizer_temporaries, block_activations=block_activations,
        backward_temporaries=backward_temporaries,
        activation_checkpointing=cfg.parallel.activation_checkpointing, gradients_during_forward=grad_accum > 1,
        gpu=gpu, gpu_memory=device.memory, allowance_fixed=allowance_fixed,
        allowance_fraction=FRAGMENTATION if on_gpu else 0.0, strategy=strategy, world_size=world_size,
        shard_degree=shard, micro_batch_tokens=n_tokens, grad_accum=grad_accum, precision=precision,
    )


# ---------------------------------------------------------------------- speed
def plan_speed(cfg: TrainConfig, *, world_size: int, gpu: str = "h100", mfu: float = DEFAULT_MFU) -> SpeedPlan | None:
    """Expected throughput at MFU ``mfu`` on ``gpu`` (None on CPU: no peak known)."""
    _check_int("world_size", world_size)
    peak = _gpu(gpu).peak_flops
    if not 0 < mfu <= 1:
        raise ConfigError(f"planner: mfu must be in (0, 1], got {mfu!r}")
    if peak is None:
        return None
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    per_gpu = mfu * peak / fpt
    total = per_gpu * world_size
    return SpeedPlan(flops_per_token=fpt, mfu=mfu, peak_flops=peak, tokens_per_second_per_gpu=per_gpu,
                     tokens_per_second=total, step_seconds=cfg.global_batch_tokens / total,
                     global_batch_tokens=cfg.global_batch_tokens)


# ---------------------------------------------------------------------- printout
def _size(n: int | float, unit: int) -> str:
    return f"{n / unit:9.2f} {'GiB' if unit == GIB else 'MiB'}"


def format_plan(cfg: TrainConfig, plan: MemoryPlan, speed: SpeedPlan | None, nodes: int, gpus_per_node: int) -> str:
    """The ``--plan`` table."""
    unit = GIB if plan.total >= GIB else 2**20
    n = num_parameters(cfg.model)
    ac = "on" if plan.activation_checkpointing else "off"
    layout = f"{plan.strategy}" + (f", shard over {plan.shard_degree}" if plan.strategy == "fsdp" else "")
    if plan.strategy == "fsdp" and plan.shard_degree < plan.world_size:
        layout += f" x replicate {plan.world_size // plan.shard_degree} (HSDP)"
    master = "fp32, shard" if plan.strategy == "fsdp" else "fp32"
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    def row(label: str, value: int, note: str = "") -> str:
        return f"  {label:<46}{_size(value, unit)}{note}"

    used, unused = "   <- used", ""
    lines = [
        f"plan: {cfg.run_name}: {size} parameters on {nodes} node(s) x {gpus_per_node} {GPUS[plan.gpu].name}"
        f" = {plan.world_size} rank(s); {layout}; {plan.precision}",
        f"  micro-batch {plan.micro_batch_tokens:,} tokens ({plan.micro_batch_tokens // cfg.data.seq_len} x "
        f"{cfg.data.seq_len}), {plan.grad_accum} micro-batch(es) per step, global batch "
        f"{cfg.global_batch_tokens:,} tokens; activation checkpointing {ac}",
        f"memory per {'GPU' if plan.gpu_memory is not None else 'rank'} (rank 0):",
        row(f"parameters ({master})", plan.parameters),
        row(f"gradients ({master})", plan.gradients),
        row("optimizer (AdamW exp_avg, exp_avg_sq)", plan.optimizer),
        row("activations, no checkpointing", plan.activations, unused if plan.activation_checkpointing else used),
        row("activations, checkpointing each block", plan.activations_checkpointed,
            used if plan.activation_checkpointing else unused),
        row("LM-head loss buffer (fused linear CE)", plan.loss_buffer),
        row("communication (gathered params, grad buffers)", plan.communication),
    ]
    if plan.optimizer_temporaries:
        lines.append(row("optimizer-step temporaries", plan.optimizer_temporaries))
    always = "parameters, optimizer and DDP's buckets" if plan.persistent_buffers else "parameters and optimizer"
    lines.append(f"  not all at once; beyond {always}, at the step's largest moments:")
    for name, value in plan.moments.items():
        lines.append(row(f"  {name}", value, "   <- peak" if name == plan.peak_moment else ""))
    lines.append(row("peak tensors", plan.tensors))
    if plan.allowance:
        lines.append(row(f"allowance (context/NCCL 1 GiB + {FRAGMENTATION:.0%})", plan.allowance))
    if plan.gpu_memory is None:
        lines.append(row("total", plan.total))
    else:
        verdict = "FITS" if plan.fits else "DOES NOT FIT"
        lines.append(row("total", plan.total, f"  of {plan.gpu_memory / GIB:.1f} GiB: {verdict} "
                                               f"({plan.total / plan.gpu_memory:.0%})"))
    if speed is not None:
        tokens = cfg.stop_step * cfg.global_batch_tokens
        days = tokens / speed.tokens_per_second / 86400
        lines += [
            f"speed at {speed.mfu:.0%} MFU (assumed), {speed.peak_flops / 1e12:.1f} TFLOP/s dense bf16 peak, "
            f"{speed.flops_per_token / 1e9:.2f} GFLOP per token ({FLOPS_CONVENTION}):",
            f"  {speed.tokens_per_second_per_gpu:,.0f} tokens/s per GPU, {speed.tokens_per_second:,.0f} tokens/s "
            f"for the job, {speed.step_seconds:.2f} s per step; {cfg.stop_step:,} steps ({tokens / 1e12:.2f}T "
            f"tokens) in {days:.1f} days",
        ]
    return "\n".join(lines)


def plan_text(cfg: TrainConfig, *, nodes: int = 1, gpus_per_node: int = 8, gpu: str = "h100",
              mfu: float = DEFAULT_MFU, shard_degree: int | None = None) -> str:
    """``format_plan`` for ``nodes`` x ``gpus_per_node`` ranks."""
    _check_int("nodes", nodes)
    _check_int("gpus_per_node", gpus_per_node)
    world = nodes * gpus_per_node
    plan = plan_memory(cfg, world_size=world, shard_degree=shard_degree, gpu=gpu)
    speed = plan_speed(cfg, world_size=world, gpu=gpu, mfu=mfu)
    return format_plan(cfg, plan, speed, nodes, gpus_per_node)
