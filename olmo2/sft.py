"""Supervised finetuning (Tülu 3 SFT) of an OLMo 2 Hugging Face checkpoint on chat data.

What this module owns: :class:`SFTConfig` and its presets, packing of
conversations into rows (:func:`pack`), the micro-batches of one optimizer step
(:func:`collate`), the step's loss (:func:`step_loss`), the linear
warmup/decay schedule and the loop (:func:`train_sft`) that writes an HF folder
with ``tokenizer.json`` and the chat template (:data:`olmo2.chat.CHAT_TEMPLATE`).

* **Packing** (``packing=True``): conversations are laid end to end in rows of
  ``max_length`` tokens; attention stays inside each conversation
  (:func:`olmo2.model.document_mask`, a block-diagonal causal mask for the
  ``sdpa``/``eager`` backends) and positions restart at 0 per conversation.
  No loss crosses a boundary: a conversation's first label is its bos (-100), so
  the last token of one conversation never has the next one's first token as target.
  With ``packing=False`` each row is one conversation, right-padded (pad
  tokens are never targets, and causal attention never lets a real token see them).
* **Loss** (Tülu 3's "sum" loss): token losses summed over every micro-batch of
  an optimizer step and divided by one fixed count, the step's number of target
  tokens, counted before the first forward. The gradient is then the same
  however the step is split into micro-batches (a test checks it).
* **Schedule**: linear warmup over ``warmup_ratio`` of the steps, then linear decay to 0.

Why not a stage of :mod:`olmo2.train`: the pretraining trainer is built around a
token stream (memmapped corpus, fixed-length windows). SFT needs variable-length
conversations, masks and per-document positions; it is a small loop over the same
model, kernels, parallelism (:mod:`olmo2.train.parallel`) and checkpoints
(:mod:`olmo2.train.checkpoint`).

* **Data parallel** (``torchrun --nproc_per_node=N -m olmo2.cli.sft ...``; ``strategy``
  fsdp, ddp or none): every rank reads the whole data and builds the same step, then
  takes a disjoint share of the step's micro-batches (:func:`rank_share`; a rank left
  without one runs a copy whose targets are all ignored, so FSDP's collectives stay
  in step). The step's target count is counted from all of the step's rows, which
  every rank holds, so it is the global count with no collective; each rank's
  summed loss is divided by it and multiplied by the world size (DDP and FSDP2
  average gradients over ranks): the gradient does not depend on the number of
  ranks nor on the split. Under FSDP2 the weights are loaded on rank 0 and
  broadcast into the shards; the final HF folder is written by rank 0 from a
  gathered full state dict.

* **Metrics**: one line per step in ``output/metrics.jsonl`` through pretraining's sink
  (:class:`olmo2.train.metrics.MetricsLogger`, rank 0; also ``output/tensorboard`` when
  tensorboard is installed, and a tqdm bar with ``progress=true``): loss, target tokens,
  lr, epoch, ``step_time_s`` (pretraining's name).
* **In-loop evaluation** (``eval.*``, :class:`PostTrainEvalConfig`, :class:`InLoopEvaluation`):
  every ``eval.interval`` steps and after the last step, the loss per target token
  of the held-out conversations ``eval.data`` (:func:`heldout_loss`; packed like the
  training rows), optionally the verified accuracy of greedy (and sampled) answers to
  the prompts ``eval.prompts`` (RL's prompt format and scoring, :func:`verified_evaluation`)
  and OLMES tasks; a line of its own in ``metrics.jsonl`` (``eval/loss``,
  ``eval/target_tokens``, ``eval/verified_accuracy``, ``eval/seconds``, ``downstream/...``).
* **Resume**: every ``save_interval`` steps and at the end, a verified checkpoint in
  the pretraining trainer's format (:class:`PostTrainCheckpointer`: model, optimizer,
  scheduler, data position, RNG) under ``output/checkpoints``; rerunning the same
  command continues from the newest one that verifies, bitwise as if never stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .chat import CHAT_TEMPLATE, IGNORE_INDEX, read_chat_jsonl
from .model import Olmo2ForCausalLM, document_mask
from .train.parallel import DistInfo, all_reduce_sum, no_grad_sync

STRATEGIES = ("auto", "fsdp", "ddp", "none")


@dataclass
class PostTrainEvalConfig:
    """In-loop evaluation of an SFT or DPO run (the ``eval.*`` keys): the held-out
    data, the verified accuracy on held-out prompts and OLMES tasks, every ``interval``
    steps and after the last step."""

    data: str = ""  # held-out JSONL in the training data's format (SFT: messages; DPO: preference pairs)
    interval: int = 0  # evaluate every N steps and after the last step; 0: never
    max_examples: int = 0  # evaluate on the first N usable held-out records; 0: all
    ref_cache: str = ""  # DPO: file for the held-out reference log-probs; empty: output/reference_logps_eval.pt
    tasks: list[str] = field(default_factory=list)  # OLMES tasks as olmo2-eval --tasks takes them (eval extra)
    task_limit: int = 200  # first N documents of each task; 0: all
    at_start: bool = False  # also evaluate before the first step (step 0: the starting model)
    prompts: str = ""  # prompt JSONL as olmo2-rl reads it (prompt or messages, verifier, reference): verified accuracy
    prompts_limit: int = 0  # the first N usable prompts of eval.prompts; 0: all
    max_new_tokens: int = 512  # answer length for eval.prompts (greedy; stops at EOS)
    samples: int = 0  # also sample this many answers per prompt at eval.temperature (sampled accuracy)
    temperature: float = 1.0  # of the eval.samples answers

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        for key in ("interval", "max_examples", "task_limit", "prompts_limit", "samples"):
            if getattr(self, key) < 0:
                raise ValueError(f"eval.{key} must be >= 0, got {getattr(self, key)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"eval.temperature must be > 0, got {self.temperature}")
        if (self.data or self.tasks or self.prompts) and not self.interval:
            raise ValueError("eval.data, eval.prompts or eval.tasks is set but eval.interval is 0; set "
                             "eval.interval (steps between evaluations, and one after the last step)")
        if self.interval and not (self.data or self.tasks or self.prompts):
            raise ValueError(f"eval.interval={self.interval} but there is nothing to evaluate; set eval.data "
                             "(held-out JSONL), eval.prompts (prompt JSONL with verifiers) or eval.tasks")
        if self.tasks:
            from .eval.tasks import expand_task_names

            try:
                expand_task_names(self.tasks)  # an unknown task name fails at config time
            except ValueError as exc:
                raise ValueError(f"eval.{exc}") from None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the run evaluates after ``step``: every ``interval`` steps, after the
        last one, and with ``at_start`` at step 0."""
        if not self.enabled or (step == 0 and not self.at_start):
            return False
        return step % self.interval == 0 or step == total_steps


