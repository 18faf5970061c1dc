"""Torch-side launchers for the compiled extension's kernels (``cpu`` and ``cuda``
backends).

Each function takes tensors already validated and laid out by the op module
(2-D row views with unit stride along the last dim; other strides are passed to
the kernels), allocates the outputs, picks the CUDA stream, and calls the ``_C``
function of the same name with keyword arguments named after the fields of its
parameter struct (one row of the op table, csrc/common/op_table.h): raw
pointers, sizes and strides. Signatures are the same as the Triton launchers in
each op module:

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
    logits (N, V); labels (N,) int64 contiguous; outputs (N,) fp32. Each row
    follows the row contract of :func:`olmo2_kernels.reference.cross_entropy`.
cross_entropy_bwd(logits, labels, lse, grad_ce, grad_z, ignore_index, z_loss_coef, out=None) -> dlogits
    grad_ce/grad_z (N,) fp32 per-token upstream gradients; dlogits in logits'
    dtype, or written into ``out`` when given: any float dtype (rounded once
    from fp32), any row stride; ``out`` may be ``logits`` itself when dtype and
    row stride are equal.
swiglu_fwd(gate, up) -> y
swiglu_bwd(dy, gate, up) -> (dgate, dup)

A kernel the loaded build lacks is never reached: the backend resolver checks
``capabilities()["ops"]`` first.

How tensors cross to ``_C`` (csrc/bindings/ops.h): ``data_ptr()`` as an int,
sizes and row strides in elements, a dtype code (``DTYPE_CODES``) and the
stream handle of the device's current CUDA stream (0 on CPU). The CPU kernels
use ``torch.get_num_threads()`` threads. Beyond the contract, these functions
also accept what is cheap to fix here: inputs of other ranks or layouts are
viewed or copied into rows, a weight whose dtype is neither x's nor fp32 and
non-fp32 cos/sin/rstd/upstream gradients are converted (all small), and int32
labels are widened.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from . import _extension

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_threads_set: int | None = None


def _missing(op: str):
    raise RuntimeError(
        f"olmo2_kernels._C has no kernel for {op} ({_extension.load_error() or 'not in this build'})"
    )


# --------------------------------------------------------------------------- plumbing
def _kernels(op: str, device: torch.device):
    """The ``_C`` submodule for ``device`` and the stream handle to launch on."""
    module = _extension.module()
    if module is None:
        _missing(op)
    if device.type == "cpu":
        global _threads_set
        threads = torch.get_num_threads()
        if threads != _threads_set:
            module.cpu.set_num_threads(threads)
            _threads_set = threads
        return module.cpu, 0
    if device.type == "cuda":
        if not hasattr(module, "cuda"):
            _missing(op)
        return module.cuda, torch.cuda.current_stream(device).cuda_stream
    raise ValueError(f"{op}: the compiled kernels run CPU or CUDA tensors, got a {device.type} tensor")


def _on(device: torch.device):
    """Make ``device`` current for the launch (kernels run on the current device)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _n_partials(rows: int, device: torch.device) -> int:
    """Blocks sharing a weight-gradient reduction on CUDA (one fp32 partial row each):
    four per SM fill the GPU while the partial rows stay small next to the inputs."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(rows, 4 * _sm_count(index)))


def _code(op: str, name: str, t: Tensor) -> int:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(
            f"{op}: {name} must be float32, bfloat16 or float16 for the compiled kernels, got {t.dtype}"
        )
    return code


def _rows(t: Tensor) -> Tensor:
    """``t`` as (rows, last dim) with unit column stride and row stride >= width."""
    rows = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]:
        rows = rows.contiguous()
    return rows


def _rows_like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (e.g. an upstream gradient) as rows in x's dtype."""
    return _rows(t if t.dtype == x.dtype else t.to(x.dtype))


def _weight(weight: Tensor, x: Tensor) -> Tensor:
    """The weight as the kernels take it: contiguous, in x's dtype or fp32."""
    if weight.dtype not in (x.dtype, torch.float32):
        weight = weight.float()
    return weight.contiguous()


def _fp32_vector(t: Tensor, n: int) -> Tensor:
    """A length-n fp32 vector; a 0-dim or length-1 tensor broadcasts with stride 0."""
    t = t.to(torch.float32)
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1 and n != 1):
        return t.reshape(1).expand(n)
    return t.reshape(n)


