"""The RL-with-verifiable-rewards loop (GRPO) over an OLMo 2 HF checkpoint (``olmo2-rl``).

What this module owns: :class:`RLConfig` and its presets, one rollout
(:func:`rollout`: sample, verify, reward, group advantages), the updates on it
(:func:`update`), and the loop (:func:`train_rl`) with held-out evaluation
(:func:`olmo2.rl.evaluation.evaluate_ranks`), metrics, checkpoints for exact resume
and the HF export.

Per step: ``prompts_per_step`` prompts (B) in the seeded data order, ``k``
completions each from :func:`olmo2.generation.sample` (KV cache; the sampled
tokens' log-probs come from the decode pass), a reward per completion from its
record's verifier (:func:`olmo2.rl.verifiers.reward`), advantages per group of
k (:func:`olmo2.rl.grpo.group_advantages`), then ``ppo_epochs`` passes over
the B*k completions in ``mini_batches`` optimizer steps each, the GRPO loss of
:mod:`olmo2.rl.grpo` on token log-probs through the fused LM head (no (B, T, V)
logits; micro-batches of ``micro_batch_size`` completions).

* **Ratio**: against the sampling policy's log-probs, by default those the
  sampler returned (``old_logprobs="sampler"``; raw ``log_softmax``, i.e. the
  policy at temperature 1). With one PPO epoch and one mini-batch the update
  runs on the policy that sampled, so the ratio is 1 up to float rounding
  between the cached decode and the full forward (a test checks it);
  ``"recompute"`` takes them from a no-grad forward instead (for a sampler in
  another precision or engine). Sampling at ``temperature != 1`` draws from a
  different distribution than the one in the ratio; Tülu 3 and OLMo 2 sample at 1.
* **Reference** (``beta > 0``): a frozen copy of the starting model kept in
  memory, its log-probs computed once per rollout in a no-grad forward (one
  extra forward per rollout, no backward). Memory: one more copy of the weights
  (a 7B model in bf16: 14 GB more; the tiny demo model: 13 MB); no optimizer
  state or gradients for it. With ``beta = 0`` (Dr. GRPO, open-instruct's
  zero-style runs) there is no copy and KL is not logged.
* **Resume**: as SFT and DPO (:class:`olmo2.sft.PostTrainCheckpointer`): model,
  optimizer, scheduler, RNG, step, the sampling mode and (``stream``) the generator's state; the data
  position is ``step * prompts_per_step`` in the seeded order. A rerun of the same
  command continues from the newest verified checkpoint, bitwise as if never stopped;
  one that changes what the run computes (a key of ``RL_RESUME_KEYS`` or
  :data:`olmo2.sft.RESUME_KEYS`, the data file's or the tokenizer's sha256) is refused
  in one line naming the key, both values and the checkpoint.
* **Several ranks** (``torchrun --nproc_per_node=N -m olmo2.cli.rl ...``; ``strategy``
  fsdp, ddp or none, the SFT/DPO setup :func:`olmo2.sft.setup_model`): the step's prompts
  are dealt to the ranks in turn (:class:`Layout`). Each rank samples its prompts, each
  prompt's k completions from a generator seeded by (seed, step, slot), the rank's prompts
  decoded together (:func:`olmo2.generation.sample` with one generator per prompt)
  (``sampling_seed=prompt``, the default under torchrun; ``stream``, one generator for
  the run, is kept for one process, where it is the default), so the samples, and so
  the run, do not depend on the number of ranks. A group lives on one rank: rewards and
  advantages need no communication. Under FSDP2 the rollout runs with the weights
  gathered once (:func:`olmo2.train.parallel.gathered_weights`: one full copy per rank
  while sampling), so ranks decode different numbers of tokens without collectives.
  :func:`update` normalizes by the mini-batch's global token count (all-reduced): the
  gradient is one process's on the same global batch. The reference is sharded like the
  policy under FSDP2 (1/N of a copy per rank), a full copy per rank under DDP. Metrics
  are summed over ranks and logged by rank 0; evaluation prompts are split over the ranks.
  Checkpoints and the HF export as SFT (sharded DCP; a full state dict gathered on rank 0).
* **Precision** (``precision``, as SFT and DPO: :func:`olmo2.sft.setup_model`): bf16 is FSDP2's
  mixed precision or, under DDP and in one process, ``torch.autocast`` (:meth:`olmo2.sft.Parallel.autocast`)
  around every forward: the sampler (rollout and evaluation), the reference and recomputed log-probs and
  the update's forward; the loss is fp32. ``fp32`` computes exactly what the loop did before the key.
* **Metrics**: through pretraining's sink (:class:`olmo2.train.metrics.MetricsLogger`, as SFT and
  DPO: ``output/tensorboard`` when installed, ``progress=true`` for a bar): one line per step in ``output/metrics.jsonl`` (reward mean,
  accuracy = share of completions with reward > 0, advantage stats, share of
  groups with equal rewards, loss, KL, entropy estimate, clip fraction, ratio,
  completion length, stop reasons, generation and training tokens/s, lr,
  gradient norm), and ``eval/accuracy`` every ``eval_interval`` steps on ``eval_data``.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..chat import IGNORE_INDEX
from ..sft import (STRATEGIES, PostTrainCheckpointer, Row, check_output_is_not_model, collate, data_order,
                   linear_schedule)
from .data import Prompt, read_prompts
from .evaluation import evaluate_prompts, evaluate_ranks, greedy_completions  # noqa: F401 - re-exported
from .grpo import ADVANTAGE_SCALES, AGGREGATIONS, completion_mask, group_advantages, grpo_loss, token_logps, \
    token_weights


SAMPLING_SEEDS = ("auto", "stream", "prompt")


@dataclass
class RLConfig:
    model: str = ""  # HF folder of the starting policy (and the reference)
    data: str = ""  # prompt JSONL (messages or prompt, verifier, reference)
    output: str = ""  # HF folder to write; the run folder (metrics.jsonl, checkpoints/)
    tokenizer: str = ""  # empty: the model folder's tokenizer.json, else dolma2
    steps: int = 100  # rollouts (each: prompts_per_step x k completions, then the updates)
    prompts_per_step: int = 16
    k: int = 8  # completions per prompt (the group)
    max_prompt_length: int = 2048
    max_new_tokens: int = 2048  # response length
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: list[str] = dataclasses.field(default_factory=list)
    truncated_reward: float | None = None  # reward of a completion cut at max_new_tokens (None: its verifier's)
    lr: float = 5e-7
    lr_schedule: str = "linear"  # linear decay to 0 over the run, or constant
    warmup_ratio: float = 0.0  # share of the optimizer steps with a linear warmup (before either schedule)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.05  # KL coefficient (k3 estimator); 0: no reference model
    clip_eps: float = 0.2
    advantage_scale: str = "std"  # "std" (GRPO) or "none" (Dr. GRPO)
    loss_aggregation: str = "token"  # "token", "sequence" or "fixed" (see olmo2.rl.grpo)
    old_logprobs: str = "sampler"  # "sampler" or "recompute"
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer steps per PPO epoch over one rollout
    micro_batch_size: int = 8  # completions per forward
    sample_batch_size: int = 0  # completions decoded together; 0: all of a step's
    seed: int = 1
    sampling_seed: str = "auto"  # "stream": one generator for the run; "prompt": one per prompt from (seed, step,
    #                              slot), the same samples on any number of ranks; auto: stream on one process
    adam_eps: float = 1e-8
    dtype: str = "float32"  # the weights and AdamW state (fp32: the master weights under bf16 precision)
    precision: str = "auto"  # compute, sampling included: bf16 (FSDP2 mixed precision, else autocast) or fp32; auto: bf16 on GPU
    device: str = ""  # cpu, cuda; empty: cuda when available (one GPU per local rank under torchrun)
    strategy: str = "auto"  # fsdp, ddp, none; auto: fsdp with several ranks
    eval_data: str = ""  # prompt JSONL scored greedily every eval_interval steps (and before step 1)
    eval_interval: int = 0  # 0: only before the first and after the last step (when eval_data is set)
    eval_max_new_tokens: int = 0  # 0: max_new_tokens
    eval_samples: int = 0  # also sample this many answers per eval prompt at `temperature` (sampled accuracy)
    save_interval: int = 50
    keep_last: int = 2
    checkpoint_dir: str = ""
    hard_stop: int = 0
    progress: bool = False  # a tqdm bar on stderr in place of the line per step (pretraining's switch)
    tensorboard: bool = True  # also write OUTPUT/tensorboard when tensorboard is installed (as pretraining)

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "k", "max_prompt_length", "max_new_tokens", "ppo_epochs",
                     "mini_batches", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(f"RLConfig.k must be >= 2 (a group of one completion has advantage 0: nothing to "
                             f"learn), got {self.k}")
        for name in ("save_interval", "keep_last", "hard_stop", "eval_interval", "eval_max_new_tokens",
                     "eval_samples",
                     "sample_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"RLConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"RLConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check_output_is_not_model(self, "RLConfig")
        if self.adam_eps <= 0:
            raise ValueError(f"RLConfig.adam_eps must be > 0, got {self.adam_eps}")
        if self.lr <= 0 or self.beta < 0 or not 0 < self.clip_eps < 1:
            raise ValueError(f"RLConfig: need lr > 0, beta >= 0 and 0 < clip_eps < 1, got lr={self.lr}, "
                             f"beta={self.beta}, clip_eps={self.clip_eps}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"RLConfig: need temperature > 0 and 0 < top_p <= 1, got temperature="
                             f"{self.temperature}, top_p={self.top_p}")
        choices = {"advantage_scale": ADVANTAGE_SCALES, "loss_aggregation": AGGREGATIONS,
                   "old_logprobs": ("sampler", "recompute"), "lr_schedule": ("linear", "constant"),
                   "sampling_seed": SAMPLING_SEEDS, "strategy": STRATEGIES, "precision": ("auto", "bf16", "fp32")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"RLConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if (self.prompts_per_step * self.k) % self.mini_batches:
            raise ValueError(f"RLConfig.mini_batches={self.mini_batches} must divide prompts_per_step * k = "
                             f"{self.prompts_per_step * self.k}")


# OLMo 2 Instruct's RLVR (Tülu 3 recipe) and open-instruct's GRPO scripts for OLMo 2,
# read with the search tool:
# * allenai/open-instruct docs/archived_dev_scripts/olmo2_1124.sh, "# 7B RL" / "# 13B RL"
#   (the OLMo 2 1124 RLVR sweeps; PPO with a value model): beta swept 0.03-0.1, lr 4e-7
#   and 5e-7 (7B), 4e-7 (13B), response_length 2048, max_prompt_token_length 2048,
#   temperature 1.0, stop at EOS, non_stop_penalty with penalty_reward_value -10.
# * allenai/open-instruct scripts/train/olmo2/grpo_fast_7b_zero.sh (GRPO on OLMo 2 7B):
#   num_unique_prompts_rollout 48, num_samples_per_prompt_rollout 16, lr 5e-7,
#   beta 0.0, response_length 2048, temperature 1.0, 1 epoch, 1 mini-batch, linear schedule.
# These run on many GPUs; on one process the same numbers mean long steps.
PRESETS: dict[str, dict] = {
    "olmo2_7b_rlvr": dict(lr=5e-7, beta=0.05, k=16, prompts_per_step=48, temperature=1.0, max_new_tokens=2048,
                          max_prompt_length=2048, truncated_reward=-10.0, lr_schedule="linear"),
    "olmo2_13b_rlvr": dict(lr=4e-7, beta=0.05, k=16, prompts_per_step=48, temperature=1.0, max_new_tokens=2048,
                           max_prompt_length=2048, truncated_reward=-10.0, lr_schedule="linear"),
    "olmo2_7b_grpo_zero": dict(lr=5e-7, beta=0.0, k=16, prompts_per_step=48, temperature=1.0,
                               max_new_tokens=2048, max_prompt_length=2048, lr_schedule="linear"),
}

# Keys that decide what a resumed run computes, beyond olmo2.sft.RESUME_KEYS (the data file's
# sha256, and so each record's verifier and reference, is checked there). The tokenizer is
# compared by the sha256 of its serialized form (any spec naming the same tokenizer
# passes); the reference model is ``model`` (re-read from that folder on resume).
RL_RESUME_KEYS = ("steps", "warmup_ratio", "prompts_per_step", "k", "max_prompt_length", "max_new_tokens",
                  "temperature", "top_p", "beta", "clip_eps", "advantage_scale", "loss_aggregation",
                  "old_logprobs", "ppo_epochs", "mini_batches", "lr_schedule", "model", "truncated_reward",
                  "stop_strings", "max_grad_norm", "adam_eps")


def _log(text: str) -> None:
    print(f"olmo2-rl: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    rows: list[Row]  # prompt + completion, labels -100 on the prompt
    old_logps: list[list[float]]  # per completion token
    rewards: Tensor  # (N,)
    advantages: Tensor  # (N,)
    lengths: list[int]
    stop_reason: list[str]
    correct: list[bool]
    texts: list[str]
    gen_seconds: float


def prompt_generator(seed: int, step: int, slot: int, device) -> torch.Generator:
    """The sampling generator of the prompt in ``slot`` of ``step`` (``sampling_seed="prompt"``):
    a function of the three numbers only, so a prompt gets the same samples on any rank."""
    mixed = ((seed * 1_000_003 + step) * 1_000_003 + slot) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


def rollout(model, tokenizer, prompts: list[Prompt], cfg: RLConfig,
            generator: torch.Generator | list[torch.Generator], eos: int,
            autocast=contextlib.nullcontext) -> Rollout:
    """Sample ``cfg.k`` completions of each prompt, verify them and compute the group advantages.
    ``generator``: one for all prompts, or one per prompt (each prompt's completions drawn
    from its own, whatever else is decoded with them: :func:`olmo2.generation.sample`).
    ``autocast``: the run's precision (:meth:`olmo2.sft.Parallel.autocast`)."""
    from ..generation import sample
    from .verifiers import reward as verify

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    # Stop strings are matched on the decoded text, so a string is found however
    # the tokenizer splits it in context.
    options = dict(k=cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                   eos_token_id=eos, stop_strings=[s for s in cfg.stop_strings if s] or None,
                   decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                   batch_size=cfg.sample_batch_size or None)
    with autocast():
        samples = sample(model, [p.ids for p in prompts], generator=generator, **options)
    gen_seconds = time.perf_counter() - t0
    model.train(was_training)
    rows, rewards, correct, texts = [], [], [], []
    for i, tokens in enumerate(samples.tokens):
        prompt = prompts[samples.prompt_index[i]]
        text = tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True)
        r = float(verify(text, prompt.record))
        correct.append(r > 0)
        if cfg.truncated_reward is not None and samples.stop_reason[i] == "length":
            r = float(cfg.truncated_reward)
        rewards.append(r)
        texts.append(text)
        ids = prompt.ids + list(tokens)
        labels = [IGNORE_INDEX] * len(prompt.ids) + list(tokens)
        rows.append(Row(ids, labels, list(range(len(ids))), [0] * len(ids)))
    reward_t = torch.tensor(rewards, dtype=torch.float32)
    return Rollout(rows=rows, old_logps=[list(x) for x in samples.logprobs], rewards=reward_t,
                   advantages=group_advantages(reward_t, cfg.k, cfg.advantage_scale),
                   lengths=[len(t) for t in samples.tokens], stop_reason=list(samples.stop_reason),
                   correct=correct, texts=texts, gen_seconds=gen_seconds)


