"""The OLMo 2 optimizer: AdamW parameter groups, learning-rate schedules and
global-norm gradient clipping.

Weight decay (OLMo 2 official configs): every weight is decayed except the
input embedding; the RMSNorm weights are decayed too (both switchable).

Schedules are pure functions of the step, so resuming needs no scheduler state
beyond the step number. Step ``k`` (1-based) is the ``k``-th optimizer update;
``lr(k)`` is the rate it uses:

* warmup (``k <= warmup``): ``peak * k / warmup`` (never 0, so no update is wasted);
* ``cosine``: ``final + (peak - final) * (1 + cos(pi * p)) / 2``;
* ``linear``: ``peak - (peak - final) * p``;
* ``constant``: ``peak``;

with ``p = (k - warmup) / (decay_steps - warmup)`` clamped to [0, 1] and
``final = final_lr_ratio * peak``. Stage-1 OLMo 2: cosine to ``0.1 * peak`` over
a horizon (5T tokens) longer than the run (truncated). Stage 2: ``linear`` to
``final_lr_ratio = 0`` with no warmup, from stage 1's final rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

import olmo2_kernels

SCHEDULES = ("cosine", "linear", "constant")
# Normalization modules whose weights ``norm_weight_decay`` governs.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    olmo2_kernels.RMSNorm, nn.RMSNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
)


# ---------------------------------------------------------------------- parameter groups
def split_params(model: nn.Module, embedding_weight_decay: bool = False,
                 norm_weight_decay: bool = True) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """``(decayed, not_decayed)`` parameters of ``model`` by name.

    Embedding parameters are those of ``nn.Embedding`` modules; norm parameters
    those of the normalization modules in :data:`NORM_TYPES` (the model's
    RMSNorm and torch's norms), by type, not by class name.
    """
    decay: dict[str, nn.Parameter] = {}
    no_decay: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_embedding = isinstance(module, nn.Embedding)
        is_norm = isinstance(module, NORM_TYPES)
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            if (is_embedding and not embedding_weight_decay) or (is_norm and not norm_weight_decay):
                no_decay[name] = param
            else:
                decay[name] = param
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float, embedding_weight_decay: bool = False,
                 norm_weight_decay: bool = True) -> list[dict]:
    """AdamW groups ``decay`` and (when not empty) ``no_decay`` (see :func:`split_params`)."""
    decay, no_decay = split_params(model, embedding_weight_decay, norm_weight_decay)
    groups = [{"params": list(decay.values()), "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": list(no_decay.values()), "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_adamw(model: nn.Module, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                embedding_weight_decay: bool = False, norm_weight_decay: bool = True,
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``model``.

    ``fused=None`` uses the fused CUDA implementation when every parameter is on
    a GPU, else torch's default (foreach).
    """
    groups = param_groups(model, weight_decay, embedding_weight_decay, norm_weight_decay)
    if fused is None:
        fused = all(p.device.type == "cuda" for g in groups for p in g["params"])
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)


# ---------------------------------------------------------------------- schedules
@dataclass
class LRSchedule:
    """Learning rate as a function of the 1-based optimizer step (see the module docstring)."""

    peak_lr: float
    name: str = "cosine"
    warmup_steps: int = 0
    decay_steps: int = 1
    final_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"LRSchedule: name must be one of {SCHEDULES}, got {self.name!r}")
        if isinstance(self.peak_lr, bool) or not isinstance(self.peak_lr, (int, float)) or not self.peak_lr >= 0:
            raise ValueError(f"LRSchedule: peak_lr must be a non-negative number, got {self.peak_lr!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"LRSchedule: warmup_steps must be a non-negative int, got {self.warmup_steps!r}")
        if not isinstance(self.decay_steps, int) or self.decay_steps < 1:
            raise ValueError(f"LRSchedule: decay_steps must be a positive int, got {self.decay_steps!r}")
        if self.name != "constant" and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"LRSchedule: decay_steps ({self.decay_steps}) must exceed warmup_steps ({self.warmup_steps})"
            )
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"LRSchedule: final_lr_ratio must be in [0, 1], got {self.final_lr_ratio!r}")

    def __call__(self, step: int) -> float:
        peak = float(self.peak_lr)
        if self.warmup_steps and step <= self.warmup_steps:
            return peak * max(step, 0) / self.warmup_steps
        if self.name == "constant":
            return peak
        final = self.final_lr_ratio * peak
        progress = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if self.name == "cosine":
            return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return peak - (peak - final) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------- clipping
def _local(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # a DTensor (FSDP2 sharded): reduce to the global value
    return full() if full is not None else t


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of the gradients (before clipping), scaling them to at most
    ``max_norm`` in place (no clipping when ``max_norm`` is None or <= 0).

    Works on plain and FSDP2-sharded (DTensor) gradients: the norm is reduced
    across shards. Returns a 0-d tensor on the gradients' device (no host
    sync); a non-finite norm is returned as is, for the caller to catch.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    total = _local(torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True))
    if max_norm is not None and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total