def _fp32_table(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


# --------------------------------------------------------------------------- rms_norm
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    x = _rows(x)
    rows, cols = x.shape
    w = _weight(weight, x)
    y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    kernels, stream = _kernels("rms_norm", x.device)
    with _on(x.device):
        kernels.rms_norm_fwd(
            x=x.data_ptr(), x_stride=x.stride(0), w=w.data_ptr(), y=y.data_ptr(), y_stride=y.stride(0),
            rstd=rstd.data_ptr(), rows=rows, cols=cols, eps=float(eps),
            x_dtype=_code("rms_norm", "x", x), w_dtype=_code("rms_norm", "weight", w), stream=stream,
        )
    return y, rstd


def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    x = _rows(x)
    dy = _rows_like(dy, x)
    rows, cols = x.shape
    w = _weight(weight, x)
    dx = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    rstd = _fp32_table(rstd)
    dw = torch.empty(cols, dtype=w.dtype, device=x.device)
    n_partials = _n_partials(rows, x.device)
    partial = torch.empty((n_partials, cols), dtype=torch.float32, device=x.device) if n_partials else None
    kernels, stream = _kernels("rms_norm", x.device)
    with _on(x.device):
        kernels.rms_norm_bwd(
            dy=dy.data_ptr(), dy_stride=dy.stride(0), x=x.data_ptr(), x_stride=x.stride(0), w=w.data_ptr(),
            rstd=rstd.data_ptr(), dx=dx.data_ptr(), dx_stride=dx.stride(0), dw=dw.data_ptr(),
            partial=partial.data_ptr() if partial is not None else 0, n_partials=n_partials, rows=rows, cols=cols,
            x_dtype=_code("rms_norm", "x", x), w_dtype=_code("rms_norm", "weight", w), stream=stream,
        )
    return dx, dw.to(weight.dtype).view(weight.shape)


# --------------------------------------------------------------------------- qk_norm_rope
def norm_rope_fwd(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, head_dim: int, eps: float) -> tuple[Tensor, Tensor]:
    x = _rows(x)
    rows, cols = x.shape
    w = _weight(weight, x)
    cos, sin = _fp32_table(cos), _fp32_table(sin)
    y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    kernels, stream = _kernels("qk_norm_rope", x.device)
    with _on(x.device):
        kernels.norm_rope_fwd(
            x=x.data_ptr(), x_stride=x.stride(0), w=w.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(),
            y=y.data_ptr(), y_stride=y.stride(0), rstd=rstd.data_ptr(), rows=rows, cols=cols,
            seq_len=cos.shape[0], head_dim=int(head_dim), eps=float(eps),
            x_dtype=_code("qk_norm_rope", "x", x), w_dtype=_code("qk_norm_rope", "weight", w), stream=stream,
        )
    return y, rstd


def norm_rope_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, head_dim: int
) -> tuple[Tensor, Tensor]:
    x = _rows(x)
    dy = _rows_like(dy, x)
    rows, cols = x.shape
    w = _weight(weight, x)
    dx = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    cos, sin, rstd = _fp32_table(cos), _fp32_table(sin), _fp32_table(rstd)
    dw = torch.empty(cols, dtype=w.dtype, device=x.device)
    n_partials = _n_partials(rows, x.device)
    partial = torch.empty((n_partials, cols), dtype=torch.float32, device=x.device) if n_partials else None
    kernels, stream = _kernels("qk_norm_rope", x.device)
    with _on(x.device):
        kernels.norm_rope_bwd(
            dy=dy.data_ptr(), dy_stride=dy.stride(0), x=x.data_ptr(), x_stride=x.stride(0), w=w.data_ptr(),
            rstd=rstd.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(), dx=dx.data_ptr(),
            dx_stride=dx.stride(0), dw=dw.data_ptr(), partial=partial.data_ptr() if partial is not None else 0,
            n_partials=n_partials, rows=rows, cols=cols, seq_len=cos.shape[0], head_dim=int(head_dim),
            x_dtype=_code("qk_norm_rope", "x", x), w_dtype=_code("qk_norm_rope", "weight", w), stream=stream,
        )
    return dx, dw.to(weight.dtype).view(weight.shape)


# --------------------------------------------------------------------------- cross_entropy
def _labels(labels: Tensor) -> Tensor:
    return labels.to(torch.int64).contiguous().reshape(-1)


