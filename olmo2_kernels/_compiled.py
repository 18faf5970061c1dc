"""Torch-side launchers for the compiled extension's kernels (``cpu`` and ``cuda``
backends).

Each function takes its tensors as the op module hands them over (the layout
below, the one the Triton launchers take too), allocates the outputs, picks the
CUDA stream, and calls the ``_C`` function of the same name with keyword
arguments named after the fields of its parameter struct (one row of the op
table, csrc/common/op_table.h). Signatures are the same as the Triton
launchers in each op module:

rms_norm_fwd(x, weight, eps) -> (y, rstd)
    x (rows, cols); y contiguous, dtype of x; rstd (rows,) fp32.
rms_norm_bwd(dy, x, weight, rstd) -> (dx, dweight)
    dx contiguous, dtype of x; dweight dtype of weight, accumulated in fp32.
norm_rope_fwd(x, weight, cos, sin, head_dim, eps) -> (y, rstd)
    One projection (q or k): x (rows, H*head_dim), rows ordered (..., T) so row r
    is at position r % T with T = cos.shape[0]; cos/sin (T, head_dim).
    RMSNorm over the whole row, then rotate_half RoPE on each head.
norm_rope_bwd(dy, x, weight, rstd, cos, sin, head_dim) -> (dx, dweight)
cross_entropy_fwd(logits, labels, ignore_index, z_loss_coef) -> (ce, z, lse)
    logits (N, V); outputs (N,) fp32. Each row follows the row contract of
    :func:`olmo2_kernels.reference.cross_entropy`.
cross_entropy_bwd(logits, labels, lse, grad_ce, grad_z, ignore_index, z_loss_coef, out=None) -> dlogits
    grad_ce/grad_z per-token upstream gradients; dlogits in logits' dtype, or
    written into ``out`` when given: any float dtype (rounded once from fp32),
    any row stride; ``out`` may be ``logits`` itself when dtype and row stride
    are equal.
swiglu_fwd(gate, up) -> y
swiglu_bwd(dy, gate, up) -> (dgate, dup)

The input contract: the op modules normalize inputs once, for every backend
(``as_rows``, ``weight.contiguous()``, ``kernel_labels``, fp32 cos/sin and
per-token gradients), and these launchers take them as they come:

* matrices (x, dy, logits, gate, up, and ``out``): 2-D with unit stride along
  the last dim and a row stride >= the width (passed to the kernels); dy and up
  in the dtype of x and gate;
* weights: 1-D contiguous, any float dtype;
* cos, sin: fp32, contiguous (T, head_dim); rstd, lse: fp32 (rows,) contiguous;
  labels: int64 (rows,) contiguous; grad_ce, grad_z: fp32 (rows,), contiguous
  or with stride 0 (one value broadcast).

``_expect`` checks that contract from tensor metadata alone (no copy, no device
sync) and raises one error naming the launcher, the argument, what was expected
and what was given; the bindings check the raw arguments again in C++
(csrc/bindings/checks.h). The one conversion made here is the compiled kernels'
own: a weight whose dtype is neither x's nor fp32 runs as fp32 (the CUDA
kernels take those two), its gradient returned in its dtype.

A kernel the loaded build lacks is never reached: the backend resolver checks
``capabilities()["ops"]`` first.

How tensors cross to ``_C`` (csrc/bindings/ops.h): ``data_ptr()`` as an int,
sizes and row strides in elements, a dtype code (``DTYPE_CODES``) and the
stream handle of the device's current CUDA stream (0 on CPU). The CPU kernels
use ``torch.get_num_threads()`` threads.
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# The layouts of the input contract (module docstring): what each means, and the test.
_LAYOUTS = {
    "rows": (
        "2-D with unit stride along the last dim and a row stride >= its width",
        lambda t: t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1)
        and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]),
    ),
    "vector": ("1-D contiguous", lambda t: t.dim() == 1 and t.is_contiguous()),
    "vector or broadcast": (
        "1-D, contiguous or with stride 0 (one value broadcast)",
        lambda t: t.dim() == 1 and (t.shape[0] <= 1 or t.stride(0) in (0, 1)),
    ),
    "table": ("2-D contiguous", lambda t: t.dim() == 2 and t.is_contiguous()),
}


def _expect(
    op: str, name: str, t: Tensor, layout: str, *, shape: tuple | None = None,
    dtype: torch.dtype | None = None, device: torch.device | None = None,
) -> None:
    """The launchers' input contract for one argument, checked from metadata alone:
    TypeError for another dtype, ValueError for another layout, shape or device."""
    if dtype is not None and t.dtype != dtype:
        raise TypeError(
            f"{op}: {name} must be {_dtype_name(dtype)} (the op module converts it), got {_dtype_name(t.dtype)}"
        )
    what, fits = _LAYOUTS[layout]
    if not fits(t) or (shape is not None and tuple(t.shape) != tuple(shape)) or (
        device is not None and t.device != device
    ):
        expected = what + (f" of shape {tuple(shape)}" if shape is not None else "")
        expected += f" on {device}" if device is not None else ""
        raise ValueError(
            f"{op}: {name} must be {expected} (as the op module lays it out), "
            f"got shape {tuple(t.shape)} with strides {t.stride()} on {t.device}"
        )


def _weight(weight: Tensor, x: Tensor) -> Tensor:
    """The weight in a dtype the compiled kernels take: x's or fp32."""
    return weight if weight.dtype in (x.dtype, torch.float32) else weight.float()


