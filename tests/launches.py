"""Records the Triton kernel launches of an op module: which kernel, the grid,
and the constexprs and launch options (``num_warps``) the launcher chose.

With ``run=False`` nothing is launched, so launchers can be driven with meta
tensors at training sizes (what the GPU would be given) on a machine without one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType


@dataclass
class Launch:
    kernel: str
    grid: tuple
    meta: dict = field(default_factory=dict)

    @property
    def programs(self) -> int:
        count = 1
        for g in self.grid:
            count *= g
        return count


class _Recording:
    def __init__(self, name, kernel, log, run):
        self.name, self.kernel, self.log, self.run = name, kernel, log, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.name, tuple(grid), dict(kwargs)))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
            return None

        return launch


class RecordLaunches:
    """Replaces every ``*_kernel`` attribute of ``module`` (through pytest's
    ``monkeypatch``, undone after the test) by a recorder."""

    def __init__(self, monkeypatch, module: ModuleType, run: bool = True):
        self.launches: list[Launch] = []
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(value, "__getitem__"):
                monkeypatch.setattr(module, name, _Recording(name, value, self.launches, run))

    def of(self, kernel: str) -> list[Launch]:
        return [launch for launch in self.launches if launch.kernel == kernel]

    def clear(self) -> None:
        self.launches.clear()