@dataclass
class SFTConfig:
    preset: str = ""  # the preset the values came from (set by the resolver; empty: none)
    model: str = ""  # HF folder of the base model
    data: str = ""  # messages JSONL
    output: str = ""  # HF folder to write
    tokenizer: str = ""  # name or tokenizer.json; empty: the model folder's, else dolma2
    max_length: int = 4096
    packing: bool = True
    micro_batch_size: int = 1  # rows per forward
    grad_accum: int = 128  # micro-batches per optimizer step
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: int = 2
    max_steps: int = 0  # 0: epochs decide
    seed: int = 123
    adam_eps: float = 1e-8
    dtype: str = "float32"  # the weights and AdamW state (fp32: the master weights under bf16 precision)
    precision: str = "auto"  # compute: bf16 (FSDP2 mixed precision, else autocast) or fp32; auto: bf16 on GPU
    device: str = ""  # cpu, cuda; empty: cuda when available (one GPU per local rank under torchrun)
    strategy: str = "auto"  # fsdp, ddp, none; auto: fsdp with several ranks
    save_interval: int = 100  # steps between checkpoints (and one at the end); 0: only at the end
    keep_last: int = 2  # checkpoints kept (0: all)
    checkpoint_dir: str = ""  # empty: output/checkpoints; a rerun of the same command resumes from it
    hard_stop: int = 0  # stop (with a checkpoint) after this step without changing the schedule; 0: off
    progress: bool = False  # a tqdm bar on stderr in place of the line per step (pretraining's switch)
    tensorboard: bool = True  # also write OUTPUT/tensorboard when tensorboard is installed (as pretraining)
    eval: PostTrainEvalConfig = field(default_factory=PostTrainEvalConfig)  # in-loop evaluation: the eval.* keys

    def __post_init__(self) -> None:
        check_common(self, "SFTConfig")


