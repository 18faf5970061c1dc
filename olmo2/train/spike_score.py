"""The OLMo 2 report's stability measure: the spike score of a training curve.

"Spike score": the percentage of values that lie at least 7 standard
deviations from the rolling mean of the last 1000 values (OLMo 2 report, §3.2,
applied to the loss and to the gradient norm). Here each value is judged
against the ``window`` values before it (mean and unbiased standard deviation
of those), once ``min_history`` of them exist (64, as OLMo-core's spike
skipping; the report does not say, and a deviation from a handful of values
means little); the score is the share of judged values that are spikes, in
percent. Non-finite values are never judged and never enter the window.

:class:`SpikeScore` keeps the running score of one series (its state fits a
checkpoint); :func:`spike_score` runs it over a whole column (what
``olmo2-plot`` does with ``metrics.jsonl``).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable

WINDOW = 1000
SIGMA = 7.0
MIN_HISTORY = 64


class SpikeScore:
    """Running spike score of one series."""

    def __init__(self, window: int = WINDOW, sigma: float = SIGMA, min_history: int = MIN_HISTORY):
        if window < 2 or not sigma > 0 or min_history < 2:
            raise ValueError(f"SpikeScore: need window >= 2, sigma > 0 and min_history >= 2, got window={window}, "
                             f"sigma={sigma}, min_history={min_history}")
        # A window shorter than min_history judges once it is full.
        self.window, self.sigma, self.min_history = window, sigma, min(min_history, window)
        self.values: deque[float] = deque(maxlen=window)
        self.judged = 0
        self.spikes = 0

    def update(self, value: float) -> bool:
        """Judge ``value`` against the window before it, then add it; True if it is a spike."""
        value = float(value)
        if not math.isfinite(value):
            return False
        spike = False
        n = len(self.values)
        if n >= self.min_history:
            mean = sum(self.values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / (n - 1))
            spike = abs(value - mean) >= self.sigma * std and (std > 0 or value != mean)
            self.judged += 1
            self.spikes += spike
        self.values.append(value)
        return spike

    @property
    def score(self) -> float:
        """Percentage of judged values that were spikes (0 before any was judged)."""
        return 100.0 * self.spikes / self.judged if self.judged else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "judged": self.judged, "spikes": self.spikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = deque((float(v) for v in state["values"]), maxlen=self.window)
        self.judged, self.spikes = int(state["judged"]), int(state["spikes"])


def spike_score(values: Iterable[float], window: int = WINDOW, sigma: float = SIGMA) -> tuple[float, list[int]]:
    """``(score in percent, indices of the spikes)`` of a whole series."""
    tracker = SpikeScore(window, sigma)
    spikes = [i for i, v in enumerate(values) if tracker.update(v)]
    return tracker.score, spikes
