"""Torch-side launchers for the compiled extension's kernels (``cpu`` and ``cuda``
backends).

Each function takes tensors already validated and laid out by the op module
(2-D row views with unit stride along the last dim; other strides are passed to
the kernels), allocates the outputs, picks the CUDA stream, and calls ``_C``
with raw pointers, sizes and strides. Signatures are the same as the Triton
launchers in each op module:

rms_norm_fwd(x, weight, eps) -> (y, rstd)
    x (rows, cols); y contiguous, dtype of x; rstd (rows,) fp32.
rms_norm_bwd(dy, x, weight, rstd) -> (dx, dweight)
    dx contiguous, dtype of x; dweight dtype of weight, accumulated in fp32.
norm_rope_fwd(x, weight, cos, sin, head_dim, eps) -> (y, rstd)
    One projection (q or k): x (rows, H*head_dim), rows ordered (..., T) so row r
    is at position r % T with T = cos.shape[0]; cos/sin (T, head_dim) contiguous.
    RMSNorm over the whole row, then rotate_half RoPE on each head.
norm_rope_bwd(dy, x, weight, rstd, cos, sin, head_dim) -> (dx, dweight)
cross_entropy_fwd(logits, labels, ignore_index, z_loss_coef) -> (ce, z, lse)
    logits (N, V); labels (N,) int64 contiguous; outputs (N,) fp32. ce and z are
    0 at ignored rows; a label outside [0, V) that is not ignore_index gives NaN
    ce (never an out-of-bounds read).
cross_entropy_bwd(logits, labels, lse, grad_ce, grad_z, ignore_index, z_loss_coef, out=None) -> dlogits
    grad_ce/grad_z (N,) fp32 per-token upstream gradients; dlogits in logits'
    dtype, written into ``out`` when given (``out`` may be ``logits`` itself).
swiglu_fwd(gate, up) -> y
swiglu_bwd(dy, gate, up) -> (dgate, dup)

A kernel the loaded build lacks is never reached: the backend resolver checks
``capabilities()["ops"]`` first.
"""
from __future__ import annotations

from torch import Tensor

from . import _extension


def _missing(op: str):
    raise RuntimeError(
        f"olmo2_kernels._C has no kernel for {op} ({_extension.load_error() or 'not in this build'})"
    )


def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _missing("rms_norm")


def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    _missing("rms_norm")


def norm_rope_fwd(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, head_dim: int, eps: float) -> tuple[Tensor, Tensor]:
    _missing("qk_norm_rope")


def norm_rope_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, head_dim: int
) -> tuple[Tensor, Tensor]:
    _missing("qk_norm_rope")


def cross_entropy_fwd(logits: Tensor, labels: Tensor, ignore_index: int, z_loss_coef: float) -> tuple[Tensor, Tensor, Tensor]:
    _missing("cross_entropy")


def cross_entropy_bwd(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_ce: Tensor,
    grad_z: Tensor,
    ignore_index: int,
    z_loss_coef: float,
    out: Tensor | None = None,
) -> Tensor:
    _missing("cross_entropy")


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    _missing("swiglu")


def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    _missing("swiglu")
