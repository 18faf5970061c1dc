"""Evaluate a model on built tasks: score (a slice per rank), gather, compute the metrics.

:func:`evaluate_tasks` is what ``olmo2-eval`` and the trainer's in-loop
evaluation (:mod:`olmo2.train.evaluation`) both run. Under
``torch.distributed`` each rank scores every ``world_size``-th request of the
length-sorted order (so the slices cost about the same), the log-likelihoods
are all-gathered, and every rank computes the same metrics.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .metrics import chance_accuracy, compute_metrics
from .scoring import DEFAULT_BATCH_TOKENS, RequestScorer
from .tasks import Task


@dataclass
class TaskResult:
    """One task's metrics and what it cost."""

    task: str
    source: str
    primary_metric: str
    metrics: dict[str, float]
    num_docs: int
    num_requests: int
    tokens: int  # query tokens scored, all ranks
    seconds: float
    chance: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def evaluate_tasks(model: nn.Module, tasks: Sequence[Task], batch_tokens: int = DEFAULT_BATCH_TOKENS,
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   progress: bool = True, pad_id: int = 0) -> list[TaskResult]:
    """Score every task's requests with ``model`` and return the metrics per task (every rank)."""
    rank, world = _dist()
    scorer = RequestScorer(model, batch_tokens=batch_tokens, autocast=autocast, pad_id=pad_id)
    was_training = model.training
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        total = sum(t.num_tokens for t in tasks)
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="eval", dynamic_ncols=True, file=sys.stderr)
    results = []
    try:
        for task in tasks:
            start = time.perf_counter()
            # One plan on every rank (longest first); rank r takes batches r, r + world, ...
            plan = scorer.batches(task.requests)
            mine = plan[rank::world]
            # A sharded model's forward is collective: every rank runs as many batches
            # (the short ranks repeat their first batch and drop the result).
            dummies = (-(-len(plan) // world) - len(mine)) if (world > 1 and plan and scorer.sharded) else 0
            if bar is not None:
                bar.set_description(task.name)
            pairs = []
            for batch in mine:
                values = scorer.score_batch([task.requests[i] for i in batch])
                pairs.extend(zip(batch, values))
                if bar is not None:
                    bar.update(sum(len(task.requests[i].query) for i in batch) * world)
            for _ in range(dummies):
                scorer.score_batch([task.requests[i] for i in plan[0]])
            if world > 1:
                gathered: list[Any] = [None] * world
                torch.distributed.all_gather_object(gathered, pairs)
                pairs = [p for part in gathered for p in part]
            logprobs = [0.0] * len(task.requests)
            for i, ll in pairs:
                logprobs[i] = ll
            metrics = compute_metrics(task, logprobs)
            results.append(TaskResult(
                task=task.name, source=task.source, primary_metric=task.primary_metric, metrics=metrics,
                num_docs=len(task.docs), num_requests=len(task.requests), tokens=task.num_tokens,
                seconds=time.perf_counter() - start, chance=chance_accuracy(task),
                extra={"skipped_docs": task.skipped_docs} if task.skipped_docs else {},
            ))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return results


def format_table(results: Sequence[TaskResult]) -> str:
    """The console table: one row per task, primary metric first."""
    header = ("task", "docs", "primary", "value", "chance", "acc_raw", "acc_char", "acc_uncond", "bpb", "s")
    rows = []
    for r in results:
        m = r.metrics

        def f(key: str, digits: int = 4) -> str:
            return f"{m[key]:.{digits}f}" if key in m else "-"

        rows.append((r.task, str(r.num_docs), r.primary_metric, f("primary"),
                     "-" if r.chance is None else f"{r.chance:.4f}", f("acc_raw"), f("acc_per_char"),
                     f("acc_uncond"), f("bpb"), f"{r.seconds:.1f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
