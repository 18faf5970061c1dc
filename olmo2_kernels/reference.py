"""The spec: one plain-PyTorch implementation per op.

Every other implementation (Triton, the compiled CPU/CUDA kernels) is tested
against these functions evaluated in float64, and the ``torch`` backend runs
them as they are. They accept any floating dtype: statistics are taken in fp32
(float64 when the input is float64) and each output is rounded once, to the
input's dtype. Gradients come from autograd.

Semantics shared by the kernels:

* ``rms_norm``: ``x * rsqrt(mean(x^2, -1) + eps) * weight`` with the product by
  the weight taken in fp32 before the single rounding, as OLMo 2 does.
* ``qk_norm_rope``: RMSNorm over the whole projection width (all heads at once),
  then the non-interleaved ("rotate_half") rotary embedding on every head. The
  normalized value is not rounded between the two steps.
* ``cross_entropy``: per token ``lse - logit[label]`` and
  ``z_loss_coef * lse^2``; ignored tokens contribute 0; ``mean`` divides by
  the number of non-ignored tokens (1 when there are none, so all-ignored
  batches give 0 and zero gradients, never NaN). Losses are fp32 (float64 for
  float64 logits). Its docstring's "Row contract" says what the row kernels
  compute for each row, non-finite logits and out-of-range labels included.
* ``linear_cross_entropy``: ``cross_entropy(hidden @ weight.T, ...)``.
* ``swiglu``: ``silu(gate) * up``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision inputs, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(acc)).to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """Hugging Face's non-interleaved rotation: ``cat(-x2, x1)`` over the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int) -> Tensor:
    """Rotate every head of ``x`` (..., T, H*head_dim) with cos/sin (T, head_dim)."""
    heads = x.unflatten(-1, (-1, head_dim))  # (..., T, H, D)
    c = cos.to(x.dtype).unsqueeze(-2)  # (T, 1, D)
    s = sin.to(x.dtype).unsqueeze(-2)
    return (heads * c + rotate_half(heads) * s).flatten(-2)


def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos: Tensor,
    sin: Tensor,
    head_dim: int,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    outs = []
    for x, w in ((q, q_weight), (k, k_weight)):
        acc = accumulation_dtype(x.dtype)
        xf = x.to(acc)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = xf * rstd * w.to(acc)
        outs.append(apply_rotary(normed, cos, sin, head_dim).to(x.dtype))
    return outs[0], outs[1]


def reduce_token_losses(
    ce: Tensor, z: Tensor, valid: Tensor, reduction: str
) -> tuple[Tensor, Tensor]:
    """Apply ``reduction`` to per-token losses (already zero at ignored tokens).

    ``mean`` divides by the count of non-ignored tokens, clamped to 1, without a
    host sync.
    """
    if reduction == "none":
        return ce, z
    if reduction == "sum":
        return ce.sum(), z.sum()
    if reduction == "mean":
        count = valid.sum().clamp(min=1).to(ce.dtype)
        return ce.sum() / count, z.sum() / count
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    z_loss_coef: float = 0.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Cross-entropy ``lse - logits[label]`` and z-loss ``z_loss_coef * lse^2`` per
    token, reduced by ``reduction`` (:func:`reduce_token_losses`).

    Row contract
    ------------
    What every row kernel (Triton, CPU, CUDA) computes for one row of logits
    (N, V) (float32, bfloat16 or float16, unit column stride, any row stride),
    its int64 label, ``ignore_index`` and ``z_coef >= 0``. All math is fp32;
    every output is rounded once.

    Forward, per row:

    * ``lse = log(sum(exp(x)))`` in fp32 through an online max: NaN if any logit
      is NaN; +inf if any logit is +inf (and none is NaN); -inf if every logit
      is -inf. Written for every row, ignored ones included.
    * ``label == ignore_index``: ``ce = 0`` and ``z = 0``.
    * label outside [0, V) (and not ``ignore_index``): ``ce = NaN`` (the logit is
      never read); ``z`` as for a valid row.
    * otherwise ``ce = lse - x[label]``; ``z = z_coef * lse^2`` when
      ``z_coef != 0``, and exactly 0 when ``z_coef == 0`` (even when lse is
      +-inf or NaN).

    Backward, per row, from the saved ``lse`` and fp32 per-token upstream
    gradients ``g_ce``, ``g_z``:

    * ignored row: zeros.
    * label outside [0, V): a row of NaN (its ce is NaN; the trainer stops on
      non-finite values).
    * otherwise, with ``t_j = x_j - lse``, ``p_j = exp(t_j)`` and
      ``z_scale = 2 * z_coef * lse * g_z`` when ``z_coef != 0``, exactly 0 when
      ``z_coef == 0``: ``d_j = (g_ce + z_scale) * p_j`` for ``j != label`` and
      ``d_label = g_ce * expm1(t_label) + z_scale * p_label`` (expm1, not
      ``p - 1``: no cancellation when p is close to 1).
    * ``out``: (N, V), unit column stride, any row stride and any float dtype
      (fp32, bf16, fp16), independent of the logits' dtype (the fused linear
      cross-entropy writes bf16 gradients from fp32 logits this way). ``out``
      may be the logits buffer itself when dtype and row stride are equal
      (each element is read before it is written).

    This function is the spec for finite logits with labels in range or
    ignored, and for ``z_coef = 0`` with any lse; it does not implement the
    other clauses (an out-of-range label fails in ``gather``). tests/test_ce_contract.py checks each clause on every
    backend, and says which ones the ``torch`` backend skips.
    """
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    target = x.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=acc, device=x.device)
    ce = torch.where(valid, lse - target, zero)
    if z_loss_coef != 0:
        z = torch.where(valid, z_loss_coef * lse * lse, zero)
    else:
        # Exactly 0, also for an infinite or NaN lse (0 * inf is NaN), with a
        # zero gradient. Kept in the autograd graph like ce through one finite
        # logit per row, not through lse: logsumexp's backward is NaN for a
        # row with an infinite logit even under a zero upstream gradient.
        first = x[..., 0]
        z = torch.where(torch.isfinite(first), first, zero) * 0.0
    return reduce_token_losses(ce, z, valid, reduction)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    z_loss_coef: float = 0.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    acc = accumulation_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).T
    return cross_entropy(logits, labels, ignore_index, z_loss_coef, reduction)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    acc = accumulation_dtype(gate.dtype)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)
