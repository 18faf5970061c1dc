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
  names the reference log-probs file and its sha256, which a resumed run reads
  instead of recomputing (the checkpoint's policy is no longer the reference); a
  resume with another reference file (or other data) is refused, naming both.
* **In-loop evaluation** (``eval.*``, as for SFT): every ``eval.interval`` steps and
  after the last, :func:`heldout_metrics` over the held-out pairs ``eval.data`` (loss,
  accuracy, margin, chosen/rejected rewards and log-probs, means over all pairs),
  against reference log-probs computed once, before the first step, into their own
  file (``eval.ref_cache``, default ``output/reference_logps_eval.pt``; it records
  the held-out data's sha256 and the starting model, and a resumed run reads it back).
* **Data parallel** as for SFT (``torchrun --nproc_per_node=N -m olmo2.cli.dpo ...``):
  each rank runs a disjoint share of a step's micro-batches and the loss is the
  mean over the step's pairs of all ranks; the reference pass is sharded the same
  way, gathered, written once by rank 0 and read back by every rank.
"""
from __future__ import annotations

import contextlib
import math
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chat import IGNORE_INDEX, read_preference_jsonl
from .model import Olmo2ForCausalLM
from .sft import (
    InLoopEvaluation,
    Parallel,
    PostTrainEvalConfig,
    PostTrainCheckpointer,
    Row,
    build_optimizer,
    check_common,
    checkpoint_dir,
    collate,
    load_tokenizer_for,
    pad_id_for,
    rank_share,
    read_heldout,
    run_steps,
    setup_model,
)
from .train.parallel import DistInfo, all_reduce_sum, no_grad_sync

LOSS_TYPES = ("dpo_norm", "dpo", "simpo")


@dataclass
class DPOConfig:
    preset: str = ""  # the preset the values came from (set by the resolver; empty: none)
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
    adam_eps: float = 1e-8
    dtype: str = "float32"  # the weights and AdamW state (fp32: the master weights under bf16 precision)
    precision: str = "auto"  # compute: bf16 (FSDP2 mixed precision, else autocast) or fp32; auto: bf16 on GPU
    device: str = ""  # cpu, cuda; empty: cuda when available (one GPU per local rank under torchrun)
    strategy: str = "auto"  # fsdp, ddp, none; auto: fsdp with several ranks
    ref_cache: str = ""  # file for the reference log-probs; empty: output/reference_logps.pt
    save_interval: int = 100  # steps between checkpoints (and one at the end); 0: only at the end
    keep_last: int = 2  # checkpoints kept (0: all)
    checkpoint_dir: str = ""  # empty: output/checkpoints; a rerun of the same command resumes from it
    hard_stop: int = 0  # stop (with a checkpoint) after this step without changing the schedule; 0: off
    progress: bool = False  # a tqdm bar on stderr in place of the line per step (pretraining's switch)
    tensorboard: bool = True  # also write OUTPUT/tensorboard when tensorboard is installed (as pretraining)
    eval: PostTrainEvalConfig = field(default_factory=PostTrainEvalConfig)  # in-loop evaluation: the eval.* keys

    def __post_init__(self) -> None:
        check_common(self, "DPOConfig")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")


# Tülu 3 DPO for OLMo 2 Instruct, as shipped in allenai/open-instruct
# configs/train_configs/olmo2/olmo2_1124_7b_dpo.yaml (commit 3047f9ab) and
# olmo2_1124_13b_dpo.yaml (commit 59753b01): length-normalized DPO (dpo_norm),
# beta 5, lr 5e-7, effective batch 128 pairs, max_seq_length 2048, linear schedule,
# warmup_ratio 0.1, weight decay 0, 1 epoch. Sources disagree on the lr: the sweeps
# in docs/archived_dev_scripts/olmo2_1124.sh ran 5e-7..3e-6 (7B) and 5e-7..2e-6 (13B),
# and an RL run there starts from a 7B DPO model tuned at 1e-6 (an earlier preset
# here had 1e-6); the shipped config files are followed. Also as
# configs/dpo-olmo2-{7b,13b}.yaml. tulu3_8b: Tülu 3 8B's DPO, checked against
# allenai/open-instruct configs/train_configs/tulu3/tulu3_dpo_8b.yaml (lr 5e-7 linear,
# warmup 0.1, no weight decay, 1 epoch, dpo_norm, beta 5, 2048 tokens, batch 1 x 16 x 8 GPUs = 128).
PRESETS: dict[str, dict] = {
    name: dict(loss_type="dpo_norm", beta=5.0, lr=5e-7, max_length=2048, micro_batch_size=1, grad_accum=128,
               warmup_ratio=0.1, epochs=1, weight_decay=0.0)
    for name in ("olmo2_7b", "olmo2_13b", "tulu3_8b")
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
def reference_logps(model: nn.Module, pairs: list[dict], pad_id: int, batch_size: int, device,
                    dist_info: DistInfo | None = None, autocast=contextlib.nullcontext) -> Tensor:
    """(N, 2) reference log-prob sums [chosen, rejected] of every pair, in one no-grad
    pass; under ``torchrun`` each rank computes its :func:`olmo2.sft.rank_share` of the
    batches and every rank gets all of them back."""
    was_training = model.training
    model.eval()
    batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    mine = {}
    for sub in rank_share(list(range(len(batches))), dist_info):
        b = {k: v.to(device) for k, v in pair_batch([pairs[i] for i in batches[sub or 0]], pad_id).items()}
        with autocast():
            logps, _ = sequence_logps(model, b)  # a rank without a batch left runs batch 0 and drops it
        if sub is not None:
            n = len(batches[sub])
            mine[sub] = torch.stack([logps[:n], logps[n:]], 1).float().cpu()
    model.train(was_training)
    if dist_info is not None and dist_info.distributed:
        gathered: list = [None] * dist_info.world_size
        torch.distributed.all_gather_object(gathered, mine)
        mine = {k: v for part in gathered for k, v in part.items()}
    return torch.cat([mine[i] for i in range(len(batches))])


def _log(text: str) -> None:
    print(f"olmo2-dpo: {text}", file=sys.stderr, flush=True)


def load_reference(cache: Path, n_pairs: int, key: str = "ref_cache",
                   expect: dict | None = None) -> tuple[Tensor, str]:
    """The cached reference log-probs and the file's sha256; every item of ``expect``
    must be recorded in the file (the held-out cache records the data's sha256 and the
    starting model)."""
    from .files import file_digest

    try:
        saved = torch.load(cache, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # damaged, or not a torch file
        saved = exc
    if not isinstance(saved, dict) or not isinstance(saved.get("logps"), Tensor):
        why = f" ({(str(saved).splitlines() or [type(saved).__name__])[0][:200]})" if isinstance(saved, Exception) else ""
        raise ValueError(f"{key} {cache}: not a reference log-prob file written by olmo2-dpo{why}")
    ref = saved["logps"]
    for name, value in (expect or {}).items():
        if saved.get(name) != value:
            raise ValueError(f"{key} {cache}: computed with {name} {str(saved.get(name))[:64]!r}, not with this run's "
                             f"{str(value)[:64]!r} (data {saved.get('data')}); delete the file to recompute it")
    if ref.shape != (n_pairs, 2):
        raise ValueError(f"{key} {cache}: holds {tuple(ref.shape)} log-probs, the data has {n_pairs} pairs")
    return ref, file_digest(cache)


def prepare_reference(cfg: DPOConfig, par: Parallel, pairs: list[dict], pad_id: int, log) -> tuple[Tensor | None, dict]:
    """The reference log-probs: read from ``ref_cache`` when the run resumes (the
    checkpoint's policy is no longer the reference), else computed (sharded across
    ranks), written once by rank 0 atomically and read back by every rank. Returns
    them and what the checkpoints record of them."""
    from .train.checkpoint import list_checkpoints

    if cfg.loss_type == "simpo":
        return None, {"ref_cache": None}
    cache = Path(cfg.ref_cache) if cfg.ref_cache else Path(cfg.output) / "reference_logps.pt"
    if list_checkpoints(checkpoint_dir(cfg)):
        if not cache.is_file():
            raise FileNotFoundError(f"ref_cache {cache}: missing, and the checkpoints in {checkpoint_dir(cfg)} hold "
                                    "a trained policy, not the reference; restore the file or start afresh")
        ref, digest = load_reference(cache, len(pairs))
        log(f"reference log-probs of {len(pairs)} pairs read from {cache}")
    else:
        write_reference(par, pairs, pad_id, cfg.micro_batch_size, cache,
                        {"data": str(cfg.data), "model": str(cfg.model)})
        ref, digest = load_reference(cache, len(pairs))
        log(f"reference log-probs of {len(pairs)} pairs cached in {cache}")
    return ref, {"ref_cache": str(cache), "ref_cache_sha256": digest}


def write_reference(par: Parallel, pairs: list[dict], pad_id: int, batch_size: int, cache: Path, about: dict) -> None:
    """Compute the reference log-probs of ``pairs`` (sharded across ranks) and write them
    with ``about`` to ``cache``, once, by rank 0, atomically; every rank waits for it."""
    from .files import atomic_write

    ref = reference_logps(par.model, pairs, pad_id, batch_size, par.device, par.dist, par.autocast)
    if par.dist.is_main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache, "wb", encoding=None) as f:
            torch.save({**about, "logps": ref}, f)
    par.barrier()


def prepare_eval_reference(cfg: DPOConfig, par: Parallel, pairs: list[dict], pad_id: int,
                           log) -> tuple[Tensor | None, dict]:
    """The held-out pairs' reference log-probs, in their own file (``eval.ref_cache``,
    default ``output/reference_logps_eval.pt``), which records the held-out data's
    sha256 and the starting model. A resumed run reads the file back, refusing one
    computed on other data; a fresh run, or a resumed one whose file is missing,
    computes it: this runs before the checkpoint is loaded, while the weights are still
    the starting model's, i.e. the reference. Returns them and what the checkpoints
    record of them (the file, its sha256, the held-out data's sha256)."""
    from .files import file_digest
    from .train.checkpoint import list_checkpoints

    data_sha256 = file_digest(cfg.eval.data)
    recorded = {"eval_data": str(cfg.eval.data), "eval_data_sha256": data_sha256}
    if cfg.loss_type == "simpo":
        return None, recorded
    cache = Path(cfg.eval.ref_cache) if cfg.eval.ref_cache else Path(cfg.output) / "reference_logps_eval.pt"
    about = {"data": str(cfg.eval.data), "data_sha256": data_sha256, "model": str(cfg.model)}
    expect = {k: about[k] for k in ("data_sha256", "model")}
    if list_checkpoints(checkpoint_dir(cfg)) and cache.is_file():
        ref, digest = load_reference(cache, len(pairs), "eval.ref_cache", expect)
        log(f"held-out reference log-probs of {len(pairs)} pairs read from {cache}")
    else:
        write_reference(par, pairs, pad_id, cfg.micro_batch_size, cache, about)
        ref, digest = load_reference(cache, len(pairs), "eval.ref_cache", expect)
        log(f"held-out reference log-probs of {len(pairs)} pairs cached in {cache}")
    return ref, {**recorded, "eval_ref_cache": str(cache), "eval_ref_cache_sha256": digest}


def check_reference(state: dict, recorded: dict, path) -> None:
    """Refuse to resume with another reference cache than the checkpoint was trained with."""
    saved = state.get("ref_cache_sha256")
    if saved is not None and saved != recorded.get("ref_cache_sha256"):
        raise ValueError(f"ref_cache {recorded['ref_cache']} (sha256 {recorded['ref_cache_sha256'][:16]}) is not "
                         f"the reference checkpoint {path} was trained with ({state.get('ref_cache')}, sha256 "
                         f"{saved[:16]}): restore that file or start afresh in another checkpoint_dir")


def dpo_step(par: Parallel, pairs: list[dict], idx: list[int], ref: Tensor | None, pad_id: int,
             cfg: DPOConfig) -> dict[str, float]:
    """Backward of one optimizer step: the mean loss over the step's pairs ``idx`` (all
    ranks), this rank running its share of the micro-batches. Returns the step's
    metrics averaged over its pairs (one all-reduce)."""
    world = par.dist.world_size
    micro = [idx[j : j + cfg.micro_batch_size] for j in range(0, len(idx), cfg.micro_batch_size)]
    share = rank_share(micro, par.dist)
    keys = ("loss", "margin", "accuracy", "logp_chosen", "logp_rejected")
    sums = torch.zeros(len(keys), dtype=torch.float64, device=par.device)
    for i, sub in enumerate(share):
        weight = 1.0 if sub is not None else 0.0  # no micro-batch left: the first one again, weighted 0
        sub = sub if sub is not None else micro[0]
        b = {k: v.to(par.device) for k, v in pair_batch([pairs[j] for j in sub], pad_id).items()}
        with no_grad_sync(par.model, i == len(share) - 1):
            with par.autocast():
                logps, counts = sequence_logps(par.model, b)
            n = len(sub)
            ref_c = ref_r = None
            if ref is not None:
                r = ref[sub].to(device=par.device, dtype=logps.dtype)
                ref_c, ref_r = r[:, 0], r[:, 1]
            losses, m = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, counts[:n], counts[n:],
                                 cfg.beta, cfg.loss_type, cfg.gamma)
            # DDP and FSDP2 average the gradients over ranks: x world gives the mean over the step's pairs
            (losses.sum() * (weight * world / len(idx))).backward()
        if weight:
            sums += torch.stack([losses.detach().sum()] + [m[k].sum() for k in keys[1:]]).double()
    sums = all_reduce_sum(sums).cpu()
    return {k: float(v) / len(idx) for k, v in zip(keys, sums)}


HELDOUT_KEYS = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected")


@torch.no_grad()
def heldout_metrics(model: nn.Module, pairs: list[dict], ref: Tensor | None, pad_id: int, batch_size: int,
                    cfg: DPOConfig, device, dist_info: DistInfo | None = None,
                    autocast=contextlib.nullcontext) -> dict[str, float]:
    """The DPO loss, pair accuracy (chosen reward > rejected reward), margin, chosen and
    rejected rewards and log-probs, each the mean over all held-out ``pairs`` (``ref``:
    their cached reference log-probs; None for SimPO). Each rank scores its
    :func:`olmo2.sft.rank_share` of the batches of ``batch_size`` pairs (a rank left
    without one runs batch 0 and drops it, so FSDP's collectives stay in step); the
    sums, in float64, are all-reduced once. Eval mode meanwhile, then the model's mode."""
    batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    sums = torch.zeros(len(HELDOUT_KEYS), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for sub in rank_share(list(range(len(batches))), dist_info):
            idx = batches[sub or 0]
            b = {k: v.to(device) for k, v in pair_batch([pairs[j] for j in idx], pad_id).items()}
            with autocast():
                logps, counts = sequence_logps(model, b)
            n = len(idx)
            ref_c = ref_r = None
            if ref is not None:
                r = ref[idx].to(device=device, dtype=logps.dtype)
                ref_c, ref_r = r[:, 0], r[:, 1]
            losses, m = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, counts[:n], counts[n:], cfg.beta,
                                 cfg.loss_type, cfg.gamma)
            if sub is not None:
                m["loss"] = losses
                sums += torch.stack([m[k].double().sum() for k in HELDOUT_KEYS])
    finally:
        model.train(was_training)
    sums = all_reduce_sum(sums).cpu()
    return {k: float(v) / len(pairs) for k, v in zip(HELDOUT_KEYS, sums)}


def train_dpo(cfg: DPOConfig, log=_log) -> dict:
    """Run DPO as ``cfg`` says (on every rank of a ``torchrun`` launch); write the HF
    folder ``cfg.output``. Returns per-step metrics."""
    torch.manual_seed(cfg.seed)
    par = setup_model(cfg)
    log = log if par.dist.is_main else (lambda text: None)
    tokenizer, tokenizer_spec = load_tokenizer_for(cfg.model, cfg.tokenizer)
    pairs, report = read_preference_jsonl(cfg.data, tokenizer, cfg.max_length)
    log(report.summary())
    if not pairs:
        raise ValueError(f"--data {cfg.data}: no usable records")
    pad_id = pad_id_for(tokenizer, par.base.config.vocab_size)
    per_step = cfg.micro_batch_size * cfg.grad_accum
    total_steps = math.ceil(len(pairs) / per_step) * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer, scheduler = build_optimizer(cfg, par, total_steps)
    checkpointer = PostTrainCheckpointer(cfg, par.model, optimizer, scheduler, len(pairs), log, par.precision)
    ref, extra = prepare_reference(cfg, par, pairs, pad_id, log)
    heldout = None
    if cfg.eval.data:
        eval_pairs = read_heldout(cfg, read_preference_jsonl, tokenizer, log)
        eval_ref, eval_extra = prepare_eval_reference(cfg, par, eval_pairs, pad_id, log)  # before the resume
        extra = {**extra, **eval_extra}

        def heldout() -> dict[str, float]:
            return heldout_metrics(par.base, eval_pairs, eval_ref, pad_id, cfg.micro_batch_size, cfg, par.device,
                                   par.dist, par.autocast)

    evaluation = InLoopEvaluation.build(cfg, par, total_steps, tokenizer_spec, heldout, log)

    state = checkpointer.resume()
    if state is not None:
        check_reference(state, extra, checkpointer.resumed_from)

    def one_step(indices: list[int]) -> dict:
        return dpo_step(par, pairs, indices, ref, pad_id, cfg)

    def describe(row: dict, lr: float) -> str:
        return " ".join(f"{k} {v:.4f}" for k, v in row.items())

    step, history = run_steps(cfg, par, checkpointer, optimizer, scheduler, state, total_steps, len(pairs), per_step,
                              one_step, describe, evaluation, log, tokenizer_spec, "olmo2-dpo", "dpo_config.json",
                              extra, bar_keys=("loss", "margin", "lr"))
    return {"history": history, "steps": step, "bad_records": len(report.bad)}
