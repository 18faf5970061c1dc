"""Fused linear + cross-entropy: ``cross_entropy(hidden @ weight.T, labels)``
without materializing the (N, V) logits.

Tokens are processed ``chunk_size`` rows at a time, forward and backward, so the
extra memory scales with ``chunk_size * V``, not ``N * V``. The spec is
:func:`olmo2_kernels.reference.linear_cross_entropy`.
"""
from __future__ import annotations

from torch import Tensor

from . import _backend, _validate, reference
from .cross_entropy import check_loss_args

OP = "linear_cross_entropy"


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    z_loss_coef: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and z-loss of ``hidden @ weight.T`` against ``labels``.

    hidden: (N, H), weight: (V, H) (the LM head, untied), labels: (N,).
    Same results and reductions as :func:`olmo2_kernels.cross_entropy`.
    """
    _validate.tensor(OP, "hidden", hidden, min_ndim=2)
    if hidden.dim() != 2:
        raise ValueError(f"{OP}: hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    _validate.tensor(OP, "weight", weight, min_ndim=2)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{OP}: weight must be 2-D (V, H) with H = hidden.shape[1] = {hidden.shape[1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{OP}: weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    _validate.same_device(OP, hidden=hidden, weight=weight)
    coef, reduction = check_loss_args(OP, ignore_index, z_loss_coef, reduction)
    _validate.labels(OP, labels, hidden.shape[0], weight.shape[0], ignore_index, hidden.device)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{OP}: chunk_size must be a positive int or None, got {chunk_size!r}")
    backend = _backend.resolve(OP, hidden.device, hidden.dtype)
    if backend == "torch":
        return reference.linear_cross_entropy(hidden, weight, labels, ignore_index, coef, reduction)
    raise _backend.BackendUnavailableError(f"{OP}: no {backend} implementation")
