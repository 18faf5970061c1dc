"""Cross-entropy with z-loss and ignore_index, row-blocked: logits are never
upcast whole to fp32.

Returns ``(ce_loss, z_loss)``: per token ``lse - logit[label]`` and
``z_loss_coef * lse^2``, reduced by ``reduction``. The spec is
:func:`olmo2_kernels.reference.cross_entropy`.
"""
from __future__ import annotations

from torch import Tensor

from . import _backend, _validate, reference

OP = "cross_entropy"


def check_loss_args(op: str, ignore_index, z_loss_coef, reduction) -> tuple[float, str]:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    coef = _validate.nonnegative_float(op, "z_loss_coef", z_loss_coef)
    return coef, _validate.choice(op, "reduction", reduction, reference.REDUCTIONS)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    z_loss_coef: float = 0.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and z-loss of ``logits`` (N, V) against ``labels`` (N,).

    ``mean`` divides both by the number of non-ignored tokens (0 losses and
    gradients when every token is ignored), ``sum`` sums them, ``none`` returns
    per-token fp32 tensors, zero at ignored tokens.
    """
    _validate.tensor(OP, "logits", logits, min_ndim=2)
    if logits.dim() != 2:
        raise ValueError(f"{OP}: logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    coef, reduction = check_loss_args(OP, ignore_index, z_loss_coef, reduction)
    _validate.labels(OP, labels, logits.shape[0], logits.shape[1], ignore_index, logits.device)
    backend = _backend.resolve(OP, logits.device, logits.dtype)
    if backend == "torch":
        return reference.cross_entropy(logits, labels, ignore_index, coef, reduction)
    raise _backend.BackendUnavailableError(f"{OP}: no {backend} implementation")