def cross_entropy_fwd(logits: Tensor, labels: Tensor, ignore_index: int, z_loss_coef: float) -> tuple[Tensor, Tensor, Tensor]:
    logits = _rows(logits)
    rows, vocab = logits.shape
    labels = _labels(labels)
    ce = torch.empty(rows, dtype=torch.float32, device=logits.device)
    z = torch.empty_like(ce)
    lse = torch.empty_like(ce)
    if rows == 0:
        return ce, z, lse
    kernels, stream = _kernels("cross_entropy", logits.device)
    with _on(logits.device):
        kernels.cross_entropy_fwd(
            logits=logits.data_ptr(), logits_stride=logits.stride(0), labels=labels.data_ptr(), ce=ce.data_ptr(),
            z=z.data_ptr(), lse=lse.data_ptr(), rows=rows, vocab=vocab, ignore_index=int(ignore_index),
            z_coef=float(z_loss_coef), dtype=_code("cross_entropy", "logits", logits), stream=stream,
        )
    return ce, z, lse


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
    logits = _rows(logits)
    rows, vocab = logits.shape
    if out is None:
        out = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    elif (
        out.dim() != 2
        or tuple(out.shape) != (rows, vocab)
        or out.device != logits.device
        or (vocab > 1 and out.stride(1) != 1)
        or (rows > 1 and out.stride(0) < vocab)
    ):
        raise ValueError(
            f"cross_entropy: out must be a ({rows}, {vocab}) tensor on {logits.device} with unit column "
            f"stride, got {tuple(out.shape)} on {out.device} with strides {out.stride()}"
        )
    out_code = _code("cross_entropy", "out", out)
    if rows == 0:
        return out
    labels = _labels(labels)
    lse = _fp32_table(lse)
    grad_ce = _fp32_vector(grad_ce, rows)
    grad_z = _fp32_vector(grad_z, rows)
    kernels, stream = _kernels("cross_entropy", logits.device)
    with _on(logits.device):
        kernels.cross_entropy_bwd(
            logits=logits.data_ptr(), logits_stride=logits.stride(0), labels=labels.data_ptr(), lse=lse.data_ptr(),
            grad_ce=grad_ce.data_ptr(), grad_ce_stride=grad_ce.stride(0), grad_z=grad_z.data_ptr(),
            grad_z_stride=grad_z.stride(0), out=out.data_ptr(), out_stride=out.stride(0), rows=rows, vocab=vocab,
            ignore_index=int(ignore_index), z_coef=float(z_loss_coef),
            dtype=_code("cross_entropy", "logits", logits), out_dtype=out_code, stream=stream,
        )
    return out


# --------------------------------------------------------------------------- swiglu
def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    shape = gate.shape
    gate = _rows(gate)
    up = _rows_like(up, gate)
    rows, cols = gate.shape
    y = torch.empty((rows, cols), dtype=gate.dtype, device=gate.device)
    if y.numel():
        kernels, stream = _kernels("swiglu", gate.device)
        with _on(gate.device):
            kernels.swiglu_fwd(
                gate=gate.data_ptr(), gate_stride=gate.stride(0), up=up.data_ptr(), up_stride=up.stride(0),
                y=y.data_ptr(), y_stride=y.stride(0), rows=rows, cols=cols, dtype=_code("swiglu", "gate", gate),
                stream=stream,
            )
    return y.view(shape)


def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    shape = gate.shape
    gate = _rows(gate)
    up = _rows_like(up, gate)
    dy = _rows_like(dy, gate)
    rows, cols = gate.shape
    dgate = torch.empty((rows, cols), dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    if dgate.numel():
        kernels, stream = _kernels("swiglu", gate.device)
        with _on(gate.device):
            kernels.swiglu_bwd(
                dy=dy.data_ptr(), dy_stride=dy.stride(0), gate=gate.data_ptr(), gate_stride=gate.stride(0),
                up=up.data_ptr(), up_stride=up.stride(0), dgate=dgate.data_ptr(), dgate_stride=dgate.stride(0),
                dup=dup.data_ptr(), dup_stride=dup.stride(0), rows=rows, cols=cols,
                dtype=_code("swiglu", "gate", gate), stream=stream,
            )
    return dgate.view(shape), dup.view(shape)
