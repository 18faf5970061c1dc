"""The OLMES metrics of a task from the log-likelihoods of its requests.

Per document, each choice's score is its continuation's summed log-likelihood
``ll`` (natural log), and the prediction is the first choice of highest score
(``torch.argmax``'s tie rule, as ``olmo_eval``):

* ``acc_raw``: score ``ll``;
* ``acc_per_token``: ``ll / tokens``;
* ``acc_per_char``: ``ll / characters`` (OLMES's length normalization,
  ``olmo_eval``'s ``len_norm``; the leading space counts);
* ``acc_per_byte``: ``ll / UTF-8 bytes``;
* ``acc_uncond`` (PMI): ``ll - ll_uncond``, the unconditional request scoring
  the same continuation after ``"Answer:"``; only where the data has them;

and from the gold choice, averaged over documents:

* ``bpb``: ``-ll / bytes / ln 2``, bits per byte (``olmo_eval``'s ``bpb_v2``,
  OLMES's ``logits_per_byte`` in bits);
* ``ce_loss``: ``-ll / characters`` (``olmo_eval``'s ``ce_loss_v2``).

``primary`` repeats the task's primary metric (its OLMES config; ``bpb`` for
the bpb format, where only the gold choice is scored).
"""
from __future__ import annotations

import math
from typing import Sequence

from .tasks import Task

ACCURACIES = ("acc_raw", "acc_per_token", "acc_per_char", "acc_per_byte", "acc_uncond")
LOSSES = ("bpb", "ce_loss")


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (NaN never wins)."""
    best, best_i = -math.inf, 0
    for i, v in enumerate(values):
        if v > best:
            best, best_i = v, i
    return best_i


def compute_metrics(task: Task, logprobs: Sequence[float]) -> dict[str, float]:
    """OLMES metrics of ``task`` given each request's summed log-likelihood (same order as ``task.requests``)."""
    if len(logprobs) != len(task.requests):
        raise ValueError(f"{task.name}: {len(logprobs)} log-likelihoods for {len(task.requests)} requests")
    cond: list[dict[int, tuple[float, object]]] = [{} for _ in task.docs]
    uncond: list[dict[int, float]] = [{} for _ in task.docs]
    for request, ll in zip(task.requests, logprobs):
        if request.unconditional:
            uncond[request.doc][request.choice] = float(ll)
        else:
            cond[request.doc][request.choice] = (float(ll), request)
    sums = {name: 0.0 for name in (*ACCURACIES, *LOSSES)}
    counted = 0
    pmi_docs = 0
    for doc, choices in zip(task.docs, cond):
        if len(choices) != doc.num_choices or doc.label not in choices:
            raise ValueError(f"{task.name}: document {doc.doc_id} lacks the scores of some choices")
        order = sorted(choices)
        lls = [choices[c][0] for c in order]
        reqs = [choices[c][1] for c in order]
        gold = order.index(doc.label)
        counted += 1
        if not task.gold_only:
            scores = {
                "acc_raw": lls,
                "acc_per_token": [ll / len(r.continuation) for ll, r in zip(lls, reqs)],
                "acc_per_char": [ll / max(r.chars, 1) for ll, r in zip(lls, reqs)],
                "acc_per_byte": [ll / max(r.bytes, 1) for ll, r in zip(lls, reqs)],
            }
            for name, values in scores.items():
                sums[name] += float(_argmax(values) == gold)
        gold_req = reqs[gold]
        sums["bpb"] += -lls[gold] / max(gold_req.bytes, 1) / math.log(2)
        sums["ce_loss"] += -lls[gold] / max(gold_req.chars, 1)
    # PMI over the documents whose every choice has an unconditional score.
    if not task.gold_only:
        for doc, choices, unc in zip(task.docs, cond, uncond):
            if unc and all(c in unc for c in choices):
                order = sorted(choices)
                pmi = [choices[c][0] - unc[c] for c in order]
                sums["acc_uncond"] += float(_argmax(pmi) == order.index(doc.label))
                pmi_docs += 1
    out: dict[str, float] = {}
    n = max(counted, 1)
    if not task.gold_only:
        for name in ACCURACIES[:-1]:
            out[name] = sums[name] / n
        if pmi_docs:
            out["acc_uncond"] = sums["acc_uncond"] / pmi_docs
    out["bpb"] = sums["bpb"] / n
    out["ce_loss"] = sums["ce_loss"] / n
    out["primary"] = out.get(task.primary_metric, out["bpb"])
    out["num_docs"] = float(counted)
    return out


def chance_accuracy(task: Task) -> float | None:
    """The accuracy of guessing: the mean over documents of 1 / choices (None for bpb tasks)."""
    if task.gold_only or not task.docs:
        return None
    return sum(1.0 / d.num_choices for d in task.docs) / len(task.docs)
