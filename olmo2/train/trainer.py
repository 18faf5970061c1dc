"""The trainer: builds model, optimizer and data from a :class:`TrainConfig`
and runs the OLMo 2 pretraining loop.

One optimizer step (:meth:`Trainer.train_step`):

1. this rank's slice of the global batch (:class:`olmo2.train.data.TrainData`),
   split into micro-batches;
2. per micro-batch, the summed loss (``reduction="sum"``) divided by the
   global count of non-ignored target tokens (all micro-batches, all ranks;
   counted on the host from the labels, all-reduced on the device) and scaled
   by the world size, since DDP and FSDP2 average gradients over ranks; so the
   gradient is that of the global mean loss, whatever the split;
3. global-norm clipping, then **one host sync** fetching loss, z-loss and the
   gradient norm together; a non-finite value or a spike
   (:class:`olmo2.train.stability.StepGuard`) skips the optimizer update; the
   step still counts (data and schedule move on);
4. the learning rate of this step (:class:`olmo2.train.optim.LRSchedule`), AdamW.

The loop (:meth:`Trainer._fit`) only sequences components: the metrics
(:class:`olmo2.train.metrics.TrainMetrics`), evaluation (:meth:`Trainer.evaluate`)
and checkpointing (:class:`olmo2.train.checkpoint.Checkpointer`).

Resume is exact: the checkpoint (:mod:`olmo2.train.checkpoint`) holds model,
optimizer, step, tokens seen, data position, spike history and RNG states;
on CPU a run of N steps and a run of N/2 steps resumed for N/2 more end with
bitwise-identical weights.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import olmo2_kernels

from ..byte_tokenizer import ByteTokenizer
from ..config import flops_per_token, num_parameters
from ..hardware import peak_flops
from ..model import IGNORE_INDEX, Olmo2ForCausalLM
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .corpus import stdlib_corpus
from .data import EvalData, TokenSource, TrainData
from .metrics import StepResult, TrainMetrics
from .optim import LRSchedule, build_adamw, clip_grad_norm_, set_lr
from .parallel import (
    DistInfo,
    all_reduce_sum,
    autocast_context,
    init_distributed,
    no_grad_sync,
    parallelize,
    resolve_precision,
    resolve_strategy,
    unwrap,
)
from .stability import SpikeDetector, StepGuard


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds model, optimizer, data and the components from a :class:`TrainConfig`, and trains.

    ``Trainer(cfg).fit()`` runs to ``cfg.max_steps`` (resuming when the run
    folder has a checkpoint and ``cfg.resume`` allows) and returns a summary.
    ``history`` keeps the records of the last steps (all ranks; at least
    :data:`olmo2.train.metrics.HISTORY_LIMIT` of them).
    """

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.device)
        self.device = self.dist.device
        self.strategy = resolve_strategy(cfg.parallel.strategy, self.dist.world_size)
        self.precision = resolve_precision(cfg.parallel.precision, self.device)
        if self.precision == "bf16" and self.device.type == "cpu":
            raise ConfigError("parallel.precision=bf16 is for GPUs; use fp32 (or auto) on CPU")
        self.grad_accum = cfg.grad_accum_steps(self.dist.world_size)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.tokens_seen = 0
        self.last_lr = 0.0
        self.resumed_from: str | None = None
        self.init_from: str | None = None

        seed_everything(cfg.seed)
        self.train_data, self.eval_data, self.tokenizer_json = self._build_data()
        self.model = self._build_model()
        self.base_model = unwrap(self.model)
        o = cfg.optim
        self.optimizer = build_adamw(self.base_model, lr=o.lr or 0.0, betas=o.betas, eps=o.eps,
                                     weight_decay=o.weight_decay, embedding_weight_decay=o.embedding_weight_decay,
                                     norm_weight_decay=o.norm_weight_decay, fused=o.fused)
        spikes = SpikeDetector(cfg.spike.window, cfg.spike.min_history, cfg.spike.sigma) if cfg.spike.enabled else None
        self.guard = StepGuard(spikes)
        self.peak_lr = o.lr
        self._restore()
        self.schedule = LRSchedule(peak_lr=self.peak_lr, name=cfg.schedule.name, warmup_steps=cfg.schedule.warmup_steps,
                                   decay_steps=cfg.decay_steps, final_lr_ratio=cfg.schedule.final_lr_ratio)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.metrics = TrainMetrics(global_batch_tokens=cfg.global_batch_tokens, world_size=self.dist.world_size,
                                    flops_per_token=self.flops_per_token, peak_flops=peak_flops(self.device),
                                    device=self.device, log_interval=cfg.log_interval, max_steps=cfg.max_steps)
        self.checkpointer = ckpt.Checkpointer(self.ckpt_dir, cfg.checkpoint, cfg.max_steps, self.model,
                                              self.optimizer, self.trainer_state, cfg.to_yaml(),
                                              log=self.metrics.message)

    @property
    def spikes(self) -> SpikeDetector | None:
        return self.guard.spikes

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.metrics.history

    # ------------------------------------------------------------------ building
    def _build_data(self) -> tuple[TrainData, EvalData | None, str | None]:
        cfg, d = self.cfg, self.cfg.data
        vocab = cfg.model.vocab_size if d.check_token_ids else None
        tokenizer_json = None
        eval_paths = list(d.eval_paths)
        if d.sources:
            sources = [TokenSource(s.paths, d.seq_len, s.dtype, vocab, name=s.name) for s in d.sources]
            weights = [s.weight for s in d.sources]
        else:
            if cfg.model.vocab_size < ByteTokenizer.vocab_size:
                raise ConfigError(
                    f"the built-in corpus uses the byte tokenizer ({ByteTokenizer.vocab_size} ids); "
                    f"model.vocab_size is {cfg.model.vocab_size}"
                )
            if self.dist.is_main:
                corpus = stdlib_corpus(d.cache_dir)
            self._barrier()
            corpus = stdlib_corpus(d.cache_dir)  # built by rank 0; now a cache hit everywhere
            sources = [TokenSource([corpus["train"]], d.seq_len, "uint32", vocab, name="stdlib")]
            weights = [1.0]
            eval_paths = eval_paths or [corpus["val"]]
            tokenizer_json = str(Path(corpus["dir"]) / "tokenizer.json")
            if self.dist.is_main and not os.path.isfile(tokenizer_json):
                ByteTokenizer().save(tokenizer_json)
        train = TrainData(sources, weights, cfg.global_batch_instances, seed=d.seed,
                          rank=self.dist.rank, world_size=self.dist.world_size)
        evaluation = None
        if cfg.eval_interval and eval_paths:
            source = TokenSource(eval_paths, d.seq_len, d.eval_dtype, vocab, name="eval")
            evaluation = EvalData(source, cfg.global_batch_instances, cfg.eval_batches,
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        return train, evaluation, tokenizer_json

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        if self.strategy == "fsdp":
            # Every rank builds on meta and shards; rank 0 initializes the full
            # model on the host with the seed and broadcasts it into the shards,
            # so the weights are the same for any number of ranks.
            model = Olmo2ForCausalLM.from_config(cfg.model, device="meta")
            model = parallelize(model, "fsdp", self.device, self.precision, cfg.parallel.activation_checkpointing,
                                cfg.parallel.compile, cfg.parallel.reduce_fp32)
            model.to_empty(device=self.device)
            full = {}
            if self.dist.is_main:
                full = Olmo2ForCausalLM.from_config(cfg.model, device="cpu").state_dict()
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                       broadcast_from_rank0=True))
            return model
        model = Olmo2ForCausalLM.from_config(cfg.model, device=self.device)
        return parallelize(model, self.strategy, self.device, self.precision, cfg.parallel.activation_checkpointing,
                           cfg.parallel.compile, cfg.parallel.reduce_fp32)

    def _apply_optim_hparams(self) -> None:
        """The config's AdamW settings win over those a loaded checkpoint carried."""
        o = self.cfg.optim
        for group in self.optimizer.param_groups:
            group["betas"], group["eps"] = tuple(o.betas), o.eps
            group["weight_decay"] = 0.0 if group.get("name") == "no_decay" else o.weight_decay

    def _restore(self) -> None:
        cfg = self.cfg
        resume_from = None
        if cfg.resume == "auto":
            resume_from = ckpt.latest_checkpoint(self.ckpt_dir) if (self.ckpt_dir / ckpt.LATEST).is_file() else None
        elif cfg.resume != "never":
            resume_from = ckpt.resolve_checkpoint(cfg.resume)
        elif ckpt.list_checkpoints(self.ckpt_dir):
            raise ConfigError(
                f"resume=never but {self.ckpt_dir} already holds checkpoints; use resume=auto to continue "
                "that run, or another run_name/out_dir"
            )
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, self.model, self.optimizer)
            self.step = int(state["step"])
            self.tokens_seen = int(state["tokens_seen"])
            self.last_lr = float(state.get("lr", 0.0))
            self.train_data.load_state_dict(state["data"])
            self.guard.load_state_dict(state)
            if self.peak_lr is None:
                self.peak_lr = float(state["peak_lr"])
            self.resumed_from = str(resume_from)
        elif cfg.init_from:
            source = ckpt.resolve_checkpoint(cfg.init_from)
            state = ckpt.load_checkpoint(source, self.model,
                                         self.optimizer if cfg.init_from_optimizer else None, restore_rng=False)
            if self.peak_lr is None:
                # Stage 2: start from the learning rate stage 1 ended with.
                self.peak_lr = float(state["lr"])
            self.init_from = str(source)
        self._apply_optim_hparams()

    # ------------------------------------------------------------------ state
    def _barrier(self) -> None:
        if self.dist.distributed:
            torch.distributed.barrier()

    def trainer_state(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "lr": self.last_lr,
            "peak_lr": self.peak_lr,
            "data": self.train_data.state_dict(),
            **self.guard.state_dict(),
        }

    def save(self) -> Path:
        return self.checkpointer.save(self.step)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: torch.Tensor) -> StepResult:
        cfg = self.cfg
        micro = cfg.micro_batch_instances
        # Count targets on the host (free), sum over ranks on the device (no sync).
        local_count = torch.tensor(float((batch[:, 1:] != IGNORE_INDEX).sum()))
        if self.device.type == "cuda":
            # Pinned host memory: the copies below are asynchronous, so building
            # this step's inputs does not wait for the previous optimizer step.
            batch, local_count = batch.pin_memory(), local_count.pin_memory()
        global_count = all_reduce_sum(local_count.to(self.device, non_blocking=True))
        chunks = batch.split(micro)
        scale = self.dist.world_size / global_count.clamp(min=1.0)
        sums = torch.zeros(2, device=self.device)  # ce, z (this rank's sums)
        self.model.train()
        for i, chunk in enumerate(chunks):
            ids = chunk.to(self.device, non_blocking=True)
            with no_grad_sync(self.model, last_micro_batch=i == len(chunks) - 1), \
                    autocast_context(self.device, self.precision, self.strategy):
                out = self.model(input_ids=ids, labels=ids, z_loss_coef=cfg.optim.z_loss_coef, reduction="sum")
                (out.loss * scale).backward()
            sums += torch.stack([out.ce_loss.detach().float(), out.z_loss.detach().float()])
        grad_norm = clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
        all_reduce_sum(sums)
        per_token = sums / global_count.clamp(min=1.0)
        # The one host sync of the step: everything the decision and the log need.
        ce, z, norm, count = torch.cat([per_token, grad_norm.reshape(1).float().to(self.device),
                                        global_count.reshape(1)]).tolist()
        loss = ce + z

        lr = self.schedule(self.step + 1)
        try:
            reason = self.guard.check(self.step + 1, loss, norm)
            if reason is None:
                set_lr(self.optimizer, lr)
                self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_lr = lr
        self.tokens_seen += cfg.global_batch_tokens
        return StepResult(loss=loss, ce_loss=ce, z_loss=z, grad_norm=norm, lr=lr, target_tokens=count, skipped=reason)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean cross-entropy (and z-loss) over the fixed evaluation batches."""
        if self.eval_data is None:
            return {}
        sums = torch.zeros(3, device=self.device)
        self.model.eval()
        for batch in self.eval_data:
            for chunk in batch.split(self.cfg.micro_batch_instances):
                ids = chunk.to(self.device)
                with autocast_context(self.device, self.precision, self.strategy):
                    out = self.model(input_ids=ids, labels=ids, z_loss_coef=self.cfg.optim.z_loss_coef,
                                     reduction="sum")
                sums += torch.stack([out.ce_loss.float(), out.z_loss.float(), out.num_tokens.float()])
        self.model.train()
        ce, z, n = all_reduce_sum(sums).tolist()
        return {"eval/ce_loss": ce / max(n, 1.0), "eval/z_loss": z / max(n, 1.0)}

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps``, checkpoint, export; returns a summary."""
        with olmo2_kernels.use_backend(self.cfg.kernel_backend):
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._start_run()
        data = iter(self.train_data)
        last_loss = None
        try:
            while self.step < cfg.max_steps:
                self.metrics.start_step()
                result = self.train_step(next(data))
                record = self.metrics.record(self.step, result, self.tokens_seen)
                last_loss = result.loss
                if self.eval_data is not None and self.step % cfg.eval_interval == 0:
                    record.update(self.evaluate())
                self.metrics.log(self.step, record)
                self.checkpointer.maybe_save(self.step)
            final = self._finish_run()
        finally:
            self.metrics.close()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "last_loss": last_loss,
                "run_dir": str(self.run_dir), **final}

    def _start_run(self) -> None:
        """Open the metrics sinks; rank 0 writes the resolved config and says what runs."""
        cfg = self.cfg
        self.metrics.open(self.run_dir, start_step=self.step, enabled=self.dist.is_main,
                          progress=cfg.progress, tensorboard=cfg.tensorboard)
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(self.run_dir / "config.yaml")
        n_params = num_parameters(cfg.model)
        how = f"resumed from {self.resumed_from}" if self.resumed_from else (
            f"initialized from {self.init_from}" if self.init_from else "from scratch")
        self.metrics.message(
            f"olmo2-train: {n_params / 1e6:.2f}M parameters, {self.dist.world_size} rank(s) on "
            f"{self.device.type} ({self.strategy}, {self.precision}), global batch "
            f"{cfg.global_batch_instances} x {cfg.data.seq_len} tokens, {self.grad_accum} micro-batch(es) "
            f"per rank, steps {self.step} -> {cfg.max_steps}, {how}; run folder {self.run_dir}"
        )

    def _finish_run(self) -> dict[str, str]:
        """The final checkpoint and the Hugging Face export; their paths for the summary."""
        final = {}
        path = self.checkpointer.save_final(self.step)
        if path is not None:
            final["checkpoint"] = str(path)
        if self.cfg.checkpoint.export_hf:
            out = ckpt.export_hf(self.base_model, self.run_dir / "hf", tokenizer_json=self.tokenizer_json)
            if out is not None:
                self.metrics.message(f"Hugging Face checkpoint: {out}")
                final["hf"] = str(out)
        return final