def _placed(rows: list[Row], values: list[list[float]], width: int) -> Tensor:
    """(B, width) with each completion's per-token values at the positions that predict them."""
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    for b, (row, v) in enumerate(zip(rows, values)):
        start = len(row.ids) - len(v) - 1
        if v:
            out[b, start : start + len(v)] = torch.tensor(v, dtype=torch.float64)
    return out


def _micro(rows: list[Row], pad_id: int, device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in collate(rows, pad_id, packing=False).items()}


@torch.no_grad()
def forward_logps(model, rows: list[Row], pad_id: int, micro_batch_size: int, device,
                  calls: int = 0, autocast=contextlib.nullcontext) -> list[list[float]]:
    """Completion-token log-probs of ``rows`` in a no-grad forward (reference or recomputed old policy).
    ``calls``: run at least this many forwards (FSDP2: every rank the same number, repeating a
    micro-batch whose result is dropped, since each forward all-gathers with the other ranks).
    ``autocast``: the run's precision."""
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    starts = list(range(0, len(rows), micro_batch_size))
    for n in range(max(len(starts), calls)):
        chunk = rows[starts[n] : starts[n] + micro_batch_size] if n < len(starts) else rows[:1]
        b = _micro(chunk, pad_id, device)
        with autocast():
            logps = token_logps(model, b)
        logps = logps.double().cpu()
        mask = completion_mask(b["labels"]).cpu()
        if n < len(starts):
            out += [logps[j][mask[j]].tolist() for j in range(len(chunk))]
    model.train(was_training)
    return out


