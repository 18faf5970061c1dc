"""Training metrics: the spike detector, MFU, and the loggers (console progress
bar, a JSONL file, TensorBoard when installed).

The trainer reads its per-step scalars from the device once per step, all
together (see :mod:`olmo2.train`); nothing here touches a device tensor.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s (no sparsity) by device name, matched in order by
# substring of ``torch.cuda.get_device_name()``. MFU is not reported for
# devices missing here, nor on CPU.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.5e12),  # SXM (HBM3)
    ("H200", 989.5e12),
    ("H800", 989.5e12),
    ("GH200", 989.5e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362.05e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165.2e12),
)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of ``device``, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


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


# ---------------------------------------------------------------------- spikes
class SpikeDetector:
    """Skip the optimizer step when the loss or the gradient norm is a spike.

    OLMo-core's rule: a value is a spike when it exceeds the mean of the last
    ``window`` (128) values by more than ``sigma`` (6) standard deviations;
    judged only once ``min_history`` (64) values exist. Non-finite values are
    always rejected and never enter the history; spikes do enter it (as in
    OLMo-core), so a lasting shift in level is accepted after a while.
    """

    def __init__(self, window: int = 128, min_history: int = 64, sigma: float = 6.0):
        if window < 2 or not 2 <= min_history <= window or sigma <= 0:
            raise ValueError(
                f"SpikeDetector: need window >= 2, 2 <= min_history <= window and sigma > 0, "
                f"got window={window}, min_history={min_history}, sigma={sigma}"
            )
        self.window, self.min_history, self.sigma = window, min_history, sigma
        self.history: dict[str, deque] = {"loss": deque(maxlen=window), "grad_norm": deque(maxlen=window)}
        self.skipped = 0

    def threshold(self, key: str) -> float | None:
        values = self.history[key]
        if len(values) < self.min_history:
            return None
        n = len(values)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / (n - 1)
        return mean + self.sigma * math.sqrt(var)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Why this step must be skipped (``"loss spike"``, ``"grad_norm spike"``), or None;
        then records the values."""
        reason = None
        for key, value in (("loss", loss), ("grad_norm", grad_norm)):
            limit = self.threshold(key)
            if reason is None and limit is not None and value > limit:
                reason = f"{key} spike ({value:.4g} > {limit:.4g})"
        for key, value in (("loss", loss), ("grad_norm", grad_norm)):
            if math.isfinite(value):
                self.history[key].append(float(value))
        if reason is not None:
            self.skipped += 1
        return reason

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, values in state["history"].items():
            self.history[key] = deque((float(v) for v in values), maxlen=self.window)
        self.skipped = int(state.get("skipped", 0))


# ---------------------------------------------------------------------- loggers
class MetricsLogger:
    """Rank-0 metrics sink: ``metrics.jsonl`` in the run folder, a tqdm bar, TensorBoard if installed.

    On resume at step ``S``, lines after ``S`` left by an interrupted run are
    dropped, so the file reads as one run.
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

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
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
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any], bar_keys: tuple[str, ...] = ("loss", "grad_norm", "lr")) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: _short(metrics[k]) for k in bar_keys if k in metrics}, refresh=False)
            self.bar.refresh()

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
