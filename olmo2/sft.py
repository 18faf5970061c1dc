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
token stream (memmapped corpus, fixed-length windows, FSDP2/DDP, resumable data
position). SFT needs variable-length conversations, masks and per-document
positions; this first version is a small single-process loop over the same model,
kernels and HF checkpoints. Not yet here: FSDP2/DDP, in-loop evaluation.

* **Resume**: every ``save_interval`` steps and at the end, a verified checkpoint in
  the pretraining trainer's format (:class:`PostTrainCheckpointer`: model, optimizer,
  scheduler, data position, RNG) under ``output/checkpoints``; rerunning the same
  command continues from the newest one that verifies, bitwise as if never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .chat import CHAT_TEMPLATE, IGNORE_INDEX, read_chat_jsonl
from .model import Olmo2ForCausalLM, document_mask


@dataclass
class SFTConfig:
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
    dtype: str = "float32"
    device: str = ""
    save_interval: int = 100  # steps between checkpoints (and one at the end); 0: only at the end
    keep_last: int = 2  # checkpoints kept (0: all)
    checkpoint_dir: str = ""  # empty: output/checkpoints; a rerun of the same command resumes from it
    hard_stop: int = 0  # stop (with a checkpoint) after this step without changing the schedule; 0: off

    def __post_init__(self) -> None:
        for name in ("save_interval", "keep_last", "hard_stop"):
            if getattr(self, name) < 0:
                raise ValueError(f"SFTConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_length", "micro_batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"SFTConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0:
            raise ValueError(f"SFTConfig.lr must be > 0, got {self.lr}")


# Tülu 3 SFT hyperparameters for OLMo 2 Instruct, from the OLMo 2 report
# ("2 OLMo 2 Furious", arXiv:2501.00656, post-training hyperparameter table)
# and Tülu 3 (arXiv:2411.15124, SFT table): effective batch 128 sequences,
# max length 4096, linear schedule with warmup ratio 0.03, 2 epochs, weight
# decay 0; lr 2e-5 (7B) and 7.5e-6 (13B). Recalled from the papers, not
# re-checked against them in this session: verify before a real run.
# micro_batch_size x grad_accum = 128 on one process.
PRESETS: dict[str, dict] = {
    "olmo2_7b": dict(lr=2e-5, max_length=4096, micro_batch_size=1, grad_accum=128, warmup_ratio=0.03, epochs=2),
    "olmo2_13b": dict(lr=7.5e-6, max_length=4096, micro_batch_size=1, grad_accum=128, warmup_ratio=0.03, epochs=2),
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


def step_loss(model: Olmo2ForCausalLM, micro_batches: list[dict[str, Tensor]], device) -> tuple[float, int]:
    """Backward of one optimizer step's loss: summed token losses over all
    micro-batches / the step's target count (fixed before the first forward).
    Returns the loss value and the count."""
    total = sum(num_targets(b) for b in micro_batches)
    loss_sum = 0.0
    for b in micro_batches:
        b = {k: v.to(device) for k, v in b.items()}
        out = model(b["input_ids"], labels=b["labels"], attention_mask=b.get("attention_mask"),
                    position_ids=b["position_ids"], reduction="sum")
        (out.loss / max(total, 1)).backward()
        loss_sum += float(out.loss.detach())
    return loss_sum / max(total, 1), total


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
    DCP, RNG states, ``trainer.json``, a ``manifest.json`` of sha256s written last, the
    folder renamed into place, ``latest`` updated last). ``trainer.json`` holds the step,
    the data position (epoch, next item), the scheduler state, the resume-relevant config
    and ``extra`` (DPO: the reference log-probs file)."""

    def __init__(self, cfg, model, optimizer, scheduler, n_items: int, log):
        self.cfg, self.model, self.optimizer, self.scheduler, self.log = cfg, model, optimizer, scheduler, log
        self.root = checkpoint_dir(cfg)
        self.n_items = n_items

    def resume(self) -> dict | None:
        """Load the newest checkpoint that verifies (None when there is none); refuse one
        saved with a different data order or schedule."""
        from .train.checkpoint import load_newest_good

        path, state = load_newest_good(self.root, self.model, self.optimizer, log=self.log, move_damaged=True)
        if state is None:
            return None
        saved = state["config"]
        for key in RESUME_KEYS:
            if key in saved and saved[key] != getattr(self.cfg, key, None):
                raise ValueError(f"{key}={getattr(self.cfg, key)!r} differs from {saved[key]!r} in checkpoint {path}: "
                                 f"resume needs the same value (or another checkpoint_dir to start afresh)")
        if state["n_items"] != self.n_items:
            raise ValueError(f"--data has {self.n_items} usable items, checkpoint {path} was trained on "
                             f"{state['n_items']}: resume needs the same data")
        self.scheduler.load_state_dict(state["scheduler"])
        self.log(f"resumed from {path} at step {state['step']} (epoch {state['epoch']}, item {state['position']})")
        return state

    def save(self, step: int, epoch: int, position: int, extra: dict | None = None) -> Path:
        from .train.checkpoint import save_checkpoint

        state = {"epoch": epoch, "position": position, "n_items": self.n_items,
                 "scheduler": self.scheduler.state_dict(), "config": dataclasses.asdict(self.cfg), **(extra or {})}
        path = save_checkpoint(self.root, step, self.model, self.optimizer, state,
                               config_yaml=json.dumps(dataclasses.asdict(self.cfg), indent=1) + "\n",
                               keep_last=self.cfg.keep_last)
        self.log(f"saved {path}")
        return path


# --------------------------------------------------------------------------- the loop
def _log(text: str) -> None:
    print(f"olmo2-sft: {text}", file=sys.stderr, flush=True)


def load_model_and_tokenizer(model_path: str, tokenizer_spec: str, dtype: torch.dtype, device):
    from .checkpoint_hf import load_pretrained
    from .tokenizers import load_tokenizer

    folder = Path(model_path)
    if not tokenizer_spec:
        tokenizer_spec = str(folder) if (folder / "tokenizer.json").is_file() else "dolma2"
    model = load_pretrained(folder, dtype=dtype, device=device)
    return model, load_tokenizer(tokenizer_spec), tokenizer_spec


def train_sft(cfg: SFTConfig, log=_log) -> dict:
    """Run SFT as ``cfg`` says; write the HF folder ``cfg.output``. Returns
    ``{"losses": [...], "steps": n, "bad_records": k}``."""
    from .checkpoint_hf import save_pretrained
    from .dtypes import DTYPES
    from .tokenizers import save_tokenizer

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model, tokenizer, tokenizer_spec = load_model_and_tokenizer(cfg.model, cfg.tokenizer, DTYPES[cfg.dtype], device)
    if cfg.packing and model.config.attn_backend == "flash_attn":
        model.set_attn_backend("sdpa")  # flash_attn takes no mask; packing needs the document mask
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
    pad_id = tokenizer.token_to_id("<|pad|>")
    pad_id = pad_id if pad_id is not None and pad_id < model.config.vocab_size else tokenizer.token_to_id("<|endoftext|>")

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, total_steps, cfg.warmup_ratio)
    log(f"{len(examples)} conversations in {len(rows)} rows; {total_steps} steps of {per_step} rows")
    checkpointer = PostTrainCheckpointer(cfg, model, optimizer, scheduler, len(rows), log)
    state = checkpointer.resume()
    step, first_epoch, position = (state["step"], state["epoch"], state["position"]) if state else (0, 0, 0)
    losses: list[float] = []
    model.train()
    stop = min(total_steps, cfg.hard_stop) if cfg.hard_stop else total_steps
    saved_step = step if state else -1
    for epoch in range(first_epoch, cfg.epochs):
        order = data_order(len(rows), cfg.seed, epoch)
        for start in range(position if epoch == first_epoch else 0, len(order), per_step):
            if step >= stop:
                break
            chunk = [rows[i] for i in order[start : start + per_step]]
            micro = [collate(chunk[i : i + cfg.micro_batch_size], pad_id, cfg.packing)
                     for i in range(0, len(chunk), cfg.micro_batch_size)]
            loss, count = step_loss(model, micro, device)
            if not math.isfinite(loss):
                raise FloatingPointError(f"olmo2-sft: non-finite loss {loss} at step {step}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            step += 1
            log(f"step {step}/{total_steps} loss {loss:.4f} tokens {count} lr {scheduler.get_last_lr()[0]:.3g}")
            next_epoch, next_pos = (epoch, start + per_step) if start + per_step < len(order) else (epoch + 1, 0)
            if step == stop or (cfg.save_interval and step % cfg.save_interval == 0):
                checkpointer.save(step, next_epoch, next_pos)
                saved_step = step
        if step >= stop:
            break
    if saved_step != step:
        checkpointer.save(step, cfg.epochs, 0)
    if step < total_steps:
        log(f"hard_stop: stopped after step {step} of {total_steps}; rerun without hard_stop to continue")
        return {"losses": losses, "steps": step, "bad_records": len(report.bad)}
    model.eval()
    out = Path(cfg.output)
    save_pretrained(model, out, chat_template=CHAT_TEMPLATE)
    save_tokenizer(tokenizer_spec, out)
    (out / "sft_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    log(f"wrote {out}")
    return {"losses": losses, "steps": step, "bad_records": len(report.bad)}
