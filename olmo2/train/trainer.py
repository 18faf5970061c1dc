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
(:class:`olmo2.train.metrics.TrainMetrics`), evaluation (:meth:`Trainer.evaluate`; the downstream tasks,
:class:`olmo2.train.evaluation.DownstreamEvaluator`)
and checkpointing (:class:`olmo2.train.checkpoint.Checkpointer`).

Resume is exact: the checkpoint (:mod:`olmo2.train.checkpoint`) holds model,
optimizer, step, tokens seen, data position, spike history and RNG states;
on CPU a run of N steps and a run of N/2 steps resumed for N/2 more end with
bitwise-identical weights. Resume loads the newest checkpoint that verifies
(falling back loudly past damaged ones, never to a silent fresh start) and
refuses a learning-rate schedule other than the one the checkpoint was trained
with unless ``schedule.decay_steps`` says so (``hard_stop`` ends a run early
without touching the schedule).

Nothing lost: the run folder is locked (:mod:`olmo2.train.runlock`) for as
long as a trainer is built or fitting; SIGINT/SIGTERM finish the step, save and
stop (:mod:`olmo2.train.signals`); no checkpoint is written while steps are
being skipped as non-finite, and non-finite weights stop the run
(:mod:`olmo2.train.stability`).
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import olmo2_kernels

from ..byte_tokenizer import ByteTokenizer
from ..config import flops_per_token, num_parameters
from ..hardware import peak_flops
from ..model import IGNORE_INDEX
from ..tokenizers import NAMES as SHIPPED_TOKENIZERS
from ..tokenizers import save_tokenizer
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .corpus import default_cache_dir, stdlib_corpus
from .data import EvalData, TokenSource, TrainData, sidecar_tokenizer
from .evaluation import DownstreamEvaluator
from .init import build_model
from .metrics import StepResult, TrainMetrics
from .optim import LRSchedule, build_adamw, clip_grad_norm_, set_lr
from .parallel import (
    DistInfo,
    all_reduce_sum,
    autocast_context,
    check_shard_degree,
    init_distributed,
    no_grad_sync,
    resolve_precision,
    resolve_strategy,
    unwrap,
)
from .runlock import RunLock, RunLockedError
from .signals import GracefulStop, TrainingStopped
from .spike_score import SpikeScore
from .stability import NonFiniteStateError, SpikeDetector, StepGuard, first_nonfinite