# --------------------------------------------------------------------------- rms_norm
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    op = "rms_norm_fwd"
    _expect(op, "x", x, "rows")
    rows, cols = x.shape
    _expect(op, "weight", weight, "vector", shape=(cols,))
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
    op = "rms_norm_bwd"
    _expect(op, "x", x, "rows")
    rows, cols = x.shape
    _expect(op, "dy", dy, "rows", shape=(rows, cols), dtype=x.dtype)
    _expect(op, "weight", weight, "vector", shape=(cols,))
    _expect(op, "rstd", rstd, "vector", shape=(rows,), dtype=torch.float32)
    w = _weight(weight, x)
    dx = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
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
    return dx, dw.to(weight.dtype)


# --------------------------------------------------------------------------- qk_norm_rope
def _expect_tables(op: str, cos: Tensor, sin: Tensor, head_dim: int) -> None:
    """cos and sin: fp32 (seq_len, head_dim) contiguous, seq_len taken from cos."""
    _expect(op, "cos", cos, "table", dtype=torch.float32)
    _expect(op, "cos", cos, "table", shape=(cos.shape[0], head_dim))
    _expect(op, "sin", sin, "table", shape=(cos.shape[0], head_dim), dtype=torch.float32)


def norm_rope_fwd(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, head_dim: int, eps: float) -> tuple[Tensor, Tensor]:
    op = "norm_rope_fwd"
    _expect(op, "x", x, "rows")
    rows, cols = x.shape
    _expect(op, "weight", weight, "vector", shape=(cols,))
    _expect_tables(op, cos, sin, head_dim)
    w = _weight(weight, x)
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
    op = "norm_rope_bwd"
    _expect(op, "x", x, "rows")
    rows, cols = x.shape
    _expect(op, "dy", dy, "rows", shape=(rows, cols), dtype=x.dtype)
    _expect(op, "weight", weight, "vector", shape=(cols,))
    _expect(op, "rstd", rstd, "vector", shape=(rows,), dtype=torch.float32)
    _expect_tables(op, cos, sin, head_dim)
    w = _weight(weight, x)
    dx = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
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
    return dx, dw.to(weight.dtype)


# --------------------------------------------------------------------------- cross_entropy
def cross_entropy_fwd(logits: Tensor, labels: Tensor, ignore_index: int, z_loss_coef: float) -> tuple[Tensor, Tensor, Tensor]:
    op = "cross_entropy_fwd"
    _expect(op, "logits", logits, "rows")
    rows, vocab = logits.shape
    _expect(op, "labels", labels, "vector", shape=(rows,), dtype=torch.int64)
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
    op = "cross_entropy_bwd"
    _expect(op, "logits", logits, "rows")
    rows, vocab = logits.shape
    _expect(op, "labels", labels, "vector", shape=(rows,), dtype=torch.int64)
    _expect(op, "lse", lse, "vector", shape=(rows,), dtype=torch.float32)
    _expect(op, "grad_ce", grad_ce, "vector or broadcast", shape=(rows,), dtype=torch.float32)
    _expect(op, "grad_z", grad_z, "vector or broadcast", shape=(rows,), dtype=torch.float32)
    if out is None:
        out = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    else:
        _expect(op, "out", out, "rows", shape=(rows, vocab), device=logits.device)
    out_code = _code("cross_entropy", "out", out)
    if rows == 0:
        return out
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
    op = "swiglu_fwd"
    _expect(op, "gate", gate, "rows")
    rows, cols = gate.shape
    _expect(op, "up", up, "rows", shape=(rows, cols), dtype=gate.dtype)
    y = torch.empty((rows, cols), dtype=gate.dtype, device=gate.device)
    if y.numel():
        kernels, stream = _kernels("swiglu", gate.device)
        with _on(gate.device):
            kernels.swiglu_fwd(
                gate=gate.data_ptr(), gate_stride=gate.stride(0), up=up.data_ptr(), up_stride=up.stride(0),
                y=y.data_ptr(), y_stride=y.stride(0), rows=rows, cols=cols, dtype=_code("swiglu", "gate", gate),
                stream=stream,
            )
    return y


def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    op = "swiglu_bwd"
    _expect(op, "gate", gate, "rows")
    rows, cols = gate.shape
    _expect(op, "up", up, "rows", shape=(rows, cols), dtype=gate.dtype)
    _expect(op, "dy", dy, "rows", shape=(rows, cols), dtype=gate.dtype)
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
    return dgate, dup
