"""Record the Triton launches a launcher makes (grid, constexprs, num_warps) while
still running them, so tests can assert the tiling a GPU would get."""
from __future__ import annotations

import contextlib
import types

import triton.runtime.interpreter  # noqa: F401 - for InterpretedFunction

from olmo2_kernels._triton import triton


class _Recorder:
    def __init__(self, name, kernel, calls):
        self._name, self._kernel, self._calls = name, kernel, calls

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            self._calls.append({"kernel": self._name, "grid": tuple(grid), **kwargs})
            return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def record_launches(module: types.ModuleType):
    """Swap every launched ``@triton.jit`` kernel (``*_kernel``) of ``module`` for a recording wrapper;
    yields the list of launches (dicts: kernel, grid and the keyword args)."""
    calls: list[dict] = []
    # Under TRITON_INTERPRET=1, @triton.jit gives InterpretedFunction objects.
    jit = (triton.runtime.jit.JITFunction, triton.runtime.interpreter.InterpretedFunction)
    # Launched kernels are named ``*_kernel``; other jit functions are device
    # helpers that kernels call, which must stay as they are.
    kernels = {name: obj for name, obj in vars(module).items() if isinstance(obj, jit) and name.endswith("_kernel")}
    try:
        for name, kernel in kernels.items():
            setattr(module, name, _Recorder(name, kernel, calls))
        yield calls
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
