"""Scoring requests on the fused kernels: log-likelihoods of continuations
without the (batch, tokens, vocabulary) logits.

A batch of queries (sorted by length, packed up to ``batch_tokens`` padded
tokens) goes through the decoder to its final hidden states (B, T, H); the
rows at the positions that predict continuation tokens are gathered, (N, H)
with N the continuation tokens of the batch, and
``olmo2_kernels.linear_cross_entropy(rows, lm_head.weight, targets,
reduction="none")`` gives each token's cross-entropy, one (chunk, V) logits
buffer at a time. A request's log-likelihood is minus the sum over its tokens.
So the LM head runs on the N scored tokens only (a few per request), and
memory is the hidden states plus one chunk of logits.

A model sharded with FSDP2 (its parameters DTensors) cannot be entered below
its root module: there the model's own forward with labels (-100 outside the
continuations, ``reduction="none"``) computes the same numbers on the same
kernel, the LM head running on every position.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

import olmo2_kernels

from ..model import IGNORE_INDEX, Olmo2ForCausalLM
from .tasks import Request

DEFAULT_BATCH_TOKENS = 8192


def length_batches(requests: Sequence[Request], batch_tokens: int, pad_to: int = 1) -> list[list[int]]:
    """Indices of ``requests`` in batches: longest first, each batch at most
    ``batch_tokens`` padded tokens (rows x longest query, rounded up to
    ``pad_to``) or a single request."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens!r}")
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].query), i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        length = -(-len(requests[i].query) // pad_to) * pad_to
        w = max(width, length)
        if current and w * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, w = [], length
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches


def _is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _unwrap(model: nn.Module) -> nn.Module:
    """The Olmo2ForCausalLM inside DDP or torch.compile wrappers."""
    while not isinstance(model, Olmo2ForCausalLM) and hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


class RequestScorer:
    """Log-likelihoods of requests under ``model``.

    ``autocast``: a context factory entered around each forward (the trainer's
    mixed precision); ``pad_id``: the id written into padding (never scored).
    """

    def __init__(self, model: nn.Module, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None, pad_id: int = 0):
        self.model = model
        self.batch_tokens = batch_tokens
        self.autocast = autocast or contextlib.nullcontext
        self.pad_id = pad_id

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are FSDP2 shards (its forward is then collective)."""
        return _is_sharded(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batches(self, requests: Sequence[Request]) -> list[list[int]]:
        return length_batches(requests, self.batch_tokens)

    @torch.no_grad()
    def score(self, requests: Sequence[Request], on_batch: Callable[[int], None] | None = None) -> list[float]:
        """Summed continuation log-likelihood of each request (same order);
        ``on_batch(tokens)`` is called after each batch (a progress bar)."""
        out = [0.0] * len(requests)
        for batch in self.batches(requests):
            values = self.score_batch([requests[i] for i in batch])
            for i, v in zip(batch, values):
                out[i] = v
            if on_batch is not None:
                on_batch(sum(len(requests[i].query) for i in batch))
        return out

    def _inputs(self, batch: Sequence[Request], extra: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Padded ids (B, T), and for every continuation token: its flat position
        in (B*T), its target, its request's row."""
        width = max(len(r.query) for r in batch) + extra
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        flat, targets, rows = [], [], []
        for row, r in enumerate(batch):
            ids[row, : len(r.query)] = torch.tensor(r.query, dtype=torch.long)
            flat.extend(row * width + p for p in r.positions)
            targets.extend(r.continuation)
            rows.extend([row] * len(r.continuation))
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        return ids, as_tensor(flat), as_tensor(targets), as_tensor(rows), width

    def score_batch(self, batch: Sequence[Request]) -> list[float]:
        device = self.device
        self.model.eval()
        if _is_sharded(self.model):
            return self._score_through_forward(batch, device)
        model = _unwrap(self.model)
        ids, flat, targets, rows, _ = self._inputs(batch, extra=0)
        with self.autocast():
            hidden, _ = model.model(ids.to(device))
            selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(device))
            weight = model.lm_head.weight
            if torch.is_autocast_enabled(device.type):
                dtype = torch.get_autocast_dtype(device.type)
                selected, weight = selected.to(dtype), weight.to(dtype)
            elif selected.dtype != weight.dtype:
                selected = selected.to(weight.dtype)
            ce, _ = olmo2_kernels.linear_cross_entropy(selected, weight, targets.to(device), reduction="none")
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
        sums.index_add_(0, rows.to(device), ce.to(torch.float64))
        return (-sums).tolist()

    def _score_through_forward(self, batch: Sequence[Request], device: torch.device) -> list[float]:
        # Labels are shifted inside the model (position t predicts labels[t + 1]),
        # so the last continuation token needs one more column.
        ids, flat, targets, rows, width = self._inputs(batch, extra=1)
        labels = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
        labels.view(-1)[flat + 1] = targets
        with self.autocast():
            out = self.model(input_ids=ids.to(device), labels=labels.to(device), reduction="none")
        ce = out.ce_loss.reshape(-1).index_select(0, flat.to(device))
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
        sums.index_add_(0, rows.to(device), ce.to(torch.float64))
        return (-sums).tolist()

