"""In-loop downstream evaluation: the trainer's component that scores OLMES tasks every N steps.

As OLMo-core does: the tasks (a config list, names and sets as ``olmo2-eval``
takes them) are built once, at the start of the run (read and tokenized);
every ``interval`` steps and after the last step the trainer calls the
component with its model, and the returned record (per task: the primary
metric, the accuracies, bpb; and the cost) goes into ``metrics.jsonl`` and
TensorBoard next to the loss under ``downstream/<task>/<metric>``.

Its state (how many evaluations ran, their total time, the last step and
record) is part of the trainer checkpoint, so a resumed run reports the same
cumulative cost and evaluates at the same steps as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from ..eval.evaluate import evaluate_tasks
from ..eval.metrics import ACCURACIES
from ..eval.scoring import DEFAULT_BATCH_TOKENS
from ..eval.tasks import Task, expand_task_names, load_task
from ..tokenizers import load_tokenizer, specials

PREFIX = "downstream"


@dataclass
class DownstreamEvalConfig:
    """In-loop downstream evaluation (OLMES tasks; needs the ``eval`` extra)."""

    # Tasks and sets, as olmo2-eval --tasks takes them (e.g. [olmes-core-bpb, arc_easy:rc]). Empty: none.
    tasks: list[str] = field(default_factory=list)
    # Evaluate every N steps and after the last step (0: never).
    interval: int = 0
    # First N documents of each task (null: all).
    limit: int | None = 200
    # Padded tokens per forward pass.
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    # Tokenizer of the tasks: dolma2, byte or a tokenizer.json (null: the run's; dolma2 for token files).
    tokenizer: str | None = None
    # Context length of the queries, cut from the left (null: data.seq_len).
    max_length: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [t for t in self.tasks.split(",") if t.strip()]
        for name, minimum in (("interval", 0), ("batch_tokens", 1), ("limit", 1), ("max_length", 2)):
            value = getattr(self, name)
            if value is None and name in ("limit", "max_length"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"downstream_eval.{name} must be an int >= {minimum}"
                                 f"{' or null' if name in ('limit', 'max_length') else ''}, got {value!r}")
        if self.tasks:
            expand_task_names(self.tasks)  # unknown names fail at config time
        if self.tasks and not self.interval:
            raise ValueError("downstream_eval.tasks are set but downstream_eval.interval is 0; set an interval")

    @property
    def enabled(self) -> bool:
        return bool(self.tasks) and self.interval > 0


class DownstreamEvaluator:
    """Scores ``tasks`` with the trainer's model every ``interval`` steps and after ``max_steps``."""

    def __init__(self, tasks: Sequence[Task], interval: int, max_steps: int,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, pad_id: int = 0, build_seconds: float = 0.0):
        if interval < 1:
            raise ValueError(f"DownstreamEvaluator: interval must be >= 1, got {interval!r}")
        self.tasks = list(tasks)
        self.interval = interval
        self.max_steps = max_steps
        self.batch_tokens = batch_tokens
        self.pad_id = pad_id
        self.build_seconds = build_seconds
        self.runs = 0
        self.total_seconds = 0.0
        self.last_step: int | None = None
        self.last_record: dict[str, float] = {}

    @classmethod
    def build(cls, cfg: DownstreamEvalConfig, *, run_tokenizer: str | None, seq_len: int, vocab_size: int,
              max_steps: int, log: Callable[[str], None] | None = None) -> "DownstreamEvaluator | None":
        """The component for ``cfg`` (None when disabled): tasks read and tokenized now, once."""
        if not cfg.enabled:
            return None
        start = time.perf_counter()
        spec = cfg.tokenizer or run_tokenizer or "dolma2"
        tokenizer = load_tokenizer(spec)
        ids = specials(tokenizer)
        if ids.vocab_size > vocab_size:
            raise ValueError(f"downstream_eval.tokenizer {spec}: {ids.vocab_size} ids, more than model.vocab_size "
                             f"{vocab_size}; name the tokenizer the model is trained with")
        max_length = cfg.max_length or seq_len
        tasks = [load_task(name, tokenizer, max_length=max_length, limit=cfg.limit)
                 for name in expand_task_names(cfg.tasks)]
        pad = ids.pad_token_id if ids.pad_token_id is not None and ids.pad_token_id < vocab_size else 0
        evaluator = cls(tasks, cfg.interval, max_steps, cfg.batch_tokens, pad, time.perf_counter() - start)
        skipped = {t.name: t.skipped_docs for t in tasks if t.skipped_docs}
        if log is not None and skipped:
            log(f"downstream evaluation: documents left out, a continuation longer than the context {max_length}: "
                + ", ".join(f"{name} {n}" for name, n in skipped.items()))
        if log is not None:
            log(f"downstream evaluation: {len(tasks)} task(s) ({', '.join(t.name for t in tasks)}), "
                f"{sum(len(t.docs) for t in tasks)} documents, {sum(len(t.requests) for t in tasks)} requests, "
                f"{sum(t.num_tokens for t in tasks)} tokens every {cfg.interval} steps; built in "
                f"{evaluator.build_seconds:.1f}s with tokenizer {spec}")
        return evaluator

    def due(self, step: int) -> bool:
        """Whether the trainer evaluates after ``step``."""
        return step > 0 and (step % self.interval == 0 or step == self.max_steps)

    def __call__(self, model: nn.Module, step: int,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, float]:
        """Evaluate now; the record to log beside the loss (every rank gets the same)."""
        start = time.perf_counter()
        results = evaluate_tasks(model, self.tasks, batch_tokens=self.batch_tokens, autocast=autocast,
                                 progress=False, pad_id=self.pad_id)
        seconds = time.perf_counter() - start
        record: dict[str, float] = {}
        for r in results:
            record[f"{PREFIX}/{r.task}/primary"] = r.metrics["primary"]
            for key in (*ACCURACIES, "bpb"):
                if key in r.metrics:
                    record[f"{PREFIX}/{r.task}/{key}"] = r.metrics[key]
        self.runs += 1
        self.total_seconds += seconds
        self.last_step = step
        record.update({
            f"{PREFIX}/seconds": seconds,
            f"{PREFIX}/tokens": float(sum(t.num_tokens for t in self.tasks)),
            f"{PREFIX}/total_seconds": self.total_seconds,
        })
        self.last_record = dict(record)
        return record

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"tasks": [t.name for t in self.tasks], "runs": self.runs, "total_seconds": self.total_seconds,
                "last_step": self.last_step, "last_record": dict(self.last_record)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue the counters of a checkpointed run (a run without this state starts them at 0)."""
        if not state:
            return
        self.runs = int(state.get("runs", 0))
        self.total_seconds = float(state.get("total_seconds", 0.0))
        self.last_step = state.get("last_step")
        self.last_record = dict(state.get("last_record") or {})
