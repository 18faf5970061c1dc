"""Direct preference optimization (Tülu 3's length-normalized DPO) of an OLMo 2 HF checkpoint.

What this module owns: :class:`DPOConfig` and presets, :func:`sequence_logps`
(per-sequence log-probabilities through the fused LM head), :func:`dpo_loss`
(``"dpo_norm"``, ``"dpo"``, ``"simpo"``), the reference pass and the loop
(:func:`train_dpo`), which writes an HF folder with tokenizer and chat template.

* **Log-probabilities** come from the final hidden states and the LM head through
  ``olmo2_kernels.linear_cross_entropy(reduction="none")`` (``model(..., labels,
  reduction="none")``): per-token ``-log p`` with no (B, T, V) logits; summed over
  each sequence's labelled (assistant) tokens. Chosen and rejected go through one
  forward (rows ``[chosen..., rejected...]``).
* **Length-normalized DPO** (Tülu 3, ``loss_type="dpo_norm"``): with
  ``a(x) = log p(x) / |x|`` the average log-probability per response token,
  ``loss = -log sigmoid(beta * ((a_pi(c) - a_ref(c)) - (a_pi(r) - a_ref(r))))``.
  ``"dpo"`` uses the sums instead of the averages; ``"simpo"`` has no reference:
  ``-log sigmoid(beta * (a_pi(c) - a_pi(r)) - gamma)``.
* **Reference**: the frozen reference is the starting policy, so its
  log-probabilities are computed once, in a first no-grad pass over the data
  before the first step, and cached (in memory, and in ``reference_logps.pt``
  beside the output when ``ref_cache`` names a file). Memory cost: two floats
  per pair, instead of a second copy of the weights (a 7B bf16 model: 14 GB).
* The loss of a step is the mean over its pairs, whatever the micro-batch split.

* **Resume** as for SFT (:class:`olmo2.sft.PostTrainCheckpointer`); ``trainer.json`` also
  names the reference log-probs file, which a resumed run reads instead of
  recomputing (the checkpoint's policy is no longer the reference).

Not yet: FSDP/DDP.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .chat import CHAT_TEMPLATE, IGNORE_INDEX, read_preference_jsonl
from .model import Olmo2ForCausalLM
from .sft import PostTrainCheckpointer, Row, checkpoint_dir, collate, data_order, load_model_and_tokenizer

LOSS_TYPES = ("dpo_norm", "dpo", "simpo")


@dataclass
class DPOConfig:
    model: str = ""  # HF folder of the SFT model (policy and reference)
    data: str = ""  # preference JSONL
    output: str = ""
    tokenizer: str = ""
    loss_type: str = "dpo_norm"
    beta: float = 5.0
    gamma: float = 0.5  # SimPO's target margin
    max_length: int = 2048
    micro_batch_size: int = 1  # pairs per forward
    grad_accum: int = 128
    lr: float = 5e-7
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int = 0
    seed: int = 123
    dtype: str = "float32"
    device: str = ""
    ref_cache: str = ""  # file for the reference log-probs; empty: output/reference_logps.pt
    save_interval: int = 100  # steps between checkpoints (and one at the end); 0: only at the end
    keep_last: int = 2  # checkpoints kept (0: all)
    checkpoint_dir: str = ""  # empty: output/checkpoints; a rerun of the same command resumes from it
    hard_stop: int = 0  # stop (with a checkpoint) after this step without changing the schedule; 0: off

    def __post_init__(self) -> None:
        for name in ("save_interval", "keep_last", "hard_stop"):
            if getattr(self, name) < 0:
                raise ValueError(f"DPOConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        for name in ("max_length", "micro_batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"DPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.beta <= 0 or self.lr <= 0:
            raise ValueError(f"DPOConfig: beta and lr must be > 0, got beta={self.beta}, lr={self.lr}")


# Tülu 3 DPO (arXiv:2411.15124, DPO hyperparameter table): length-normalized
# DPO, beta 5, effective batch 128 pairs, max length 2048, linear schedule with
# warmup ratio 0.1, 1 epoch; lr 5e-7 for Tülu 3 8B. OLMo 2 7B Instruct's DPO lr
# 1e-6 (OLMo 2 report, arXiv:2501.00656). Recalled from the papers, not
# re-checked in this session: verify before a real run.
PRESETS: dict[str, dict] = {
    "tulu3_8b": dict(loss_type="dpo_norm", beta=5.0, lr=5e-7, max_length=2048, micro_batch_size=1, grad_accum=128,
                     warmup_ratio=0.1, epochs=1),
    "olmo2_7b": dict(loss_type="dpo_norm", beta=5.0, lr=1e-6, max_length=2048, micro_batch_size=1, grad_accum=128,
                     warmup_ratio=0.1, epochs=1),
}


def sequence_logps(model: Olmo2ForCausalLM, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(sum of log p over each row's labelled tokens, their count)``, both (B,),
    from the fused LM head (``reduction="none"``, no z-loss): no (B, T, V) logits."""
    out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"], reduction="none")
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    return -out.ce_loss.sum(1), counts