@dataclass
class Layout:
    """Where a step's completions live: the step's prompts (slots 0..B-1, k completions
    each, row ``slot * k + j`` of the global prompt-major order) are dealt to the ranks
    in turn, slot ``s`` to rank ``s % world``. A prompt's group is on one rank, so group
    advantages need no communication."""
    n_prompts: int
    k: int
    world: int = 1
    rank: int = 0

    def slots(self, rank: int | None = None) -> list[int]:
        return list(range(self.rank if rank is None else rank, self.n_prompts, self.world))

    def rows(self, rank: int | None = None) -> list[int]:
        """Global row indices of a rank's completions, in its local order."""
        return [s * self.k + j for s in self.slots(rank) for j in range(self.k)]

    def max_rows(self) -> int:
        return len(self.slots(0)) * self.k  # rank 0 has the most


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) of ``values`` over the ranks (as is in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def update(model, optimizer, scheduler, ro: Rollout, ref_logps: list[list[float]] | None, cfg: RLConfig,
           pad_id: int, device, layout: Layout | None = None, autocast=contextlib.nullcontext) -> dict[str, float]:
    """``ppo_epochs`` x ``mini_batches`` optimizer steps of the GRPO loss on one rollout; summed stats.

    Under several ranks ``ro`` holds this rank's completions (``layout``): a mini-batch
    is the same slice of the global order as in one process; each rank runs its rows
    of it, the token weights from the mini-batch's global counts (the completion-token
    count all-reduced), the loss times the world size (DDP and FSDP2 average the
    gradients over ranks), so the gradient is one process's on the same global batch.
    Every rank runs the same number of micro-batches (the rank with the most rows
    decides; the others repeat one with weight 0). The stats are summed over ranks.
    ``autocast``: the run's precision, around the forward only (the loss is fp32)."""
    from ..train.optim import clip_grad_norm_
    from ..train.parallel import no_grad_sync

    layout = layout or Layout(len(ro.rows) // cfg.k, cfg.k)
    n = layout.n_prompts * cfg.k
    per_mini = n // cfg.mini_batches
    local_of = {g: i for i, g in enumerate(layout.rows())}
    keys = ("loss", "clipped", "kl", "ratio", "neg_logp", "tokens")
    sums = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "ratio": 0.0, "neg_logp": 0.0, "tokens": 0.0,
            "grad_norm": 0.0, "optimizer_steps": 0}
    for _ in range(cfg.ppo_epochs):
        for m in range(cfg.mini_batches):
            span = range(m * per_mini, (m + 1) * per_mini)
            idx = [local_of[g] for g in span if g in local_of]
            lengths = [ro.lengths[i] for i in idx]
            most = max(sum(1 for g in span if (g // cfg.k) % layout.world == r) for r in range(layout.world))
            n_tokens = sum(lengths) if layout.world == 1 else int(_all_reduce([float(sum(lengths))])[0])
            weights = token_weights(lengths, cfg.loss_aggregation, cfg.max_new_tokens, per_mini, n_tokens)
            n_micro = math.ceil(most / cfg.micro_batch_size)
            for j in range(n_micro):
                sub = idx[j * cfg.micro_batch_size : (j + 1) * cfg.micro_batch_size]
                w = weights[j * cfg.micro_batch_size : (j + 1) * cfg.micro_batch_size]
                if not sub:  # this rank has no more rows in this mini-batch: a pass with weight 0
                    sub, w = [0], [0.0]
                rows = [ro.rows[i] for i in sub]
                b = _micro(rows, pad_id, device)
                width = b["input_ids"].shape[1]
                with no_grad_sync(model, j == n_micro - 1):
                    with autocast():
                        logps = token_logps(model, b)
                    logps = logps.float()
                    mask = completion_mask(b["labels"])
                    old = _placed(rows, [ro.old_logps[i] for i in sub], width).to(device)
                    ref = (_placed(rows, [ref_logps[i] for i in sub], width).to(device)
                           if ref_logps is not None else None)
                    loss, stats = grpo_loss(logps, old, ref, ro.advantages[sub].to(device),
                                            torch.tensor(w, device=device), mask, cfg.clip_eps, cfg.beta)
                    (loss * layout.world if layout.world > 1 else loss).backward()
                if any(w):
                    sums["loss"] += float(loss.detach())
                    for key, value in stats.items():
                        sums[key] += float(value)
            grad_norm = clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"olmo2-rl: non-finite gradient norm {float(grad_norm)}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sums["grad_norm"] += float(grad_norm)
            sums["optimizer_steps"] += 1
    if layout.world > 1:
        sums.update(zip(keys, _all_reduce([sums[key] for key in keys])))
    return sums


# --------------------------------------------------------------------------- the loop
def lr_scheduler(optimizer, total_updates: int, warmup_ratio: float, kind: str):
    """Linear warmup over ``warmup_ratio`` of the updates, then linear decay to 0 or constant."""
    if kind == "linear":
        return linear_schedule(optimizer, total_updates, warmup_ratio)
    warmup = max(1, math.ceil(total_updates * warmup_ratio)) if warmup_ratio > 0 else 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)


def _generator_state(g: torch.Generator) -> str:
    return base64.b64encode(g.get_state().numpy().tobytes()).decode("ascii")


def _set_generator_state(g: torch.Generator, text: str) -> None:
    raw = base64.b64decode(text.encode("ascii"))
    g.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def step_prompts(n_prompts: int, seed: int, step: int, per_step: int) -> list[int]:
    """Indices of the prompts of ``step`` (0-based): the stream of seeded epoch orders, cut in chunks."""
    out: list[int] = []
    orders: dict[int, list[int]] = {}
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, n_prompts)
        if epoch not in orders:
            orders[epoch] = data_order(n_prompts, seed, epoch)
        out.append(orders[epoch][pos])
    return out


def load_policy(cfg: RLConfig, device):
    """The model of ``cfg.model`` and its tokenizer (``cfg.tokenizer``, else the folder's
    ``tokenizer.json``, else dolma2), and the tokenizer's spec for the export."""
    from ..checkpoint_hf import load_pretrained
    from ..dtypes import DTYPES
    from ..tokenizers import load_tokenizer

    folder = Path(cfg.model)
    spec = cfg.tokenizer or (str(folder) if (folder / "tokenizer.json").is_file() else "dolma2")
    return load_pretrained(folder, dtype=DTYPES[cfg.dtype], device=device), load_tokenizer(spec), spec


def _rollout_metrics(ro: Rollout, k: int, train_tokens: int, train_seconds: float) -> dict[str, float]:
    """The rollout's metrics over all ranks (sums all-reduced; the times are the slowest rank's)."""
    groups = ro.rewards.reshape(-1, k)
    adv = ro.advantages.double()
    (n, reward, correct, adv_abs, adv_sum, adv_sq, equal, n_groups, length, eos, cut, tokens) = _all_reduce([
        float(len(ro.rows)), float(ro.rewards.double().sum()), float(sum(ro.correct)), float(adv.abs().sum()),
        float(adv.sum()), float((adv * adv).sum()), float((groups == groups[:, :1]).all(1).sum()),
        float(groups.shape[0]), float(sum(ro.lengths)), float(sum(s == "eos" for s in ro.stop_reason)),
        float(sum(s == "length" for s in ro.stop_reason)), float(train_tokens)])
    gen_seconds, train_seconds = _all_reduce([ro.gen_seconds, train_seconds], op="max")
    return {
        "reward": reward / n,
        "accuracy": correct / n,
        "advantage_abs": adv_abs / n,
        "advantage_std": math.sqrt(max(0.0, adv_sq / n - (adv_sum / n) ** 2)),
        "equal_reward_groups": equal / n_groups,
        "completion_length": length / n,
        "stopped_eos": eos / n,
        "truncated": cut / n,
        "gen_tokens_per_s": length / max(gen_seconds, 1e-9),
        "train_tokens_per_s": tokens / max(train_seconds, 1e-9),
    }


def train_rl(cfg: RLConfig, log=_log) -> dict:
    """Run GRPO as ``cfg`` says (on every rank of a ``torchrun`` launch); write the HF folder
    ``cfg.output``. Returns ``{"history": [per-step metrics], "steps": n, "bad_records": k,
    "eval": {step: result}}``.

    Under ``torchrun`` (``strategy`` fsdp or ddp, :func:`olmo2.sft.setup_model`): the step's
    prompts are dealt to the ranks (:class:`Layout`); each rank samples its prompts with
    the weights gathered once for the rollout (FSDP2), each prompt from its own generator
    (``sampling_seed="prompt"``, so the samples do not depend on the number of ranks),
    verifies them and computes its groups' advantages; the updates as :func:`update` says."""
    from ..sft import export_model, load_parallel, pad_id_for, setup_model
    from ..tokenizers import load_tokenizer
    from ..train.metrics import MetricsLogger
    from ..train.parallel import gathered_weights

    torch.manual_seed(cfg.seed)
    par = setup_model(cfg)
    world, rank, device = par.dist.world_size, par.dist.rank, par.device
    log = log if par.dist.is_main else (lambda text: None)
    sampling = cfg.sampling_seed if cfg.sampling_seed != "auto" else ("stream" if world == 1 else "prompt")
    if sampling == "stream" and world > 1:
        raise ValueError(f"sampling_seed=stream is for one process; under torchrun ({world} ranks) use prompt "
                         "(or auto)")
    if cfg.prompts_per_step < world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is fewer than the {world} ranks: every rank "
                         "samples at least one prompt per step")
    folder = Path(cfg.model)
    tokenizer_spec = cfg.tokenizer or (str(folder) if (folder / "tokenizer.json").is_file() else "dolma2")
    tokenizer = load_tokenizer(tokenizer_spec)
    eos = tokenizer.token_to_id("<|endoftext|>")
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer_spec}: has no <|endoftext|> token (the chat template's EOS)")
    pad_id = pad_id_for(tokenizer, par.base.config.vocab_size)
    prompts, report = read_prompts(cfg.data, tokenizer, cfg.max_prompt_length)
    log(report.summary())
    if not prompts:
        raise ValueError(f"--data {cfg.data}: no usable records")
    eval_prompts: list[Prompt] = []
    if cfg.eval_data:
        eval_prompts, eval_report = read_prompts(cfg.eval_data, tokenizer, cfg.max_prompt_length)
        log("eval_data " + eval_report.summary())
    # The reference is the starting model, frozen: in one process a copy made before a
    # resume loads a trained policy; under FSDP2 sharded as the policy (1/world of a copy
    # per rank, gathered a block at a time in its forward); under DDP a full copy per rank.
    ref_model = None
    if cfg.beta > 0:
        if par.strategy == "none":
            ref_model = copy.deepcopy(par.base)
        else:
            ref_model, _ = load_parallel(cfg.model, cfg.dtype, par.dist, "fsdp" if par.strategy == "fsdp" else "none",
                                         par.precision)
        ref_model.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(par.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    total_updates = cfg.steps * cfg.ppo_epochs * cfg.mini_batches
    scheduler = lr_scheduler(optimizer, total_updates, cfg.warmup_ratio, cfg.lr_schedule)
    checkpointer = PostTrainCheckpointer(cfg, par.model, optimizer, scheduler, len(prompts), log, par.precision)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    state = checkpointer.resume()
    step = 0
    tokenizer_sha256 = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
    if state is not None:
        where = checkpointer.resumed_from
        for key in RL_RESUME_KEYS:
            if key in state["config"] and state["config"][key] != getattr(cfg, key):
                raise ValueError(f"{key}={getattr(cfg, key)!r} differs from {state['config'][key]!r} in checkpoint "
                                 f"{where}: resume needs the same value (or another checkpoint_dir)")
        saved_sha = state.get("tokenizer_sha256")
        if saved_sha is not None and saved_sha != tokenizer_sha256:
            raise ValueError(f"tokenizer {tokenizer_spec!r} (sha256 {tokenizer_sha256[:16]}) differs from the one "
                             f"checkpoint {where} was trained with (sha256 {saved_sha[:16]}, "
                             f"tokenizer={state['config'].get('tokenizer')!r}): resume needs the same tokenizer "
                             "(or another checkpoint_dir)")
        saved = state.get("sampling", "stream")
        if saved != sampling:
            if cfg.sampling_seed != "auto" or (saved == "stream" and world > 1):
                raise ValueError(f"sampling_seed={sampling} differs from {saved} in checkpoint "
                                 f"{checkpointer.resumed_from}: resume needs the same sampling")
            sampling = saved
        # One generator for the run draws each decode step's uniforms for the rows decoded
        # together, so under "stream" the batch size decides the samples ("prompt" does not).
        saved_batch = state["config"].get("sample_batch_size")
        if sampling == "stream" and saved_batch is not None and saved_batch != cfg.sample_batch_size:
            raise ValueError(f"sample_batch_size={cfg.sample_batch_size!r} differs from {saved_batch!r} in checkpoint "
                             f"{where}: with sampling_seed=stream it decides the samples; resume needs the same "
                             "value (or another checkpoint_dir)")
        step = state["step"]
        if sampling == "stream":
            _set_generator_state(generator, state["generator"])
    out = Path(cfg.output)
    metrics = MetricsLogger(out, cfg.steps, start_step=step, enabled=par.dist.is_main, progress=cfg.progress,
                            tensorboard=cfg.tensorboard)
    log = checkpointer.log = metrics.console(log)  # lines printed around the progress bar, when there is one
    stop = min(cfg.steps, cfg.hard_stop) if cfg.hard_stop else cfg.steps
    eval_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
    history: list[dict] = []
    evals: dict[int, dict] = {}
    layout = Layout(cfg.prompts_per_step, cfg.k, world, rank)
    calls = math.ceil(layout.max_rows() / cfg.micro_batch_size)  # no-grad forwards per rank, equal on all
    no_grad_model = par.base if par.strategy == "ddp" else par.model

    def run_eval(at: int) -> None:
        result = evaluate_ranks(par.model, par.base, tokenizer, eval_prompts, eval_tokens, cfg.eval_samples,
                                cfg.temperature, seed=cfg.seed + 1, autocast=par.autocast)
        evals[at] = result
        metrics.log(at, {f"eval/{k}": result[k] for k in ("accuracy", "reward", "sampled_accuracy") if k in result})
        sampled = f" sampled_accuracy {result['sampled_accuracy']:.3f}" if "sampled_accuracy" in result else ""
        log(f"eval at step {at}: accuracy {result['accuracy']:.3f}{sampled} reward {result['reward']:.3f} "
            f"on {result['n']}")

    def save(at: int) -> None:
        epoch, position = divmod(at * cfg.prompts_per_step, len(prompts))
        extra = {"sampling": sampling, "tokenizer_sha256": tokenizer_sha256}  # precision: the checkpointer's
        if sampling == "stream":
            extra["generator"] = _generator_state(generator)
        checkpointer.save(at, epoch, position, extra)

    if eval_prompts and step == 0:
        run_eval(0)
    saved_step = step if state is not None else -1
    par.model.train()
    try:
        while step < stop:
            order = step_prompts(len(prompts), cfg.seed, step, cfg.prompts_per_step)
            slots = layout.slots()
            chunk = [prompts[order[s]] for s in slots]
            gens = (generator if sampling == "stream" else
                    [prompt_generator(cfg.seed, step, s, device) for s in slots])
            with gathered_weights(par.model):
                ro = rollout(par.base, tokenizer, chunk, cfg, gens, eos, par.autocast)
            t0 = time.perf_counter()
            if cfg.old_logprobs == "recompute":
                ro.old_logps = forward_logps(no_grad_model, ro.rows, pad_id, cfg.micro_batch_size, device, calls,
                                             par.autocast)
            ref = (forward_logps(ref_model, ro.rows, pad_id, cfg.micro_batch_size, device, calls, par.autocast)
                   if ref_model is not None else None)
            lr_used = scheduler.get_last_lr()[0]  # of this rollout's first update
            sums = update(par.model, optimizer, scheduler, ro, ref, cfg, pad_id, device, layout, par.autocast)
            train_seconds = time.perf_counter() - t0
            step += 1
            n_tok = max(1.0, sums["tokens"])
            row = _rollout_metrics(ro, cfg.k, sum(len(r.ids) for r in ro.rows) * cfg.ppo_epochs, train_seconds)
            row.update({
                "loss": sums["loss"] / sums["optimizer_steps"],
                "entropy": sums["neg_logp"] / n_tok,
                "clip_fraction": sums["clipped"] / n_tok,
                "ratio": sums["ratio"] / n_tok,
                "grad_norm": sums["grad_norm"] / sums["optimizer_steps"],
                "lr": lr_used,
            })
            if ref is not None:
                row["kl"] = sums["kl"] / n_tok
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"olmo2-rl: non-finite loss {row['loss']} at step {step}")
            history.append(row)
            metrics.log(step, row, bar_keys=("reward", "loss", "lr"))
            if metrics.bar is None:  # with progress=true the bar shows the step
                log(f"step {step}/{cfg.steps} " + " ".join(f"{k} {v:.4g}" for k, v in row.items()))
            if eval_prompts and cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.steps:
                run_eval(step)
            if step == stop or (cfg.save_interval and step % cfg.save_interval == 0):
                save(step)
                saved_step = step
        if saved_step != step:
            save(step)
        result = {"history": history, "steps": step, "bad_records": len(report.bad), "eval": evals}
        if step < cfg.steps:
            log(f"hard_stop: stopped after step {step} of {cfg.steps}; rerun without hard_stop to continue")
            return result
        if eval_prompts and history:  # not again when a finished run is rerun
            run_eval(step)
    finally:
        metrics.close()
    par.model.eval()
    export_model(par, out, tokenizer_spec, cfg, "rl_config.json")
    log(f"wrote {out}")
    return result
