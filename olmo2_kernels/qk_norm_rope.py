"""Fused QK-norm + rotary embedding, as OLMo 2 applies them.

RMSNorm over the whole q projection (width ``Hq * head_dim``) and over the whole
k projection (``Hk * head_dim``; Hk may be smaller: GQA), then the
non-interleaved ("rotate_half") rotary embedding on every head. Inputs keep
their (..., T, H*head_dim) layout; outputs have the input shapes. The spec is
:func:`olmo2_kernels.reference.qk_norm_rope`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate, reference

OP = "qk_norm_rope"


def rope_cos_sin(
    positions: int | Tensor,
    head_dim: int,
    theta: float = 500_000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (T, head_dim), for the rotary embedding.

    ``positions`` is a sequence length T (positions 0..T-1) or a 1-D tensor of
    positions (e.g. ``arange(past, past + T)`` during generation). Computed in
    fp32 exactly as Hugging Face's ``Olmo2RotaryEmbedding`` does (then cast to
    ``dtype``), so logits match ``transformers`` bit for bit in fp32.
    """
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_cos_sin: head_dim must be a positive even int, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    inv_freq = inv_freq.to(positions.device)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _check(q, k, q_weight, k_weight, cos, sin, head_dim, eps) -> float:
    _validate.tensor(OP, "q", q, min_ndim=2)
    _validate.tensor(OP, "k", k, min_ndim=2)
    if k.dtype != q.dtype:
        raise TypeError(f"{OP}: k must have the dtype of q ({q.dtype}), got {k.dtype}")
    _validate.tensor(OP, "q_weight", q_weight)
    _validate.tensor(OP, "k_weight", k_weight)
    _validate.tensor(OP, "cos", cos)
    _validate.tensor(OP, "sin", sin)
    _validate.same_device(OP, q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"{OP}: head_dim must be a positive even int, got {head_dim!r}")
    if q.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"{OP}: q and k must agree on all dims but the last (..., T); "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    for name, t in (("q", q), ("k", k)):
        if t.shape[-1] % head_dim:
            raise ValueError(
                f"{OP}: the last dim of {name} ({t.shape[-1]}) must be a multiple of head_dim ({head_dim})"
            )
    _validate.shape(OP, "q_weight", q_weight, (q.shape[-1],), "the last dim of q")
    _validate.shape(OP, "k_weight", k_weight, (k.shape[-1],), "the last dim of k")
    seq_len = q.shape[-2]
    _validate.shape(OP, "cos", cos, (seq_len, head_dim), "(T, head_dim) with T = q.shape[-2]")
    _validate.shape(OP, "sin", sin, (seq_len, head_dim), "(T, head_dim) with T = q.shape[-2]")
    return _validate.positive_float(OP, "eps", eps)


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
    """Normalize q and k over their whole last dim, then rotate every head.

    q: (..., T, Hq*head_dim), k: (..., T, Hk*head_dim), weights of the same
    last dims, cos/sin: (T, head_dim) (see :func:`rope_cos_sin`). Returns
    ``(q_out, k_out)`` with the input shapes and dtype. cos and sin receive no
    gradient.
    """
    eps = _check(q, k, q_weight, k_weight, cos, sin, head_dim, eps)
    backend = _backend.resolve(OP, q.device, q.dtype)
    if backend == "torch":
        return reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, head_dim, eps)
    raise _backend.BackendUnavailableError(f"{OP}: no {backend} implementation")
