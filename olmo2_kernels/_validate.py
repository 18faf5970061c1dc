"""Input checks shared by the public ops.

Every failure names the op, the argument, what was expected and what was
given: TypeError for a wrong type or dtype, ValueError for a wrong shape,
device, layout or value.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)

# Label range checks read the labels. On CPU that costs nothing; on CUDA it is a
# host sync, so it runs there only when OLMO2_KERNELS_CHECK_LABELS=1. Without
# the check the kernels never read out of bounds: a label outside [0, V) that is
# not ignore_index yields a NaN loss for its token, which the trainer's
# non-finite check catches.
_CHECK_LABELS_ON_DEVICE = os.environ.get("OLMO2_KERNELS_CHECK_LABELS", "0") == "1"


def tensor(op: str, name: str, value: object, dtypes=FLOAT_DTYPES, min_ndim: int = 1) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if value.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dim(s), got shape {tuple(value.shape)}")
    return value


def same_device(op: str, **tensors: Tensor) -> torch.device:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device"
            )
    return first.device


def shape(op: str, name: str, t: Tensor, expected: tuple, what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def positive_float(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{op}: {name} must be a positive number, got {value!r}")
    return float(value)


def nonnegative_float(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{op}: {name} must be a non-negative number, got {value!r}")
    return float(value)


def choice(op: str, name: str, value: object, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def labels(op: str, labels_: object, n_tokens: int, vocab_size: int, ignore_index: int, device: torch.device) -> Tensor:
    """Check dtype, shape, device and (where free) the range of ``labels``."""
    t = tensor(op, "labels", labels_, dtypes=INDEX_DTYPES)
    shape(op, "labels", t, (n_tokens,), "one label per row of logits")
    if t.device != device:
        raise ValueError(f"{op}: labels is on {t.device} but the inputs are on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if t.numel() and range_checks_enabled(t):
        bad = (t != ignore_index) & ((t < 0) | (t >= vocab_size))
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{op}: labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                f"labels[{idx}] = {int(t[idx])}"
            )
    return t


def range_checks_enabled(t: Tensor) -> bool:
    """Whether value-range checks (labels, token ids) run for ``t``: always on CPU,
    on other devices only with OLMO2_KERNELS_CHECK_LABELS=1 (they cost a host
    sync), never while torch.compile traces."""
    return (t.device.type == "cpu" or _CHECK_LABELS_ON_DEVICE) and not torch.compiler.is_compiling()