def check_common(cfg, name: str) -> None:
    """The checks SFTConfig and DPOConfig share (one line naming the key)."""
    for key in ("save_interval", "keep_last", "hard_stop", "max_steps"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{name}.{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("max_length", "micro_batch_size", "grad_accum", "epochs"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{name}.{key} must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"{name}.warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.lr <= 0 or cfg.adam_eps <= 0:
        raise ValueError(f"{name}: lr and adam_eps must be > 0, got lr={cfg.lr}, adam_eps={cfg.adam_eps}")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"{name}.precision must be one of ('auto', 'bf16', 'fp32'), got {cfg.precision!r}")
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"{name}.strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
    if cfg.device not in ("", "auto", "cpu", "cuda"):
        raise ValueError(f"{name}.device must be cpu, cuda or empty (cuda when available), got {cfg.device!r}")
    check_output_is_not_model(cfg, name)


def check_output_is_not_model(cfg, name: str) -> None:
    """The export must not overwrite the starting model (the user's input)."""
    if cfg.model and cfg.output and Path(cfg.model).resolve() == Path(cfg.output).resolve():
        raise ValueError(f"{name}.output is the starting model's folder {cfg.model!r}: the export would overwrite "
                         f"it; give another folder")


# Tülu 3 SFT hyperparameters for OLMo 2 Instruct, as shipped in allenai/open-instruct
# configs/train_configs/olmo2/olmo2_1124_7b_sft.yaml and olmo2_1124_13b_sft.yaml
# (read at commit eb00bf13): lr 1e-5 (7B) and 6e-6 (13B), effective batch 128
# sequences (1 per GPU x 4 accumulation x 32 GPUs), max_seq_length 4096, linear
# schedule, warmup_ratio 0.03, weight decay 0, 2 epochs, the "sum" loss
# (reduce_loss: sum). Sources disagree on the lr: the earlier runs in
# docs/archived_dev_scripts/olmo2_1124.sh used 2e-5 (7B) and swept 6e-6..8e-6
# (13B), and an earlier preset here had 2e-5 / 7.5e-6 from memory of the papers;
# the shipped config files are followed. Also as configs/sft-olmo2-{7b,13b}.yaml
# (a test keeps the two equal). micro_batch_size x grad_accum is the global batch
# whatever the number of ranks.
PRESETS: dict[str, dict] = {
    "olmo2_7b": dict(lr=1e-5, max_length=4096, micro_batch_size=1, grad_accum=128, warmup_ratio=0.03, epochs=2,
                     weight_decay=0.0),
    "olmo2_13b": dict(lr=6e-6, max_length=4096, micro_batch_size=1, grad_accum=128, warmup_ratio=0.03, epochs=2,
                      weight_decay=0.0),
}


# --------------------------------------------------------------------------- rows and batches
@dataclass
class Row:
    ids: list[int]
    labels: list[int]
    positions: list[int]
    documents: list[int]


def pack(examples: list[tuple[list[int], list[int]]], max_length: int, packing: bool) -> list[Row]:
    """Rows of at most ``max_length`` tokens: with ``packing``, conversations in
    order, a new row when the next one does not fit; else one per row."""
    rows: list[Row] = []
    current: Row | None = None
    for ids, labels in examples:
        if labels[0] != IGNORE_INDEX:
            raise ValueError("pack: a conversation's first label must be -100 (its bos), so no loss crosses a boundary")
        if current is None or not packing or len(current.ids) + len(ids) > max_length:
            current = Row([], [], [], [])
            rows.append(current)
        doc = current.documents[-1] + 1 if current.documents else 0
        current.ids += ids
        current.labels += labels
        current.positions += range(len(ids))
        current.documents += [doc] * len(ids)
    return rows


def collate(rows: list[Row], pad_id: int, packing: bool) -> dict[str, Tensor]:
    """One micro-batch: right-padded ids, labels, positions, and with packing the document mask.
    Padding is a document of its own (id -1), so the mask never lets a real token see it."""
    width = max(len(r.ids) for r in rows)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    batch = {
        "input_ids": torch.tensor([padded(r.ids, pad_id) for r in rows]),
        "labels": torch.tensor([padded(r.labels, IGNORE_INDEX) for r in rows]),
        "position_ids": torch.tensor([r.positions + list(range(width - len(r.ids))) for r in rows]),
    }
    if packing:
        batch["attention_mask"] = document_mask(torch.tensor([padded(r.documents, -1) for r in rows]))
    return batch


def num_targets(batch: dict[str, Tensor]) -> int:
    """Tokens that are targets after the shift inside the model (labels[:, 1:] not ignored)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def rank_share(items: list, dist_info: DistInfo | None) -> list:
    """This rank's share of one step's micro-batches: items ``rank, rank + world, ...``,
    padded with ``None`` to as many as the rank with the most has (every rank runs the
    same number of forwards and backwards, which FSDP's collectives need)."""
    world, rank = (dist_info.world_size, dist_info.rank) if dist_info is not None else (1, 0)
    mine = items[rank::world]
    return mine + [None] * (math.ceil(len(items) / world) - len(mine))


def step_loss(model: nn.Module, micro_batches: list[dict[str, Tensor]], device,
              dist_info: DistInfo | None = None, autocast=contextlib.nullcontext) -> tuple[float, int]:
    """Backward of one optimizer step's loss: summed token losses over all
    micro-batches (of all ranks) / the step's target count (fixed before the first
    forward). ``micro_batches`` is the whole step, on every rank; this rank runs its
    :func:`rank_share`. Returns the step's loss (summed over ranks) and the count."""
    total = sum(num_targets(b) for b in micro_batches)
    world = dist_info.world_size if dist_info is not None else 1
    scale = world / max(total, 1)  # DDP and FSDP2 average the gradients over ranks
    share = rank_share(micro_batches, dist_info)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, b in enumerate(share):
        if b is None:  # no micro-batch left for this rank: a copy with no targets (zero loss and gradients)
            b = {**micro_batches[0], "labels": torch.full_like(micro_batches[0]["labels"], IGNORE_INDEX)}
        b = {k: v.to(device) for k, v in b.items()}
        with no_grad_sync(model, i == len(share) - 1):
            with autocast():
                out = model(b["input_ids"], labels=b["labels"], attention_mask=b.get("attention_mask"),
                            position_ids=b["position_ids"], reduction="sum")
            (out.loss * scale).backward()
        loss_sum += out.loss.detach().double()
    return float(all_reduce_sum(loss_sum)) / max(total, 1), total


@torch.no_grad()
def heldout_loss(model: nn.Module, rows: list[Row], micro_batch_size: int, pad_id: int, packing: bool, device,
                 dist_info: DistInfo | None = None, autocast=contextlib.nullcontext) -> tuple[float, int]:
    """Held-out loss per target token of ``rows`` (:func:`pack`'s, in micro-batches of
    ``micro_batch_size`` rows): the token losses summed in float64 and divided by the
    target count, so the value depends neither on the batch split nor on the number of
    ranks. Each rank scores its :func:`rank_share` of the micro-batches (collated one
    at a time: a packed row's document mask is max_length^2 bytes); a rank left without
    one runs a copy whose targets are all ignored, so FSDP's collectives stay in step.
    One all-reduce of the sum; the count is counted on the host from all the rows,
    which every rank holds. The model is in eval mode meanwhile, then back in its mode."""
    total = sum(sum(label != IGNORE_INDEX for label in r.labels[1:]) for r in rows)
    starts = list(range(0, len(rows), micro_batch_size))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for start in rank_share(starts, dist_info):
            b = collate(rows[start or 0 : (start or 0) + micro_batch_size], pad_id, packing)
            if start is None:
                b["labels"] = torch.full_like(b["labels"], IGNORE_INDEX)
            b = {k: v.to(device) for k, v in b.items()}
            with autocast():
                out = model(b["input_ids"], labels=b["labels"], attention_mask=b.get("attention_mask"),
                            position_ids=b["position_ids"], reduction="sum")
            loss_sum += out.loss.double()
    finally:
        model.train(was_training)
    return float(all_reduce_sum(loss_sum)) / max(total, 1), total


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- exact resume
# Fields that decide the data order and the schedule: a rerun that changes one of
# them cannot continue the saved run exactly, so resume refuses it.
RESUME_KEYS = ("data", "max_length", "packing", "micro_batch_size", "grad_accum", "epochs", "max_steps", "seed",
               "lr", "warmup_ratio", "weight_decay", "loss_type", "beta", "gamma", "dtype")


def checkpoint_dir(cfg) -> Path:
    return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else Path(cfg.output) / "checkpoints"


def data_order(n_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled item order of ``epoch``: the same for a straight run and a resumed one."""
    rng = random.Random(seed)
    order = list(range(n_items))
    for _ in range(epoch + 1):
        order = list(range(n_items))
        rng.shuffle(order)
    return order


class PostTrainCheckpointer:
    """Periodic, verified checkpoints of a post-training run, in the pretraining trainer's
    format (:func:`olmo2.train.checkpoint.save_checkpoint`: model and optimizer through
    DCP, sharded as they are under FSDP2, so a run resumes on another number of ranks;
    RNG states, ``trainer.json``, the resolved config as ``config.yaml``, a
    ``manifest.json`` of sha256s written last, the folder renamed into place, ``latest``
    updated last; collective under ``torchrun``). ``trainer.json`` holds the step, the
    data position (epoch, next item), the scheduler state, the resume-relevant config,
    the data file's sha256 (a resume on other data is refused) and ``extra`` (DPO: the
    reference log-probs file and its sha256) and ``precision``, the resolved compute
    precision (bf16 or fp32: ``cfg.precision="auto"`` resolves by device), which a
    resume must share: the run's numbers depend on it."""

    def __init__(self, cfg, model, optimizer, scheduler, n_items: int, log, precision: str | None = None):
        from .files import file_digest

        self.cfg, self.model, self.optimizer, self.scheduler, self.log = cfg, model, optimizer, scheduler, log
        self.precision = precision
        self.root = checkpoint_dir(cfg)
        self.n_items = n_items
        self.data_sha256 = file_digest(cfg.data)
        self.resumed_from: Path | None = None

    def resume(self) -> dict | None:
        """Load the newest checkpoint that verifies (None when there is none); refuse one
        saved with a different data order or schedule."""
        from .train.checkpoint import load_newest_good

        path, state = load_newest_good(self.root, self.model, self.optimizer, log=self.log, move_damaged=True)
        if state is None:
            return None
        saved = state["config"]
        digest = state.get("data_sha256")
        if digest is not None and digest != self.data_sha256:
            raise ValueError(f"--data {self.cfg.data} (sha256 {self.data_sha256[:16]}) is not the data checkpoint "
                             f"{path} was trained on ({saved.get('data')}, sha256 {digest[:16]}): resume needs "
                             "the same data (or another checkpoint_dir to start afresh)")
        for key in RESUME_KEYS:
            if key in saved and saved[key] != getattr(self.cfg, key, None):
                raise ValueError(f"{key}={getattr(self.cfg, key)!r} differs from {saved[key]!r} in checkpoint {path}: "
                                 f"resume needs the same value (or another checkpoint_dir to start afresh)")
        saved_precision = state.get("precision")
        if self.precision is not None and saved_precision is not None and saved_precision != self.precision:
            raise ValueError(f"precision={self.cfg.precision!r} (here {self.precision}) differs from "
                             f"{saved_precision!r} in checkpoint {path}: resume needs the same value (or another "
                             "checkpoint_dir)")
        if state["n_items"] != self.n_items:
            raise ValueError(f"--data has {self.n_items} usable items, checkpoint {path} was trained on "
                             f"{state['n_items']}: resume needs the same data")
        self.scheduler.load_state_dict(state["scheduler"])
        self.resumed_from = path
        self.log(f"resumed from {path} at step {state['step']} (epoch {state['epoch']}, item {state['position']})")
        return state

    def save(self, step: int, epoch: int, position: int, extra: dict | None = None) -> Path:
        from .train.checkpoint import save_checkpoint

        from omegaconf import OmegaConf

        state = {"epoch": epoch, "position": position, "n_items": self.n_items, "data_sha256": self.data_sha256,
                 "scheduler": self.scheduler.state_dict(), "config": dataclasses.asdict(self.cfg),
                 **({"precision": self.precision} if self.precision is not None else {}), **(extra or {})}
        path = save_checkpoint(self.root, step, self.model, self.optimizer, state,
                               config_yaml=OmegaConf.to_yaml(dataclasses.asdict(self.cfg)),
                               keep_last=self.cfg.keep_last)
        self.log(f"saved {path}")
        return path


# --------------------------------------------------------------------------- the loop
def _log(text: str) -> None:
    print(f"olmo2-sft: {text}", file=sys.stderr, flush=True)


def load_tokenizer_for(model_path: str, tokenizer_spec: str):
    """The tokenizer and its spec: ``tokenizer_spec``, else the model folder's tokenizer.json, else dolma2."""
    from .tokenizers import load_tokenizer

    folder = Path(model_path)
    if not tokenizer_spec:
        tokenizer_spec = str(folder) if (folder / "tokenizer.json").is_file() else "dolma2"
    return load_tokenizer(tokenizer_spec), tokenizer_spec


@dataclass
class Parallel:
    """The process group and the model of a post-training run: ``model`` is what is
    called (FSDP2-sharded or DDP-wrapped), ``base`` the Olmo2ForCausalLM under it."""
    dist: DistInfo
    strategy: str
    model: nn.Module
    base: Olmo2ForCausalLM
    precision: str = "fp32"

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def autocast(self):
        """bf16 autocast where FSDP2's mixed precision does not already cast (DDP or one GPU)."""
        from .train.parallel import autocast_context

        return autocast_context(self.device, self.precision, self.strategy)

    def barrier(self) -> None:
        if self.dist.distributed:
            torch.distributed.barrier()


def setup_model(cfg, packing: bool = False) -> Parallel:
    """Join the process group (``torchrun``'s, or one process), load the HF folder
    ``cfg.model`` in ``cfg.dtype`` and apply ``cfg.strategy`` (:func:`load_parallel`)."""
    from .train.parallel import init_distributed, resolve_precision, resolve_strategy

    dist_info = init_distributed(cfg.device or "auto")
    strategy = resolve_strategy(cfg.strategy, dist_info.world_size)
    precision = resolve_precision(getattr(cfg, "precision", "fp32"), dist_info.device)
    if precision == "bf16" and dist_info.device.type != "cuda":
        raise ValueError("precision=bf16 is for GPUs; use fp32 (or auto) on CPU")
    model, base = load_parallel(cfg.model, cfg.dtype, dist_info, strategy, precision, packing)
    return Parallel(dist_info, strategy, model, base, precision)


def load_parallel(folder, dtype_name: str, dist_info: DistInfo, strategy: str, precision: str,
                  packing: bool = False) -> tuple[nn.Module, Olmo2ForCausalLM]:
    """The HF folder's model under ``strategy``: the module to call and the
    Olmo2ForCausalLM under it. With FSDP2 every rank builds the model on meta and
    shards it; rank 0 reads the weights and broadcasts them into the shards (no rank
    holds a second full copy on the device)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .checkpoint_hf import load_pretrained
    from .config import Olmo2Config
    from .dtypes import DTYPES
    from .train.parallel import parallelize

    dtype = DTYPES[dtype_name]
    folder = Path(folder)
    if strategy == "fsdp":
        if not folder.is_dir():
            raise FileNotFoundError(f"--model {folder}: not a folder")
        model = Olmo2ForCausalLM.from_config(Olmo2Config.from_hf(folder), device="meta", dtype=dtype)
    else:
        model = load_pretrained(folder, dtype=dtype, device=dist_info.device)
    if packing and model.config.attn_backend == "flash_attn":
        model.set_attn_backend("sdpa")  # flash_attn takes no mask; packing needs the document mask
    base = model
    if strategy == "fsdp":
        model = parallelize(model, "fsdp", dist_info.device, precision)
        model.to_empty(device=dist_info.device)
        full = load_pretrained(folder, dtype=dtype, device="cpu").state_dict() if dist_info.is_main else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model = parallelize(model, strategy, dist_info.device, precision)
    return model, base


def export_model(par: Parallel, out: Path, tokenizer_spec: str, cfg, config_name: str) -> None:
    """Write the HF folder ``out`` (weights, tokenizer, chat template, the resolved
    config): from a full state dict gathered on rank 0 when the model is sharded."""
    from .checkpoint_hf import save_pretrained
    from .tokenizers import save_tokenizer
    from .train.checkpoint import model_state_dict, run_agreed

    model = par.base
    if par.strategy == "fsdp":
        full = model_state_dict(par.model, full=True)  # collective
        if par.dist.is_main:
            model = Olmo2ForCausalLM.from_config(par.base.config, device="meta")
            model.load_state_dict(full, assign=True)

    def write() -> None:
        if par.dist.is_main:
            save_pretrained(model, out, chat_template=CHAT_TEMPLATE)
            save_tokenizer(tokenizer_spec, out)
            write_config(out / config_name, cfg)

    run_agreed(write, f"writing the Hugging Face export {out}")  # every rank raises when rank 0 failed


def write_config(path: Path, cfg) -> None:
    from .files import atomic_write

    with atomic_write(path) as f:
        f.write(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")


def pad_id_for(tokenizer, vocab_size: int) -> int:
    pad_id = tokenizer.token_to_id("<|pad|>")
    return pad_id if pad_id is not None and pad_id < vocab_size else tokenizer.token_to_id("<|endoftext|>")


def build_optimizer(cfg, par: Parallel, total_steps: int):
    optimizer = torch.optim.AdamW(par.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    return optimizer, linear_schedule(optimizer, total_steps, cfg.warmup_ratio)


def train_sft(cfg: SFTConfig, log=_log) -> dict:
    """Run SFT as ``cfg`` says (on every rank of a ``torchrun`` launch); write the HF
    folder ``cfg.output``. Returns ``{"losses": [...], "steps": n, "bad_records": k}``."""
    torch.manual_seed(cfg.seed)
    par = setup_model(cfg, packing=cfg.packing)
    log = log if par.dist.is_main else (lambda text: None)
    tokenizer, tokenizer_spec = load_tokenizer_for(cfg.model, cfg.tokenizer)
    examples, report = read_chat_jsonl(cfg.data, tokenizer, cfg.max_length)
    log(report.summary())
    if not examples:
        raise ValueError(f"--data {cfg.data}: no usable records")
    rows = pack(examples, cfg.max_length, cfg.packing)
    per_step = cfg.micro_batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(rows) / per_step)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    pad_id = pad_id_for(tokenizer, par.base.config.vocab_size)
    heldout = None
    if cfg.eval.data:
        eval_rows = pack(read_heldout(cfg, read_chat_jsonl, tokenizer, log), cfg.max_length, cfg.packing)

        def heldout() -> dict[str, float]:
            loss, count = heldout_loss(par.base, eval_rows, cfg.micro_batch_size, pad_id, cfg.packing, par.device,
                                       par.dist, par.autocast)
            return {"loss": loss, "target_tokens": count}

    evaluation = InLoopEvaluation.build(cfg, par, total_steps, tokenizer_spec, heldout, log)

    optimizer, scheduler = build_optimizer(cfg, par, total_steps)
    log(f"{len(examples)} conversations in {len(rows)} rows; {total_steps} steps of {per_step} rows "
        f"({par.strategy} on {par.dist.world_size} rank(s))")
    checkpointer = PostTrainCheckpointer(cfg, par.model, optimizer, scheduler, len(rows), log, par.precision)
    state = checkpointer.resume()

    def one_step(indices: list[int]) -> dict:
        chunk = [rows[i] for i in indices]
        micro = [collate(chunk[i : i + cfg.micro_batch_size], pad_id, cfg.packing)
                 for i in range(0, len(chunk), cfg.micro_batch_size)]
        loss, count = step_loss(par.model, micro, par.device, par.dist, par.autocast)
        return {"loss": loss, "target_tokens": count}

    def describe(row: dict, lr: float) -> str:
        return f"loss {row['loss']:.4f} tokens {row['target_tokens']} lr {lr:.3g}"

    step, history = run_steps(cfg, par, checkpointer, optimizer, scheduler, state, total_steps, len(rows), per_step,
                              one_step, describe, evaluation, log, tokenizer_spec, "olmo2-sft", "sft_config.json")
    losses = [row["loss"] for row in history]
    return {"losses": losses, "steps": step, "bad_records": len(report.bad)}


def read_heldout(cfg, reader, tokenizer, log) -> list:
    """The usable records of ``cfg.eval.data`` (``reader``: the training data's), the
    first ``eval.max_examples`` of them; bad records are reported by line as for the data."""
    if not Path(cfg.eval.data).is_file():
        raise FileNotFoundError(f"eval.data {cfg.eval.data}: no such file")
    examples, report = reader(cfg.eval.data, tokenizer, cfg.max_length)
    log(f"eval.data {report.summary()}")
    if cfg.eval.max_examples:
        examples = examples[: cfg.eval.max_examples]
    if not examples:
        raise ValueError(f"eval.data {cfg.eval.data}: no usable records")
    return examples


def finish_run(par: Parallel, cfg, step: int, total_steps: int, tokenizer_spec: str, config_name: str,
               log) -> None:
    """The end of an SFT or DPO run: the HF export once every step is done, else
    (``hard_stop``) a line saying how to continue."""
    if step < total_steps:
        log(f"hard_stop: stopped after step {step} of {total_steps}; rerun without hard_stop to continue")
        return
    par.model.eval()
    export_model(par, Path(cfg.output), tokenizer_spec, cfg, config_name)
    log(f"wrote {cfg.output}")


def run_steps(cfg, par: Parallel, checkpointer: PostTrainCheckpointer, optimizer, scheduler, state: dict | None,
              total_steps: int, n_items: int, per_step: int, one_step, describe, evaluation, log,
              tokenizer_spec: str, command: str, config_name: str, extra: dict | None = None,
              bar_keys: tuple[str, ...] = ("loss", "grad_norm", "lr")) -> tuple[int, list[dict]]:
    """The step loop SFT and DPO share, from ``state`` (a resumed checkpoint's, or None):
    each step ``one_step(indices)`` (the step's items of this epoch's order) computes the
    gradients and returns its metrics (``loss`` first), then the optimizer and schedule
    step; metrics are logged (``describe(row, lr)``: the console line), ``evaluation`` runs
    at its interval (and at step 0 with ``eval.at_start``), checkpoints are saved every
    ``save_interval`` steps and at the end (``extra`` recorded in each), and the run ends
    with :func:`finish_run`. Returns (the last step, the steps' metrics)."""
    step, first_epoch, position = (state["step"], state["epoch"], state["position"]) if state else (0, 0, 0)
    history: list[dict] = []
    par.model.train()
    stop = min(total_steps, cfg.hard_stop) if cfg.hard_stop else total_steps
    saved_step = step if state else -1
    metrics = open_metrics(cfg, par, total_steps, step)
    log = checkpointer.log = metrics.console(log)  # lines printed around the progress bar, when there is one
    try:
        if evaluation is not None and step == 0:
            evaluation.maybe(0, metrics, log)  # eval.at_start
        for epoch in range(first_epoch, cfg.epochs):
            order = data_order(n_items, cfg.seed, epoch)
            for start in range(position if epoch == first_epoch else 0, len(order), per_step):
                if step >= stop:
                    break
                started = time.perf_counter()
                row = one_step(order[start : start + per_step])
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"{command}: non-finite loss {row['loss']} at step {step}")
                lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                history.append(row)
                metrics.log(step, {**row, "lr": lr, "epoch": epoch,
                                   "step_time_s": round(time.perf_counter() - started, 4)}, bar_keys=bar_keys)
                if metrics.bar is None:  # with progress=true the bar shows the step
                    log(f"step {step}/{total_steps} {describe(row, lr)}")
                if evaluation is not None:
                    evaluation.maybe(step, metrics, log)
                next_epoch, next_pos = (epoch, start + per_step) if start + per_step < len(order) else (epoch + 1, 0)
                if step == stop or (cfg.save_interval and step % cfg.save_interval == 0):
                    checkpointer.save(step, next_epoch, next_pos, extra)
                    saved_step = step
            if step >= stop:
                break
        if saved_step != step:
            checkpointer.save(step, cfg.epochs, 0, extra)
    finally:
        metrics.close()
    finish_run(par, cfg, step, total_steps, tokenizer_spec, config_name, log)
    return step, history


def open_metrics(cfg, par: Parallel, total_steps: int, start_step: int):
    """``output/metrics.jsonl``, one line per step, written by rank 0 through the pretraining
    trainer's sink (:class:`olmo2.train.metrics.MetricsLogger`: on resume, lines after the
    resumed step are dropped; ``output/tensorboard`` when ``cfg.tensorboard`` and tensorboard
    is installed; a tqdm bar with ``cfg.progress``). A run that
    starts from step 0 drops every line an earlier attempt left (its step-0 evaluation
    too, which the logger would keep: it keeps the lines up to the step it starts at)."""
    from .train.metrics import MetricsLogger

    return MetricsLogger(cfg.output, total_steps, start_step=start_step if start_step else -1,
                         enabled=par.dist.is_main, progress=cfg.progress, tensorboard=cfg.tensorboard)


class InLoopEvaluation:
    """What an SFT or DPO run evaluates every ``eval.interval`` steps and after its last
    step: the held-out data (``heldout()``, logged as ``eval/<metric>``), the verified
    answers to ``eval.prompts`` (``verified()``, ``eval/verified_<metric>``) and the OLMES
    tasks (:class:`olmo2.train.evaluation.DownstreamEvaluator`, logged as
    ``downstream/<task>/<metric>``), into ``metrics.jsonl`` as a line of their own at
    the step. Stateless: the steps that evaluate follow from the step, so a resumed
    run evaluates where an uninterrupted one does; no forward here changes the
    weights, the optimizer state or an RNG, so the training is the same with or
    without it (a test checks the weights bitwise)."""

    def __init__(self, cfg, total_steps: int, par: Parallel, heldout=None, downstream=None, verified=None):
        self.cfg, self.total_steps, self.par = cfg, total_steps, par
        self.heldout, self.downstream, self.verified = heldout, downstream, verified

    @classmethod
    def build(cls, cfg, par: Parallel, total_steps: int, tokenizer_spec: str, heldout,
              log) -> "InLoopEvaluation | None":
        """The component of ``cfg.eval`` (None when evaluation is off); the OLMES tasks
        are read and tokenized now, once."""
        if not cfg.eval.enabled:
            return None
        downstream = None
        if cfg.eval.tasks:
            from .train.evaluation import DownstreamEvalConfig, DownstreamEvaluator

            tasks = DownstreamEvalConfig(tasks=list(cfg.eval.tasks), interval=cfg.eval.interval,
                                         limit=cfg.eval.task_limit or None, tokenizer=tokenizer_spec,
                                         max_length=cfg.max_length)
            downstream = DownstreamEvaluator.build(tasks, run_tokenizer=tokenizer_spec, seq_len=cfg.max_length,
                                                   vocab_size=par.base.config.vocab_size, max_steps=total_steps,
                                                   log=log)
        verified = verified_evaluation(cfg, par, tokenizer_spec, log) if cfg.eval.prompts else None
        return cls(cfg, total_steps, par, heldout, downstream, verified)

    def due(self, step: int) -> bool:
        return self.cfg.eval.due(step, self.total_steps)

    def __call__(self, step: int) -> dict[str, float]:
        """Evaluate now (collective under ``torchrun``: every rank calls it); the record, the same on every rank."""
        started = time.perf_counter()
        record: dict[str, float] = {}
        if self.heldout is not None:
            record.update({f"eval/{k}": v for k, v in self.heldout().items()})
        if self.verified is not None:
            record.update(self.verified())
        if self.downstream is not None:
            record.update(self.downstream(self.par.base, step, autocast=self.par.autocast))
        record["eval/seconds"] = round(time.perf_counter() - started, 4)
        return record

    def maybe(self, step: int, metrics, log) -> None:
        """Evaluate if ``step`` is due, into ``metrics.jsonl`` (a line of its own) and the log."""
        if self.due(step):
            record = self(step)
            metrics.log(step, record)
            log(f"eval at step {step}: {eval_summary(record)}")


def verified_evaluation(cfg, par: Parallel, tokenizer_spec: str, log):
    """The verified-answer evaluation of ``eval.prompts`` (RL's prompt format and scoring,
    :func:`olmo2.rl.evaluation.evaluate_ranks`): a function returning ``eval/verified_accuracy``
    (share of greedy answers the record's verifier accepts), ``eval/verified_reward`` and, with
    ``eval.samples``, ``eval/verified_sampled_accuracy``. Prompts longer than ``max_length``
    tokens are bad records, reported by line. Collective under ``torchrun``: each rank answers
    its share with the weights gathered; the sampler draws from its own generator (seeded
    ``seed + 1 + rank``), so the training RNG is untouched."""
    from .rl.data import read_prompts
    from .rl.evaluation import evaluate_ranks
    from .tokenizers import load_tokenizer

    ev = cfg.eval
    if not Path(ev.prompts).is_file():
        raise FileNotFoundError(f"eval.prompts {ev.prompts}: no such file")
    tokenizer = load_tokenizer(tokenizer_spec)
    if tokenizer.token_to_id("<|endoftext|>") is None:
        raise ValueError(f"eval.prompts: tokenizer {tokenizer_spec} has no <|endoftext|> token (the chat "
                         "template's EOS, where answers stop)")
    prompts, report = read_prompts(ev.prompts, tokenizer, cfg.max_length)
    log(f"eval.prompts {report.summary()}")
    if ev.prompts_limit:
        prompts = prompts[: ev.prompts_limit]
    if not prompts:
        raise ValueError(f"eval.prompts {ev.prompts}: no usable records")

    def verified() -> dict[str, float]:
        result = evaluate_ranks(par.model, par.base, tokenizer, prompts, ev.max_new_tokens, ev.samples,
                                ev.temperature, seed=cfg.seed + 1, autocast=par.autocast)
        return {f"eval/verified_{k}": result[k] for k in ("accuracy", "reward", "sampled_accuracy") if k in result}

    return verified


def eval_summary(record: dict[str, float]) -> str:
    """The log line of an evaluation record."""
    shown = {k: v for k, v in record.items() if k.startswith("eval/") or k.endswith("/primary")}
    return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
