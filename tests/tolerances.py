"""The one tolerance table for numerics tests, keyed by the dtype of the inputs.

Every test compares an implementation run in ``dtype`` with the spec
(:mod:`olmo2_kernels.reference`) evaluated in float64 on the same input values,
so the error measured is the implementation's own: fp32 accumulation plus one
rounding of each output to ``dtype``.

* fp32: accumulation error only.
* bf16 (8 significant bits, half-ulp 2^-9 = 0.2%) and fp16 (11 bits): the
  final rounding dominates; rtol covers it with a few ulps of headroom, atol
  covers outputs near zero whose error comes from larger intermediate values.

Reductions (weight gradients summed over rows, losses summed over tokens)
accumulate error with their length: ``tolerance(dtype, reduction=n)`` grows the
atol by sqrt(n / 64), the expected growth of rounding errors that add up like a
random walk, and never shrinks it.
"""
from __future__ import annotations

import math

import torch

TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
}


def tolerance(dtype: torch.dtype, reduction: int = 1) -> dict:
    tol = dict(TOLERANCES[dtype])
    tol["atol"] *= max(1.0, math.sqrt(reduction / 64))
    return tol


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, reduction: int = 1, name: str = "") -> None:
    """Compare ``actual`` (computed in ``dtype``) with the float64 ``expected``."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    torch.testing.assert_close(
        actual.detach().to(torch.float64).cpu(),
        expected.detach().to(torch.float64).cpu(),
        **tolerance(dtype, reduction),
        msg=lambda m: f"{name} ({dtype}): {m}",
    )


def f64_leaf(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``t`` that requires grad (the reference's input)."""
    return t.detach().to(torch.float64).requires_grad_(True)
