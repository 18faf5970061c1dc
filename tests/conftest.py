"""Shared fixtures: the backend under test and the device it runs on.

Without a GPU the Triton kernels run under the Triton interpreter; the variable
must be set before triton (or olmo2_kernels) is imported, hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import olmo2_kernels  # noqa: E402
from olmo2_kernels import _backend  # noqa: E402

KERNEL_BACKENDS = ("torch", "triton", "cpu", "cuda")
HAS_CUDA = torch.cuda.is_available()


def device_for(backend: str) -> torch.device:
    """The device a backend is tested on: the GPU where there is one (cpu backend: CPU)."""
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "cuda" or HAS_CUDA:
        return torch.device("cuda")
    return torch.device("cpu")


def skip_reason(backend: str, op: str | None) -> str | None:
    reason = _backend.unavailable_reason(backend, device_for(backend).type, op)
    return f"backend {backend!r} unavailable: {reason}" if reason else None


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """Each available backend in turn, active for the whole test.

    A test module names its op in ``OP`` so that a backend lacking that op's
    kernel is skipped with the reason.
    """
    name = request.param
    reason = skip_reason(name, getattr(request.module, "OP", None))
    if reason:
        pytest.skip(reason)
    with olmo2_kernels.use_backend(name):
        yield name


@pytest.fixture
def device(backend) -> torch.device:
    return device_for(backend)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
