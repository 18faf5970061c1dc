"""Training metrics: the typed result of a step, MFU, memory, and the
loggers (console progress bar, a JSONL file, TensorBoard when installed).

:class:`TrainMetrics` is the trainer's metrics component: it times steps,
turns each :class:`StepResult` into the record that is logged, keeps the
recent history, and decides which steps are written.

The trainer reads its per-step scalars from the device once per step, all
together (see :mod:`olmo2.train.trainer`); nothing here touches a device tensor.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import FLOPS_CONVENTION
from ..files import atomic_write

def mfu(tokens_per_second_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOP utilization: achieved training FLOP/s over the device's peak."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_second_per_device * flops_per_token / peak


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak device memory since the last call (GiB) on CUDA; peak process RSS on CPU."""
    if device.type == "cuda":
        out = {
            "mem/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem/max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return out
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"mem/max_rss_gib": rss_kib / 2**20}


# ---------------------------------------------------------------------- step result
@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured (host floats, read in the step's one sync)."""

    loss: float
    ce_loss: float
    z_loss: float
    grad_norm: float
    lr: float
    # Non-ignored target tokens of the global batch.
    target_tokens: float
    # Why the optimizer update was skipped, or None when it was applied.
    skipped: str | None = None


# ---------------------------------------------------------------------- loggers
class MetricsLogger:
    """Rank-0 metrics sink: ``metrics.jsonl`` in the run folder, a tqdm bar, TensorBoard if installed.

    On resume at step ``S``, lines after ``S`` left by an interrupted run are
    dropped, so the file reads as one run: the file is rewritten atomically,
    and only when there is something to drop; otherwise it is only appended
    to. The trainer holds the run folder's lock, so no other writer has the
    file open meanwhile.
    """

    def __init__(self, run_dir: str | os.PathLike, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.path = Path(run_dir) / "metrics.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self.file = open(self.path, "a", encoding="utf-8")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=max(start_step, 0), unit="step", dynamic_ncols=True,
                            file=sys.stderr)  # start_step -1: a fresh run that drops every old line
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        dropped = 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step and line.endswith("\n"):
                        kept.append(line)
                        continue
                except json.JSONDecodeError:
                    pass  # a line cut by a crash
                dropped += 1
        if dropped:
            with atomic_write(self.path) as f:
                f.write("".join(kept))

    def log(self, step: int, metrics: dict[str, Any], bar_keys: tuple[str, ...] = ("loss", "grad_norm", "lr")) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:  # a full disk: say which file
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: _short(metrics[k]) for k in bar_keys if k in metrics}, refresh=False)
            self.bar.refresh()

    def console(self, log):
        """``log`` (a function printing a line to stderr) routed around the progress bar:
        while there is one, the bar is cleared, the line printed and the bar redrawn."""
        if self.bar is None:
            return log
        bar = self.bar

        def write(text: str) -> None:
            with bar.external_write_mode(file=sys.stderr):
                log(text)

        return write

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3e}" if (value != 0 and abs(value) < 1e-2) else f"{value:.4f}"
    return str(value)


# ---------------------------------------------------------------------- the trainer's component
# Trainer history keeps at least the last this many steps (metrics.jsonl has them all).
HISTORY_LIMIT = 10_000


class TrainMetrics:
    """Step timing, per-step records, the in-memory history and the log cadence.

    ``start_step()`` starts the clock (evaluation and saving between steps are
    outside it); ``record(step, result, tokens_seen)`` returns the step's record
    (the result's scalars, throughput, MFU when the device's peak is known) and
    appends it to ``history``; ``log(step, record)`` writes it on log steps
    (every ``log_interval``, the last step, and any step with evaluation).
    """

    def __init__(self, *, global_batch_tokens: int, world_size: int, flops_per_token: float,
                 peak_flops: float | None, device: torch.device, log_interval: int, max_steps: int) -> None:
        self.logger: MetricsLogger | None = None
        self.global_batch_tokens = global_batch_tokens
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.device = device
        self.log_interval = log_interval
        self.max_steps = max_steps
        self.history: list[dict[str, Any]] = []
        self._started = time.perf_counter()

    def open(self, run_dir: str | os.PathLike, start_step: int, enabled: bool, progress: bool,
             tensorboard: bool) -> None:
        """Start the sinks (rank 0 only when ``enabled`` is False elsewhere)."""
        self.logger = MetricsLogger(run_dir, self.max_steps, start_step=start_step, enabled=enabled,
                                    progress=progress, tensorboard=tensorboard)

    def start_step(self) -> None:
        self._started = time.perf_counter()

    def record(self, step: int, result: StepResult, tokens_seen: int) -> dict[str, Any]:
        step_time = time.perf_counter() - self._started
        tokens_per_s = self.global_batch_tokens / step_time
        per_device = tokens_per_s / self.world_size
        record: dict[str, Any] = {**asdict(result)}
        record.update(
            tokens_seen=tokens_seen,
            tokens_per_s=tokens_per_s,
            tokens_per_s_per_device=per_device,
            step_time_s=step_time,
            skipped=int(result.skipped is not None),
        )
        util = mfu(per_device, self.flops_per_token, self.peak_flops)
        if util is not None:
            record.update(mfu=util, flops_per_token=self.flops_per_token, flops_convention=FLOPS_CONVENTION)
        if result.skipped is not None:
            self.message(f"step {step}: optimizer step skipped: {result.skipped}")
        self.history.append({"step": step, **record})
        if len(self.history) > 2 * HISTORY_LIMIT:
            del self.history[:-HISTORY_LIMIT]
        return record

    def log(self, step: int, record: dict[str, Any]) -> None:
        if step % self.log_interval == 0 or step == self.max_steps or "eval/ce_loss" in record \
                or "downstream/seconds" in record:
            record.update(memory_stats(self.device))
            if self.logger is not None:
                self.logger.log(step, record)

    def message(self, text: str) -> None:
        if self.logger is not None:
            self.logger.message(text)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None
