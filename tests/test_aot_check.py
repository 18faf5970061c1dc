"""scripts/aot_check.py, the ahead-of-time compile check, on tiny configurations.

The record/bind/compile steps run in a fresh process: this suite sets
TRITON_INTERPRET=1 (conftest), under which ``triton.jit`` makes interpreter
functions that Triton cannot compile. The occupancy arithmetic is plain Python
and is tested here directly.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import aot_check  # noqa: E402


def _run_compiled(code: str) -> object:
    """Run ``code`` in a process without the interpreter; it prints one JSON value last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    prelude = (
        "import dataclasses, json, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "import aot_check as aot\n"
        "from olmo2_kernels import _triton\n"
        "kernels = aot.discover_kernels(aot.op_modules())\n"
        "meta = lambda shape, dtype: torch.empty(shape, dtype=dtype, device='meta')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_record_and_bind_give_the_launchers_specialization():
    # rms_norm forward and backward at 199 rows of 2048 (1B's width), bf16 x,
    # fp32 weight, sized for an H100; the forward once more on a view one
    # element into its storage (2 bytes: not 16-byte aligned).
    rows = _run_compiled(
        "x = meta((199, 2048), torch.bfloat16)\n"
        "x_odd = meta((199 * 2048 + 1,), torch.bfloat16)[1:].view(199, 2048)\n"
        "w = meta((2048,), torch.float32)\n"
        "with aot.recording(kernels) as sink, _triton.assume_sm_count(132):\n"
        "    _y, rstd = aot.op_fn('rms_norm', 'rms_norm_fwd')(x=x, weight=w, eps=1e-6, backend='triton')\n"
        "    aot.op_fn('rms_norm', 'rms_norm_fwd')(x=x_odd, weight=w, eps=1e-6, backend='triton')\n"
        "    aot.op_fn('rms_norm', 'rms_norm_bwd')(dy=torch.empty_like(x), x=x, weight=w, rstd=rstd, backend='triton')\n"
        "rows = aot.evaluate(sink, 'H100')\n"
        "print(json.dumps([dict(\n"
        "    kernel=r.kernel, passed={k: v for k, v in l.kwargs.items()}, params=l.fn.arg_names,\n"
        "    constexprs=r.launch.config.constexprs, signature=r.launch.config.signature,\n"
        "    divisible=sorted(r.launch.config.attrs), programs=r.launch.programs,\n"
        "    registers=r.resources.registers, error=r.resources.error, failures=r.failures(),\n"
        ") for r, l in zip(rows, sink)]))\n"
    )
    assert len(rows) == 3
    fwd, fwd_odd, bwd = rows
    for row in rows:
        # Every constexpr the launcher passed is bound with its value.
        passed = {k: v for k, v in row["passed"].items() if k in row["params"]}
        for name, value in passed.items():
            if row["signature"][name] == "constexpr":
                assert row["constexprs"][name] == value, (row["kernel"], name)
        assert row["error"] is None and row["failures"] == [], row
        assert row["registers"] > 0
    first = fwd["params"][0]  # the input pointer
    assert fwd["signature"][first] == "*bf16"
    assert first in fwd["divisible"] and first not in fwd_odd["divisible"]
    assert fwd["programs"] == 199
    # 199 rows over at most 4 * 132 programs: one row each, and an int equal to
    # 1 is specialized into a constexpr by Triton's binder.
    specialized = {k: v for k, v in bwd["constexprs"].items() if k not in bwd["passed"]}
    assert specialized and set(specialized.values()) == {1}, bwd["constexprs"]
    assert bwd["programs"] == 199


def test_spilling_configuration_fails():
    # The forward launch with a 16384-wide tile on a single warp: 512 fp32
    # values per thread for x alone, more than the 255 registers a thread has.
    row = _run_compiled(
        "x, w = meta((8, 2048), torch.float32), meta((2048,), torch.float32)\n"
        "with aot.recording(kernels) as sink, _triton.assume_sm_count(132):\n"
        "    aot.op_fn('rms_norm', 'rms_norm_fwd')(x=x, weight=w, eps=1e-6, backend='triton')\n"
        "launch = sink[0]\n"
        "block = next(k for k in launch.kwargs if k.startswith('BLOCK'))\n"
        "bad = dataclasses.replace(launch, kwargs={**launch.kwargs, block: 16384, 'num_warps': 1})\n"
        "r, = aot.evaluate([bad], 'H100')\n"
        "print(json.dumps(dict(resources=dataclasses.asdict(r.resources), failures=r.failures())))\n"
    )
    assert row["resources"]["error"] is None
    assert row["resources"]["spill_stores"] > 0 or row["resources"]["stack"] > 0
    assert any(f.startswith("spills:") for f in row["failures"]), row


def test_occupancy_limits():
    # 40 registers, 16 warps: 1280 registers per warp, 51 warps fit, 3 blocks (75%).
    occ = aot_check.occupancy(90, 40, 16, 64)
    assert (occ.blocks_per_sm, occ.occupancy, occ.problems) == (3, 0.75, ())
    # Allocation granularity: 33 registers round up to 1280 per warp, like 40.
    assert aot_check.occupancy(90, 33, 16, 0).blocks_per_sm == 3
    # More registers than the SM has for one block.
    assert aot_check.occupancy(90, 255, 32, 0).problems
    # Shared memory: over sm_80's opt-in limit per block, but within sm_90's.
    assert aot_check.occupancy(80, 32, 4, 200 * 1024).problems
    sm90 = aot_check.occupancy(90, 32, 4, 200 * 1024)
    assert sm90.problems == () and sm90.blocks_per_sm == 1 and sm90.limited_by == "smem"


def test_a_launcher_that_fails_is_a_failure_not_a_skip():
    def changed_signature():
        raise TypeError("rms_norm_fwd() got an unexpected keyword argument 'weight'")

    scenario = aot_check.Scenario("rms_norm", "1b", 8192, "x=bf16 w=bf16", changed_signature)
    recorded, failures = aot_check.record_launches([scenario], ["H100", "A100"], kernels={})
    assert recorded == []
    assert len(failures) == 2 and all("unexpected keyword argument 'weight'" in f for f in failures)
    assert "changed signature" in failures[0]