def pair_batch(pairs: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Chosen rows then rejected rows, right-padded, for one forward."""
    rows = [Row(ids, labels, list(range(len(ids))), [0] * len(ids))
            for key in ("chosen", "rejected") for ids, labels in (p[key] for p in pairs)]
    return collate(rows, pad_id, packing=False)


def dpo_loss(
    pi_c: Tensor, pi_r: Tensor, ref_c: Tensor | None, ref_r: Tensor | None, n_c: Tensor, n_r: Tensor,
    beta: float, loss_type: str = "dpo_norm", gamma: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses (B,) and metrics, from sequence log-prob sums and token counts."""
    if loss_type == "dpo_norm":
        chosen = (pi_c - ref_c) / n_c
        rejected = (pi_r - ref_r) / n_r
        logits = beta * (chosen - rejected)
    elif loss_type == "dpo":
        chosen, rejected = pi_c - ref_c, pi_r - ref_r
        logits = beta * (chosen - rejected)
    elif loss_type == "simpo":
        chosen, rejected = pi_c / n_c, pi_r / n_r
        logits = beta * (chosen - rejected) - gamma
    else:
        raise ValueError(f"dpo_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    losses = -F.logsigmoid(logits)
    r_c, r_r = (beta * chosen).detach(), (beta * rejected).detach()
    metrics = {"reward_chosen": r_c, "reward_rejected": r_r, "margin": r_c - r_r,
               "accuracy": (r_c > r_r).float(), "logp_chosen": pi_c.detach(), "logp_rejected": pi_r.detach()}
    return losses, metrics


@torch.no_grad()
def reference_logps(model: Olmo2ForCausalLM, pairs: list[dict], pad_id: int, batch_size: int, device) -> Tensor:
    """(N, 2) reference log-prob sums [chosen, rejected] of every pair, in one no-grad pass."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        b = {k: v.to(device) for k, v in pair_batch(chunk, pad_id).items()}
        logps, _ = sequence_logps(model, b)
        out.append(torch.stack([logps[: len(chunk)], logps[len(chunk) :]], 1).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _log(text: str) -> None:
    print(f"olmo2-dpo: {text}", file=sys.stderr, flush=True)


def train_dpo(cfg: DPOConfig, log=_log) -> dict:
    """Run DPO as ``cfg`` says; write the HF folder ``cfg.output``. Returns per-step metrics."""
    from .checkpoint_hf import save_pretrained
    from .dtypes import DTYPES
    from .files import atomic_write
    from .sft import linear_schedule
    from .tokenizers import save_tokenizer
    from .train.checkpoint import list_checkpoints

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model, tokenizer, tokenizer_spec = load_model_and_tokenizer(cfg.model, cfg.tokenizer, DTYPES[cfg.dtype], device)
    pairs, report = read_preference_jsonl(cfg.data, tokenizer, cfg.max_length)
    log(report.summary())
    if not pairs:
        raise ValueError(f"--data {cfg.data}: no usable records")
    pad_id = tokenizer.token_to_id("<|pad|>")
    pad_id = pad_id if pad_id is not None and pad_id < model.config.vocab_size else tokenizer.token_to_id("<|endoftext|>")
    out = Path(cfg.output)
    per_step = cfg.micro_batch_size * cfg.grad_accum
    total_steps = math.ceil(len(pairs) / per_step) * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, total_steps, cfg.warmup_ratio)
    checkpointer = PostTrainCheckpointer(cfg, model, optimizer, scheduler, len(pairs), log)

    ref = None
    cache = Path(cfg.ref_cache) if cfg.ref_cache else out / "reference_logps.pt"
    resuming = cfg.loss_type != "simpo" and bool(list_checkpoints(checkpoint_dir(cfg)))
    if cfg.loss_type != "simpo":
        if resuming and cache.is_file():
            # The policy in the checkpoint is no longer the reference: the cached pass is.
            ref = torch.load(cache, weights_only=True)["logps"]
            if ref.shape != (len(pairs), 2):
                raise ValueError(f"ref_cache {cache}: holds {tuple(ref.shape)} log-probs, the data has "
                                 f"{len(pairs)} pairs")
            log(f"reference log-probs of {len(pairs)} pairs read from {cache}")
        elif resuming:
            raise FileNotFoundError(f"ref_cache {cache}: missing, and the checkpoints in {checkpoint_dir(cfg)} hold "
                                    "a trained policy, not the reference; restore the file or start afresh")
        else:
            ref = reference_logps(model, pairs, pad_id, cfg.micro_batch_size, device)
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(cache, "wb", encoding=None) as f:
                torch.save({"data": str(cfg.data), "model": str(cfg.model), "logps": ref}, f)
            log(f"reference log-probs of {len(pairs)} pairs cached in {cache}")
    extra = {"ref_cache": str(cache) if ref is not None else None}

    state = checkpointer.resume()
    step, first_epoch, position = (state["step"], state["epoch"], state["position"]) if state else (0, 0, 0)
    stop = min(total_steps, cfg.hard_stop) if cfg.hard_stop else total_steps
    saved_step = step if state else -1
    history: list[dict] = []
    model.train()
    for epoch in range(first_epoch, cfg.epochs):
        order = data_order(len(pairs), cfg.seed, epoch)
        for start in range(position if epoch == first_epoch else 0, len(order), per_step):
            if step >= stop:
                break
            idx = order[start : start + per_step]
            sums = {k: 0.0 for k in ("loss", "margin", "accuracy", "logp_chosen", "logp_rejected")}
            for j in range(0, len(idx), cfg.micro_batch_size):
                sub = idx[j : j + cfg.micro_batch_size]
                b = {k: v.to(device) for k, v in pair_batch([pairs[i] for i in sub], pad_id).items()}
                logps, counts = sequence_logps(model, b)
                n = len(sub)
                ref_c = ref_r = None
                if ref is not None:
                    r = ref[sub].to(device=device, dtype=logps.dtype)
                    ref_c, ref_r = r[:, 0], r[:, 1]
                losses, m = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, counts[:n], counts[n:],
                                     cfg.beta, cfg.loss_type, cfg.gamma)
                (losses.sum() / len(idx)).backward()
                sums["loss"] += float(losses.detach().sum())
                for k in ("margin", "accuracy", "logp_chosen", "logp_rejected"):
                    sums[k] += float(m[k].sum())
            row = {k: v / len(idx) for k, v in sums.items()}
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"olmo2-dpo: non-finite loss {row['loss']} at step {step}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(row)
            log(f"step {step}/{total_steps} " + " ".join(f"{k} {v:.4f}" for k, v in row.items()))
            next_epoch, next_pos = (epoch, start + per_step) if start + per_step < len(order) else (epoch + 1, 0)
            if step == stop or (cfg.save_interval and step % cfg.save_interval == 0):
                checkpointer.save(step, next_epoch, next_pos, extra)
                saved_step = step
        if step >= stop:
            break
    if saved_step != step:
        checkpointer.save(step, cfg.epochs, 0, extra)
    if step < total_steps:
        log(f"hard_stop: stopped after step {step} of {total_steps}; rerun without hard_stop to continue")
        return {"history": history, "steps": step, "bad_records": len(report.bad)}
    model.eval()
    save_pretrained(model, out, chat_template=CHAT_TEMPLATE)
    save_tokenizer(tokenizer_spec, out)
    (out / "dpo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    log(f"wrote {out}")
    return {"history": history, "steps": step, "bad_records": len(report.bad)}
