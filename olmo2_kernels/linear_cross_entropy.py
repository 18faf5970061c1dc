"""Fused linear + cross-entropy: ``cross_entropy(hidden @ weight.T, labels)``
without materializing the (N, V) logits.

Tokens are processed ``chunk_size`` rows at a time, forward and backward, so the
extra memory scales with ``chunk_size * V``, not ``N * V``. The spec is
:func:`olmo2_kernels.reference.linear_cross_entropy`.

Two paths, chosen per call:

* Gradients in the forward (custom op ``linear_cross_entropy_fused``), taken
  when a gradient is needed and ``reduction`` is ``"mean"`` or ``"sum"`` (the
  training case): for each chunk of rows, ``logits_c = hidden_c @ weight.T``
  into one reused (chunk_size, V) buffer, the cross-entropy row forward, then
  at once the row backward of ``ce + z`` into the same buffer,
  ``dhidden_c = dlogits_c @ weight`` and ``dweight += dlogits_c.T @ hidden_c``.
  The backward only scales the saved gradients by the upstream one. Three
  matmuls in all (``6*N*H*V`` FLOPs), as many as the unfused path that keeps
  the logits. This assumes the two losses get the same upstream gradient (the
  loss is ``ce + z``, or z_loss_coef is 0). For ``ce + z`` autograd passes one
  tensor object to both, which the backward recognizes at no cost; other
  upstream gradients are compared (a device sync) and, when they differ, the
  backward falls back to the recompute path below (correct, one more matmul).
* Recompute (custom ops ``linear_cross_entropy_fwd`` and ``_bwd``): for
  ``reduction="none"``, or when no gradient is needed. The forward keeps only
  per-token ``ce``, ``z`` and ``lse`` (N fp32 values each); the backward
  recomputes ``logits_c`` chunk by chunk, runs the row backward with the
  per-token upstream gradients and the two gradient matmuls: ``8*N*H*V``
  FLOPs with the forward.

``dweight`` is accumulated in fp32 across chunks (accumulating the LM-head
gradient in bf16 drifts the loss) and rounded to weight's dtype once.

Logits dtype: on CUDA, bf16/fp16 inputs give fp32 logits when the torch build
has ``torch.mm(..., out_dtype=torch.float32)`` (cuBLAS accumulates in fp32
anyway; the rounding to bf16 is skipped); otherwise, and on CPU, the input
dtype. The row kernels read either and compute in fp32.

Extra memory: one (chunk_size, V) logits buffer (plus a (chunk_size, V)
low-precision copy of its gradient when the logits are fp32 and the weight is
not), the fp32 (V, H) ``dweight`` accumulator, O(N) per-token values, and on
the fused path ``dhidden`` and ``dweight`` (in the input dtypes) held from the
forward to the backward.

The backend (``triton``, ``cpu``, ``cuda``) is that of the cross-entropy row
kernels; the matmuls are torch's.

Filling the GPU: a chunk has few rows (``default_chunk_size``: 256 at OLMo 2 1B
with 8192 tokens), and one program per row would be 256 programs of 100352
logits each, a quarter of a wave on an H100 (132 SMs x 8 resident programs).
The Triton row kernels therefore split each row's vocabulary across programs
when the rows alone do not reach 32 programs per SM (``cross_entropy.vocab_split``;
forward partials merged by a small combine kernel, each logit still read once
per pass). Programs per row pass, forward and backward alike (V = 100352,
H100): 1B 8192 tokens (chunk 256) 256 -> 6400 (0.24 -> 6.1 waves); 1B 16384
(chunk 512) and 7B 8192 (chunk 512) 512 -> 4608 (0.48 -> 4.4); 7B 16384
(chunk 1024) 1024 -> 5120 (0.97 -> 4.8). Waves at the forward's 8 resident
programs per SM; the backward holds 4-8 (30-64 registers by GPU and Triton
version), so the same grid is up to twice as many of its waves.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend, _validate, reference
from ._triton import next_power_of_2, triton
from .cross_entropy import _BWD, _FWD, check_loss_args, kernel_labels, per_token_grad

OP = "linear_cross_entropy"

# Bounds of the default chunk size (rows per chunk).
MIN_CHUNK = 64
MAX_CHUNK = 4096

if triton is not None:
    # The row kernels are those of cross_entropy; the matmuls are torch's.
    _backend.register_triton(OP)


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk such that a chunk's logits are about the size of ``hidden``.

    ``next_power_of_2(ceil(N / ceil(V / H)))``, clamped to [MIN_CHUNK,
    MAX_CHUNK] and to N. E.g. OLMo 2 1B (H 2048, V 100352) with N = 16384
    tokens: ceil(V / H) = 49, chunk 512, fp32 chunk logits 205 MB next to 67 MB
    of bf16 hidden states. Larger chunks make fewer, larger matmuls and fewer
    read-modify-writes of the (V, H) fp32 weight-gradient accumulator (one per
    chunk), at the cost of memory.
    """
    ratio = max(1, math.ceil(vocab_size / max(hidden_size, 1)))
    chunk = next_power_of_2(math.ceil(max(n_tokens, 1) / ratio))
    chunk = min(max(chunk, MIN_CHUNK), MAX_CHUNK)
    return max(1, min(chunk, n_tokens))


