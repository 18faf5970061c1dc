"""When an optimizer step is skipped: the spike rule and the non-finite guard,
and the policy that keeps non-finite state out of checkpoints.

:class:`StepGuard` is the trainer's one question before each optimizer update
("skip this step, and why?"): a non-finite loss or gradient norm is always
skipped (and training stops after ``max_consecutive_nonfinite`` in a row); a
loss or gradient-norm spike (:class:`SpikeDetector`) is skipped when enabled.
Its state (the spike history, the skip counts, the current run of non-finite
steps) is checkpointed with the run.

Non-finite state never reaches a checkpoint: while steps are being skipped as
non-finite (:attr:`StepGuard.consecutive_nonfinite` > 0) the trainer saves and
prunes nothing; :func:`first_nonfinite` is checked before every save, after
every load, and on every non-finite step, and non-finite weights or optimizer
state stop the run at once (:class:`NonFiniteStateError`).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

# Stop, rather than skip forever, after this many non-finite steps in a row.
MAX_CONSECUTIVE_NONFINITE = 10


class NonFiniteLossError(RuntimeError):
    """Loss or gradients stayed non-finite for MAX_CONSECUTIVE_NONFINITE steps."""


class NonFiniteStateError(RuntimeError):
    """The weights or the optimizer state hold NaN or infinity: the run stops, nothing is saved."""


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # an FSDP2 shard (DTensor): this rank's part
    return to_local() if to_local is not None else t


def first_nonfinite(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str | None:
    """The name of the first parameter (``model.norm.weight``) or optimizer state
    (``optimizer exp_avg of model.norm.weight``) holding NaN or infinity, or None.

    One host sync for all tensors; with several ranks the verdict is all-reduced,
    so every rank returns the same answer (the name may be another rank's ``?``).
    """
    names: list[str] = []
    flags: list[torch.Tensor] = []
    param_names: dict[int, str] = {}
    for name, param in model.named_parameters():
        param_names[id(param)] = name
        names.append(name)
        flags.append(torch.isfinite(_local(param.detach())).all())
    if optimizer is not None:
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
                    names.append(f"optimizer {key} of {param_names.get(id(param), '?')}")
                    flags.append(torch.isfinite(_local(value.detach())).all())
    if not flags:
        return None
    device = flags[0].device
    ok = torch.stack([f.to(device) for f in flags]).to(torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    bad = (ok == 0).nonzero().flatten().tolist()
    return names[bad[0]] if bad else None


class SpikeDetector:
    """Skip the optimizer step when the loss or the gradient norm is a spike.

    OLMo-core's rule (``SkipStepOptimizer.get_step_factor``, ai2-olmo-core
    3.0): a value is a spike when it exceeds the mean of the previous
    ``window`` (128) values by more than ``sigma`` (6) of their standard
    deviations (unbiased). A step is judged once ``min_history`` (64) values
    exist *counting its own*, that is from the step with ``min_history - 1``
    previous values on (and at least 2, so the deviation is defined).
    Non-finite values are always rejected and never enter the history; spikes
    do enter it (as in OLMo-core), so a lasting shift in level is accepted
    after a while.
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
        """The largest value of ``key`` the next step may have, or None while it is not judged."""
        values = self.history[key]
        n = len(values)
        if n + 1 < self.min_history or n < 2:  # + 1: the value being judged counts (OLMo-core)
            return None
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


class StepGuard:
    """Decides whether the optimizer update of a step is skipped.

    ``check(step, loss, grad_norm)`` returns the reason to skip, or None; it
    raises :class:`NonFiniteLossError` once ``max_consecutive_nonfinite``
    non-finite steps came in a row.
    """

    def __init__(self, spikes: SpikeDetector | None,
                 max_consecutive_nonfinite: int = MAX_CONSECUTIVE_NONFINITE) -> None:
        self.spikes = spikes
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.consecutive_nonfinite = 0
        self.nonfinite_skips = 0

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.consecutive_nonfinite += 1
            self.nonfinite_skips += 1
            if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"step {step}: loss or gradient norm non-finite for {self.consecutive_nonfinite} "
                    "consecutive steps; stopping (lower the learning rate or check the data)"
                )
            return "non-finite loss or gradient"
        self.consecutive_nonfinite = 0
        return self.spikes.check(loss, grad_norm) if self.spikes is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_skips": self.nonfinite_skips, "consecutive_nonfinite": self.consecutive_nonfinite,
                "spike": self.spikes.state_dict() if self.spikes is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        if self.spikes is not None and state.get("spike") is not None:
            self.spikes.load_state_dict(state["spike"])