SCHEDULE_KEYS = ("name", "warmup_steps", "decay_steps", "final_lr_ratio", "peak_lr")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds model, optimizer, data and the components from a :class:`TrainConfig`, and trains.

    ``Trainer(cfg).fit()`` runs to ``cfg.stop_step`` (resuming when the run
    folder has a checkpoint and ``cfg.resume`` allows) and returns a summary.
    ``history`` keeps the records of the last steps (all ranks; at least
    :data:`olmo2.train.metrics.HISTORY_LIMIT` of them). The run folder is locked
    from construction until :meth:`fit` returns (or :meth:`close`).
    """

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.device)
        self.run_dir = Path(cfg.run_dir)
        self.lock = RunLock(self.run_dir, log=self._say)
        self._lock_run_folder()
        try:
            self._build(cfg)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: TrainConfig) -> None:
        self.device = self.dist.device
        self.strategy = resolve_strategy(cfg.parallel.strategy, self.dist.world_size)
        self.precision = resolve_precision(cfg.parallel.precision, self.device)
        try:
            check_shard_degree(cfg.parallel.shard_degree, self.dist.world_size, self.strategy)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.precision == "bf16" and self.device.type == "cpu":
            raise ConfigError("parallel.precision=bf16 is for GPUs; use fp32 (or auto) on CPU")
        self.grad_accum = cfg.grad_accum_steps(self.dist.world_size)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.tokens_seen = 0
        self.last_lr = 0.0
        self.resumed_from: str | None = None
        self.init_from: str | None = None
        self._stop: GracefulStop | None = None
        self._stop_agreed = False

        seed_everything(cfg.seed)
        self.train_data, self.eval_data, self.tokenizer_json = self._build_data()
        # Downstream tasks are read and tokenized once, here (None when not configured).
        self.downstream = DownstreamEvaluator.build(cfg.downstream_eval, run_tokenizer=self.tokenizer_json,
                                                    seq_len=cfg.data.seq_len, vocab_size=cfg.model.vocab_size,
                                                    max_steps=cfg.stop_step, log=self._say)
        self.spike_scores = {key: SpikeScore() for key in ("loss", "grad_norm")}
        self.model = self._build_model()
        self.base_model = unwrap(self.model)
        o = cfg.optim
        self.optimizer = build_adamw(self.base_model, lr=o.lr or 0.0, betas=o.betas, eps=o.eps,
                                     weight_decay=o.weight_decay, embedding_weight_decay=o.embedding_weight_decay,
                                     norm_weight_decay=o.norm_weight_decay, fused=o.fused)
        spikes = SpikeDetector(cfg.spike.window, cfg.spike.min_history, cfg.spike.sigma) if cfg.spike.enabled else None
        self.guard = StepGuard(spikes)
        self.peak_lr = o.lr
        saved_schedule = self._restore()
        self.schedule = LRSchedule(peak_lr=self.peak_lr, name=cfg.schedule.name, warmup_steps=cfg.schedule.warmup_steps,
                                   decay_steps=cfg.decay_steps, final_lr_ratio=cfg.schedule.final_lr_ratio)
        if saved_schedule is not None:
            self._check_schedule(saved_schedule)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.metrics = TrainMetrics(global_batch_tokens=cfg.global_batch_tokens, world_size=self.dist.world_size,
                                    flops_per_token=self.flops_per_token, peak_flops=peak_flops(self.device),
                                    device=self.device, log_interval=cfg.log_interval, max_steps=cfg.stop_step)
        self.checkpointer = ckpt.Checkpointer(self.ckpt_dir, cfg.checkpoint, cfg.stop_step, self.model,
                                              self.optimizer, self.trainer_state, cfg.to_yaml(),
                                              log=self.metrics.message, tokenizer_json=self.tokenizer_json,
                                              hold=self._hold_checkpoints)

    # ------------------------------------------------------------------ run folder
    def _say(self, text: str) -> None:
        """One line on stderr from rank 0, before the metrics sinks are open."""
        if self.dist.is_main:
            print(f"olmo2-train: {text}", file=sys.stderr, flush=True)

    def _lock_run_folder(self) -> None:
        """Rank 0 locks the run folder; every rank raises the same error when it is taken."""
        problem = None
        if self.dist.is_main:
            try:
                self.lock.acquire()
            except RunLockedError as exc:
                problem = str(exc)
        if self.dist.distributed:
            box = [problem]
            torch.distributed.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem is not None:
            raise RunLockedError(problem)

    def close(self) -> None:
        """Wait for a checkpoint being written in the background, then release the run
        folder (the trainer is done with it)."""
        checkpointer = getattr(self, "checkpointer", None)
        try:
            if checkpointer is not None:
                checkpointer.close()
        finally:
            self.lock.release()

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
        if d.sources or d.tokenizer is not None:
            tokenizer_json = self._data_tokenizer([p for s in sources for p in s.paths])
        train = TrainData(sources, weights, cfg.global_batch_instances, seed=d.seed,
                          rank=self.dist.rank, world_size=self.dist.world_size)
        evaluation = None
        if cfg.eval_interval and eval_paths:
            source = TokenSource(eval_paths, d.seq_len, d.eval_dtype, vocab, name="eval")
            evaluation = EvalData(source, cfg.global_batch_instances, cfg.eval_batches,
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        return train, evaluation, tokenizer_json

    def _data_tokenizer(self, paths: list[str]) -> str | None:
        """The tokenizer.json of the training data: ``data.tokenizer``, else the one the
        files' olmo2-tokenize sidecars name; None (with a warning) when unknown."""
        spec = self.cfg.data.tokenizer
        where = "data.tokenizer"
        if spec is None:
            named = {}
            for path in paths:
                found = sidecar_tokenizer(path)
                if found is not None:
                    named.setdefault(found, path)
            if len(named) > 1:
                listing = "; ".join(f"{f}.json names {t}" for t, f in named.items())
                raise ConfigError(f"the token files were made with different tokenizers ({listing}); "
                                  "set data.tokenizer to the right one")
            if not named:
                self._say("warning: no tokenizer is known for the token files (no olmo2-tokenize sidecar "
                          "<file>.json); the Hugging Face export will lack tokenizer.json: set data.tokenizer")
                return None
            spec, source = next(iter(named.items()))
            where = f"the sidecar {source}.json"
        if spec in SHIPPED_TOKENIZERS:  # "byte", "dolma2": written once into the cache as a file to copy
            path = Path(self.cfg.data.cache_dir or default_cache_dir()) / "tokenizers" / spec / "tokenizer.json"
            if self.dist.is_main and not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                save_tokenizer(spec, path)
            self._barrier()
        else:
            path = Path(spec)
            if path.is_dir():
                path = path / "tokenizer.json"
            if not path.is_file():
                raise ConfigError(f"{where} names the tokenizer {spec}, which does not exist ({path})")
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        except Exception as exc:  # noqa: BLE001 - the library's message says what is wrong with the file
            raise ConfigError(f"{where}: {path} is not a tokenizer.json ({str(exc).splitlines()[0]}) ({path})") \
                from None
        if vocab > self.cfg.model.vocab_size:
            raise ConfigError(f"{where}: the tokenizer has {vocab} ids, more than model.vocab_size "
                              f"({self.cfg.model.vocab_size}) ({path})")
        return str(path)

    def _build_model(self) -> torch.nn.Module:
        # Built on meta, parallelized, then each rank allocates and initializes only
        # its own shards (olmo2.train.init): the same weights for any number of ranks
        # and any mesh, and no rank ever holds the full model. A run that resumes, or
        # starts stage 2 from init_from, skips the initial values (32B over 64 ranks:
        # ~10 s a rank), which the load overwrites: it loads the full model state dict
        # or fails (a checkpoint that lacks a parameter is refused,
        # ckpt.load_checkpoint), never training on the allocated memory.
        cfg, par = self.cfg, self.cfg.parallel
        return build_model(cfg.model, self.strategy, self.device, self.precision, cfg.seed,
                           activation_checkpointing=par.activation_checkpointing, compile=par.compile,
                           reduce_fp32=par.reduce_fp32, shard_degree=par.shard_degree,
                           init_values=not self._will_load_weights())

    def _will_load_weights(self) -> bool:
        """Whether :meth:`_restore` will load a checkpoint into the whole model or raise:
        ``resume=auto`` with a checkpoint in the run folder (if none loads, it raises
        rather than start from scratch), ``resume=PATH``, or else ``init_from`` (a
        folder without a checkpoint is refused)."""
        if self.cfg.resume == "auto" and ckpt.list_checkpoints(self.ckpt_dir):
            return True
        if self.cfg.resume not in ("auto", "never"):
            return True
        return bool(self.cfg.init_from)

    def _apply_optim_hparams(self) -> None:
        """The config's AdamW settings win over those a loaded checkpoint carried."""
        o = self.cfg.optim
        for group in self.optimizer.param_groups:
            group["betas"], group["eps"] = tuple(o.betas), o.eps
            group["weight_decay"] = 0.0 if group.get("name") == "no_decay" else o.weight_decay

    def _restore(self) -> dict[str, Any] | None:
        """Load the checkpoint to resume from (or to initialize from); returns the
        schedule a resumed checkpoint was trained with, else None."""
        cfg = self.cfg
        verify = cfg.checkpoint.verify
        path, state = None, None
        if cfg.resume == "auto":
            path, state = ckpt.load_newest_good(self.ckpt_dir, self.model, self.optimizer, verify=verify,
                                                log=self._say, move_damaged=True)
        elif cfg.resume != "never":
            path, state = ckpt.load_newest_good(cfg.resume, self.model, self.optimizer, verify=verify, log=self._say)
            if path is None:
                raise FileNotFoundError(f"resume: {cfg.resume} holds no checkpoint ({cfg.resume})")
        elif ckpt.list_checkpoints(self.ckpt_dir):
            raise ConfigError(
                f"resume=never but {self.ckpt_dir} already holds checkpoints; use resume=auto to continue "
                "that run, or another run_name/out_dir"
            )
        saved_schedule = None
        if path is not None:
            self.step = int(state["step"])
            self.tokens_seen = int(state["tokens_seen"])
            self.last_lr = float(state.get("lr", 0.0))
            self.train_data.load_state_dict(state["data"])
            self.guard.load_state_dict(state)
            if self.downstream is not None:
                self.downstream.load_state_dict(state.get("downstream"))
            for key, saved in (state.get("spike_score") or {}).items():
                self.spike_scores[key].load_state_dict(saved)
            if self.peak_lr is None:
                self.peak_lr = float(state["peak_lr"])
            self.resumed_from = str(path)
            saved_schedule = state.get("schedule") or self._legacy_schedule(path, state)
        elif cfg.init_from:
            source, state = ckpt.load_newest_good(cfg.init_from, self.model,
                                                  self.optimizer if cfg.init_from_optimizer else None,
                                                  restore_rng=False, verify=verify, log=self._say)
            if source is None:
                raise FileNotFoundError(f"init_from: {cfg.init_from} holds no checkpoint ({cfg.init_from})")
            if self.peak_lr is None:
                # Stage 2: start from the learning rate stage 1 ended with.
                self.peak_lr = float(state["lr"])
            self.init_from = str(source)
        self._apply_optim_hparams()
        return saved_schedule

    @staticmethod
    def _legacy_schedule(path: Path, state: dict[str, Any]) -> dict[str, Any] | None:
        """The schedule of a checkpoint saved before trainer.json held it, from its config.yaml."""
        try:
            old = ckpt.checkpoint_config(path)
        except (ckpt.CheckpointError, FileNotFoundError):
            return None
        return {"name": old.schedule.name, "warmup_steps": old.schedule.warmup_steps,
                "decay_steps": old.decay_steps, "final_lr_ratio": old.schedule.final_lr_ratio,
                "peak_lr": state.get("peak_lr")}

    def _schedule_record(self) -> dict[str, Any]:
        return {key: getattr(self.schedule, key) for key in SCHEDULE_KEYS}

    def _check_schedule(self, saved: dict[str, Any]) -> None:
        """Refuse a decay horizon that only moved because max_steps did; say any other change."""
        now = self._schedule_record()
        saved = {key: saved.get(key, now[key]) for key in SCHEDULE_KEYS}
        if saved == now:
            return
        nxt = self.step + 1
        try:
            before = LRSchedule(**saved)(nxt)
        except (TypeError, ValueError):
            before = float("nan")
        after = self.schedule(nxt)
        changes = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in SCHEDULE_KEYS if saved[k] != now[k])
        if saved["decay_steps"] != now["decay_steps"] and self.cfg.schedule.decay_steps is None:
            raise ConfigError(
                f"resuming {self.resumed_from} would change the learning-rate schedule it was trained with "
                f"({changes}): schedule.decay_steps is unset, so max_steps={self.cfg.max_steps} sets the decay "
                f"horizon, and the LR of step {nxt} would jump from {before:.4g} to {after:.4g}. To keep the "
                f"schedule, add --schedule.decay_steps={saved['decay_steps']}; to take the new horizon, set "
                f"--schedule.decay_steps={now['decay_steps']}; to end early without changing it, use --hard_stop=N"
            )
        self._say(f"WARNING: the learning-rate schedule differs from the one {self.resumed_from} was trained "
                  f"with ({changes}): the LR of step {nxt} is {after:.4g} (it would have been {before:.4g})")

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
            "schedule": self._schedule_record(),
            **self.guard.state_dict(),
            "downstream": self.downstream.state_dict() if self.downstream is not None else None,
            "spike_score": {key: tracker.state_dict() for key, tracker in self.spike_scores.items()},
        }

    def _hold_checkpoints(self) -> str | None:
        """Why no checkpoint may be saved (or pruned) now, or None."""
        n = self.guard.consecutive_nonfinite
        return f"the last {n} step(s) were skipped as non-finite" if n else None

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
        sums = torch.zeros(3, device=self.device)  # ce, z (this rank's sums), stop requested
        self.model.train()
        for i, chunk in enumerate(chunks):
            ids = chunk.to(self.device, non_blocking=True)
            with no_grad_sync(self.model, last_micro_batch=i == len(chunks) - 1), \
                    autocast_context(self.device, self.precision, self.strategy):
                out = self.model(input_ids=ids, labels=ids, z_loss_coef=cfg.optim.z_loss_coef, reduction="sum")
                (out.loss * scale).backward()
            sums[:2] += torch.stack([out.ce_loss.detach().float(), out.z_loss.detach().float()])
        grad_norm = clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
        if self._stop is not None and self._stop.requested:
            sums[2] = 1.0  # a signal: every rank learns it from this step's all-reduce
        all_reduce_sum(sums)
        per_token = sums[:2] / global_count.clamp(min=1.0)
        # The one host sync of the step: everything the decision and the log need.
        ce, z, norm, count, stop = torch.cat([per_token, grad_norm.reshape(1).float().to(self.device),
                                              global_count.reshape(1), sums[2:]]).tolist()
        self._stop_agreed = stop > 0
        loss = ce + z

        lr = self.schedule(self.step + 1)
        try:
            reason = self.guard.check(self.step + 1, loss, norm)
            if reason is None:
                set_lr(self.optimizer, lr)
                self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if reason is not None and self.guard.consecutive_nonfinite:
            bad = first_nonfinite(self.model, self.optimizer)  # only on non-finite steps: no sync otherwise
            if bad is not None:
                raise NonFiniteStateError(
                    f"step {self.step + 1}: {bad} holds NaN or infinity; stopping without saving "
                    f"(newest checkpoint: {self.checkpointer.newest()})")
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
    def fit(self, stop: GracefulStop | None = None) -> dict[str, Any]:
        """Train to ``cfg.stop_step``, checkpoint, export; returns a summary. A first
        SIGINT/SIGTERM finishes the step, saves and raises
        :class:`olmo2.train.signals.TrainingStopped` (``stop``: handlers the caller
        installed; default: installed here). Releases the run folder at the end."""
        try:
            with olmo2_kernels.use_backend(self.cfg.kernel_backend), contextlib.ExitStack() as stack:
                self._stop = stop if stop is not None else stack.enter_context(GracefulStop())
                return self._fit()
        finally:
            self._stop = None
            self.close()

    def _stop_requested(self) -> bool:
        local = self._stop is not None and self._stop.requested
        return self._stop_agreed or (local and not self.dist.distributed)

    def _stop_here(self) -> None:
        """Save the step just finished (unless held back) and raise TrainingStopped."""
        path = self.checkpointer.save_now(self.step)
        note = ""
        if path is None:
            reason = self._hold_checkpoints()
            note = f" ({reason})" if reason else ""
        signum = self._stop.signum if self._stop is not None and self._stop.signum else signal.SIGTERM
        raise TrainingStopped(signum, self.step, str(path) if path is not None else None, note)

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._start_run()
        data = iter(self.train_data)
        last_loss = None
        try:
            if self._stop_requested():
                self._stop_here()
            while self.step < cfg.stop_step:
                self.metrics.start_step()
                result = self.train_step(next(data))
                record = self.metrics.record(self.step, result, self.tokens_seen)
                last_loss = result.loss
                for key, tracker in self.spike_scores.items():  # the OLMo 2 report's stability measure
                    tracker.update(record[key])
                    record[f"spike_score/{key}"] = tracker.score
                if self.eval_data is not None and self.step % cfg.eval_interval == 0:
                    record.update(self.evaluate())
                if self.downstream is not None and self.downstream.due(self.step):
                    record.update(self.downstream(
                        self.model, self.step, autocast=lambda: autocast_context(self.device, self.precision,
                                                                                self.strategy)))
                self.metrics.log(self.step, record)
                self.checkpointer.maybe_save(self.step)
                if self._stop_requested() and self.step < cfg.stop_step:
                    self._stop_here()
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
        self._save_config()
        n_params = num_parameters(cfg.model)
        how = f"resumed from {self.resumed_from}" if self.resumed_from else (
            f"initialized from {self.init_from}" if self.init_from else "from scratch")
        self.metrics.message(
            f"olmo2-train: {n_params / 1e6:.2f}M parameters, {self.dist.world_size} rank(s) on "
            f"{self.device.type} ({self.strategy}, {self.precision}), global batch "
            f"{cfg.global_batch_instances} x {cfg.data.seq_len} tokens, {self.grad_accum} micro-batch(es) "
            f"per rank, steps {self.step} -> {cfg.stop_step}, {how}; run folder {self.run_dir}"
        )

    def _save_config(self) -> None:
        """Write config.yaml; a different one already there is kept as config.before-stepN.yaml."""
        path = self.run_dir / "config.yaml"
        text = self.cfg.to_yaml()
        if path.is_file():
            old = path.read_text(encoding="utf-8")
            if old == text:
                return
            if self.step > 0:
                keep = self.run_dir / f"config.before-{ckpt.step_dirname(self.step)}.yaml"
                os.replace(path, keep)
                self.metrics.message(f"the config changed; the one used up to step {self.step} is kept as {keep}")
        self.cfg.save(path)

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