# --------------------------------------------------------------------------- matmul helpers
_FP32_OUT_SUPPORTED: dict = {}


def _fp32_out_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm``/``torch.addmm`` take ``out_dtype=torch.float32`` for
    ``dtype`` inputs on ``device`` (CUDA with a recent torch). Probed once per
    (device, dtype) on a tiny problem."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (device.index, dtype)
    if key not in _FP32_OUT_SUPPORTED:
        try:
            a = torch.zeros(2, 2, dtype=dtype, device=device)
            acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
            torch.mm(a, a, out_dtype=torch.float32, out=acc)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            supported = True
        except (RuntimeError, TypeError, NotImplementedError):
            supported = False
        _FP32_OUT_SUPPORTED[key] = supported
    return _FP32_OUT_SUPPORTED[key]


def _chunk_logits(hidden_c: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """``hidden_c @ weight.T`` into ``out`` (fp32 or the input dtype)."""
    if out.dtype != hidden_c.dtype:
        return torch.mm(hidden_c, weight.t(), out_dtype=out.dtype, out=out)
    return torch.mm(hidden_c, weight.t(), out=out)


def _accumulate_dweight(acc: Tensor, dlogits_c: Tensor, hidden_c: Tensor) -> None:
    """``acc += dlogits_c.T @ hidden_c`` with ``acc`` fp32 (float64 for float64)."""
    if dlogits_c.dtype == acc.dtype:
        acc.addmm_(dlogits_c.t(), hidden_c)
    elif _fp32_out_supported(acc.device, dlogits_c.dtype):
        torch.addmm(acc, dlogits_c.t(), hidden_c, out_dtype=torch.float32, out=acc)
    else:
        # The chunk's product is rounded once to the input dtype; the sum over
        # chunks is still fp32, so the error does not grow with the chunk count.
        acc.add_(torch.mm(dlogits_c.t(), hidden_c))


def _logits_dtype(hidden: Tensor) -> torch.dtype:
    if _fp32_out_supported(hidden.device, hidden.dtype):
        return torch.float32
    return hidden.dtype


def _logits_buffer(hidden: Tensor, weight: Tensor, rows: int) -> Tensor:
    """The (rows, V) buffer that every chunk's logits are written into."""
    return torch.empty((rows, weight.shape[0]), dtype=_logits_dtype(hidden), device=hidden.device)


def _forward_chunks(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, z_loss_coef: float, chunk_size: int,
    backend: str, buf: Tensor, ce: Tensor, z: Tensor, lse: Tensor,
):
    """For each chunk of rows: its logits into ``buf``, the row forward into
    ``ce``, ``z`` and ``lse``; yields ``(start, stop, logits)`` so the caller
    can use the chunk's logits before the next chunk overwrites them."""
    n_tokens = hidden.shape[0]
    for start in range(0, n_tokens, chunk_size):
        stop = min(start + chunk_size, n_tokens)
        logits = _chunk_logits(hidden[start:stop], weight, buf[: stop - start])
        ce[start:stop], z[start:stop], lse[start:stop] = _FWD[backend](
            logits, labels[start:stop], ignore_index, z_loss_coef
        )
        yield start, stop, logits


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("olmo2_kernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    z_loss_coef: float,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token fp32 ``(ce, z, lse)`` of ``hidden @ weight.T``, chunk by chunk."""
    n_tokens = hidden.shape[0]
    ce, z, lse = (torch.empty(n_tokens, dtype=torch.float32, device=hidden.device) for _ in range(3))
    buf = _logits_buffer(hidden, weight, min(chunk_size, n_tokens))
    for _chunk in _forward_chunks(
        hidden, weight, kernel_labels(labels), ignore_index, z_loss_coef, chunk_size, backend, buf, ce, z, lse
    ):
        pass
    return ce, z, lse


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, labels, ignore_index, z_loss_coef, chunk_size, backend) -> tuple[Tensor, Tensor, Tensor]:
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


def _grad_buffers(hidden: Tensor, weight: Tensor, rows: int, backend: str) -> tuple[Tensor, Tensor | None]:
    """The chunk logits buffer and, when the logits are fp32 and the weight is
    not, a buffer that the row backward (any backend) writes the gradient into,
    rounded once to the matmul dtype."""
    buf = _logits_buffer(hidden, weight, rows)
    grad_buf = None
    if buf.dtype != weight.dtype:
        grad_buf = torch.empty(buf.shape, dtype=weight.dtype, device=hidden.device)
    return buf, grad_buf


def _chunk_grads(
    hidden_c: Tensor, weight: Tensor, logits: Tensor, grad_buf: Tensor | None, labels_c: Tensor, lse_c: Tensor,
    grad_ce_c: Tensor, grad_z_c: Tensor, ignore_index: int, z_loss_coef: float, backend: str,
    dhidden_c: Tensor | None, dweight_acc: Tensor | None,
) -> None:
    """Row backward of one chunk into its logits buffer, then ``dhidden_c =
    dlogits @ weight`` and ``dweight_acc += dlogits.T @ hidden_c`` (each when given)."""
    rows = logits.shape[0]
    out = grad_buf[:rows] if grad_buf is not None else logits
    dlogits = _BWD[backend](logits, labels_c, lse_c, grad_ce_c, grad_z_c, ignore_index, z_loss_coef, out=out)
    if dlogits.dtype != weight.dtype:
        dlogits = dlogits.to(weight.dtype)
    if dhidden_c is not None:
        torch.mm(dlogits, weight, out=dhidden_c)
    if dweight_acc is not None:
        _accumulate_dweight(dweight_acc, dlogits, hidden_c)


@torch.library.custom_op("olmo2_kernels::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_ce: Tensor,
    grad_z: Tensor,
    ignore_index: int,
    z_loss_coef: float,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(dhidden, dweight)`` in the dtypes of hidden and weight; the logits are
    recomputed chunk by chunk, ``dweight`` accumulated in fp32."""
    n_tokens = hidden.shape[0]
    labels = kernel_labels(labels)
    lse = lse.contiguous()
    grad_ce = grad_ce.to(torch.float32).contiguous()
    grad_z = grad_z.to(torch.float32).contiguous()
    dhidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    dweight = torch.zeros(weight.shape, dtype=reference.accumulation_dtype(weight.dtype), device=weight.device)
    buf, grad_buf = _grad_buffers(hidden, weight, min(chunk_size, n_tokens), backend)
    for start in range(0, n_tokens, chunk_size):
        stop = min(start + chunk_size, n_tokens)
        hidden_c = hidden[start:stop]
        logits = _chunk_logits(hidden_c, weight, buf[: stop - start])
        _chunk_grads(
            hidden_c, weight, logits, grad_buf, labels[start:stop], lse[start:stop], grad_ce[start:stop],
            grad_z[start:stop], ignore_index, z_loss_coef, backend, dhidden[start:stop], dweight,
        )
    return dhidden, dweight.to(weight.dtype)


@linear_cross_entropy_bwd.register_fake
def _(hidden, weight, labels, lse, grad_ce, grad_z, ignore_index, z_loss_coef, chunk_size, backend):
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, ignore_index, z_loss_coef, chunk_size, backend = inputs
    _ce, _z, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.z_loss_coef = z_loss_coef
    ctx.chunk_size = chunk_size
    ctx.backend = backend


def _backward(ctx, grad_ce: Tensor | None, grad_z: Tensor | None, _grad_lse: Tensor | None):
    hidden, weight, labels, lse = ctx.saved_tensors
    dhidden, dweight = linear_cross_entropy_bwd(
        hidden, weight, labels, lse, per_token_grad(grad_ce, hidden), per_token_grad(grad_z, hidden),
        ctx.ignore_index, ctx.z_loss_coef, ctx.chunk_size, ctx.backend,
    )
    return dhidden, dweight, None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("olmo2_kernels::linear_cross_entropy_fused", mutates_args=())
def linear_cross_entropy_fused(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    z_loss_coef: float,
    reduction: str,
    chunk_size: int,
    backend: str,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reduced ``(ce, z)`` (``reduction`` "mean" or "sum"), per-token ``lse``,
    and the gradients of ``ce + z`` for hidden and weight (in their dtypes; an
    empty tensor where not asked for), all in one pass over the chunks."""
    n_tokens = hidden.shape[0]
    labels = kernel_labels(labels)
    ce, z, lse = (torch.empty(n_tokens, dtype=torch.float32, device=hidden.device) for _ in range(3))
    valid = labels != ignore_index
    # d(reduced loss) / d(per-token loss): 1, or 1 / (non-ignored tokens) without a host sync.
    if reduction == "mean":
        per_token = (1.0 / valid.sum().clamp(min=1).to(torch.float32)).expand(n_tokens).contiguous()
    else:
        per_token = torch.ones(n_tokens, dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty(hidden.shape if grad_hidden else (0,), dtype=hidden.dtype, device=hidden.device)
    dweight = torch.zeros(
        weight.shape if grad_weight else (0,), dtype=reference.accumulation_dtype(weight.dtype), device=weight.device
    )
    buf, grad_buf = _grad_buffers(hidden, weight, min(chunk_size, n_tokens), backend)
    for start, stop, logits in _forward_chunks(
        hidden, weight, labels, ignore_index, z_loss_coef, chunk_size, backend, buf, ce, z, lse
    ):
        _chunk_grads(
            hidden[start:stop], weight, logits, grad_buf, labels[start:stop], lse[start:stop], per_token[start:stop],
            per_token[start:stop], ignore_index, z_loss_coef, backend,
            dhidden[start:stop] if grad_hidden else None, dweight if grad_weight else None,
        )
    ce_loss, z_loss = reference.reduce_token_losses(ce, z, valid, reduction)
    return ce_loss, z_loss, lse, dhidden, dweight.to(weight.dtype)


@linear_cross_entropy_fused.register_fake
def _(hidden, weight, labels, ignore_index, z_loss_coef, reduction, chunk_size, backend, grad_hidden, grad_weight):
    n = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(n, dtype=torch.float32),
        hidden.new_empty(hidden.shape if grad_hidden else (0,)),
        weight.new_empty(weight.shape if grad_weight else (0,)),
    )


@torch.library.custom_op("olmo2_kernels::linear_cross_entropy_fused_bwd", mutates_args=())
def linear_cross_entropy_fused_bwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    lse: Tensor,
    dhidden: Tensor,
    dweight: Tensor,
    grad_ce: Tensor,
    grad_z: Tensor,
    ignore_index: int,
    z_loss_coef: float,
    reduction: str,
    chunk_size: int,
    backend: str,
    grad_hidden: bool,
    grad_weight: bool,
    same_upstream: bool,
) -> tuple[Tensor, Tensor]:
    """The gradients of the fused forward for upstream gradients ``grad_ce`` and
    ``grad_z`` (0-dim): the saved ones (those of ce + z) scaled, when z does not
    count (coefficient 0) or gets the same upstream gradient as ce; else
    recomputed chunk by chunk. ``same_upstream``: the caller knows the two are
    one tensor (autograd passes one object for both terms of ``ce + z``), so no
    comparison, which would be a device sync, is needed. A custom op so that the
    data-dependent choice stays out of traced graphs."""
    g_ce = grad_ce.to(torch.float32)
    g_z = grad_z.to(torch.float32)
    if z_loss_coef == 0.0 or same_upstream or torch.equal(g_ce, g_z):
        return torch.mul(dhidden, g_ce), torch.mul(dweight, g_ce)
    n_tokens = hidden.shape[0]
    if reduction == "mean":
        count = (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
        g_ce, g_z = g_ce / count, g_z / count
    dh, dw = linear_cross_entropy_bwd(
        hidden, weight, labels, lse, g_ce.expand(n_tokens), g_z.expand(n_tokens),
        ignore_index, z_loss_coef, chunk_size, backend,
    )
    # Only the gradients the forward was asked for (the others are empty there too).
    return (dh if grad_hidden else dhidden.new_empty(0), dw if grad_weight else dweight.new_empty(0))


@linear_cross_entropy_fused_bwd.register_fake
def _(hidden, weight, labels, lse, dhidden, dweight, grad_ce, grad_z, ignore_index, z_loss_coef, reduction,
      chunk_size, backend, grad_hidden, grad_weight, same_upstream):
    return torch.empty_like(dhidden), torch.empty_like(dweight)


def _fused_setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, ignore_index, z_loss_coef, reduction, chunk_size, backend, grad_hidden, grad_weight = inputs
    _ce, _z, lse, dhidden, dweight = output
    ctx.mark_non_differentiable(lse, dhidden, dweight)
    ctx.save_for_backward(hidden, weight, labels, lse, dhidden, dweight)
    ctx.args = (ignore_index, z_loss_coef, reduction, chunk_size, backend)
    ctx.grads = (grad_hidden, grad_weight)


def _fused_backward(ctx, grad_ce: Tensor | None, grad_z: Tensor | None, *_unused):
    hidden, weight, labels, lse, dhidden, dweight = ctx.saved_tensors
    # For loss = ce + z autograd hands both terms the same tensor object.
    same_upstream = grad_ce is not None and grad_ce is grad_z
    if grad_ce is None or grad_z is None:
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_ce = zero if grad_ce is None else grad_ce
        grad_z = zero if grad_z is None else grad_z
    dh, dw = linear_cross_entropy_fused_bwd(
        hidden, weight, labels, lse, dhidden, dweight, grad_ce, grad_z, *ctx.args, *ctx.grads, same_upstream,
    )
    grad_hidden, grad_weight = ctx.grads
    return (dh if grad_hidden else None, dw if grad_weight else None) + (None,) * 8


linear_cross_entropy_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# --------------------------------------------------------------------------- functional API
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

    hidden: (N, H), weight: (V, H) (the LM head, untied), labels: (N,) int64 or
    int32. Same results and reductions as :func:`olmo2_kernels.cross_entropy`.
    ``chunk_size`` rows are processed at a time (default:
    :func:`default_chunk_size`); peak extra memory grows with
    ``chunk_size * V``. When a gradient is needed and ``reduction`` is "mean"
    or "sum", the forward also computes the gradients (``6*N*H*V`` FLOPs in
    all, the backward only scales them); otherwise ``2*N*H*V`` forward and
    ``6*N*H*V`` backward, recomputing the logits. See the module docstring.
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
    if weight.shape[0] == 0:
        raise ValueError(f"{OP}: weight must have at least one row (V >= 1), got shape {tuple(weight.shape)}")
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
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    grad_hidden = hidden.requires_grad and torch.is_grad_enabled()
    grad_weight = weight.requires_grad and torch.is_grad_enabled()
    if reduction != "none" and (grad_hidden or grad_weight):
        ce, z, _lse, _dh, _dw = linear_cross_entropy_fused(
            hidden, weight, labels, ignore_index, coef, reduction, chunk_size, backend, grad_hidden, grad_weight
        )
        return ce, z
    ce, z, _lse = linear_cross_entropy_fwd(hidden, weight, labels, ignore_index, coef, chunk_size, backend)
    return reference.reduce_token_losses(ce, z, labels != ignore_index, reduction)
