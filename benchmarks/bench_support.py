"""Shared by the pytest-benchmark suites: the same shapes (``specs``),
implementations (``impls``) and inputs as ``olmo2-bench``, timed by
pytest-benchmark instead of the CLI's harness.

pytest-benchmark times with the host clock, so on GPU each call ends with a
device synchronize (launch and sync latency included); the CLI's CUDA-event
timings are the reference figures. Rounds rotate through the input copies and
zero gradients in ``setup``, outside the timed region.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from . import harness, specs
from .impls import IMPLS
from .kernels import make_input_sets

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# CPU runs use the quick shapes unless OLMO2_BENCH_FULL=1; GPU runs the training shapes.
QUICK = DEVICE.type == "cpu" and os.environ.get("OLMO2_BENCH_FULL", "0") != "1"
# On a shared CPU, OLMO2_BENCH_THREADS=1 keeps other processes' load out of the timings.
if os.environ.get("OLMO2_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["OLMO2_BENCH_THREADS"]))
PASSES = ("fwd", "fwdbwd")


def params(op: str) -> list:
    """(case, impl, pass) triples for ``op``, with readable ids."""
    out = []
    for case in specs.plan(DEVICE.type, ops=(op,), quick=QUICK):
        for impl in IMPLS:
            for p in PASSES:
                out.append(pytest.param(case, impl, p, id=f"{case.preset}-{'x'.join(str(v) for _, v in case.dims)}-{impl}-{p}"))
    return out


def run(benchmark, case: specs.Case, impl_name: str, pass_: str) -> None:
    impl = IMPLS[impl_name]
    reason = impl.unavailable(case.op, DEVICE, DTYPE, QUICK)
    if reason:
        pytest.skip(f"{impl_name}: {reason}")
    spec, dims = specs.SPECS[case.op], case.d
    try:
        sets, upstream = make_input_sets(spec, dims, DTYPE, DEVICE, seed=0)
    except torch.OutOfMemoryError:
        pytest.skip("inputs do not fit in memory")
    runner = impl.build(spec, dims)
    mutated = impl.mutates.get(case.op, ()) if isinstance(impl.mutates, dict) else ()
    pristine = [{n: s[n].detach().clone() for n in mutated} for s in sets]
    counter = {"i": 0}

    def setup():
        i = counter["i"] % len(sets)
        counter["i"] += 1
        inputs = sets[i]
        for name in spec.grad_inputs:
            inputs[name].grad = None
        with torch.no_grad():
            for name, saved in pristine[i].items():
                inputs[name].copy_(saved)
        return (i,), {}

    def target(i):
        out = runner(sets[i])
        if pass_ == "fwdbwd":
            harness.backward(spec, out, upstream[i])
        harness.synchronize(DEVICE)

    try:
        for _ in range(2):  # warm-up (compilation, autotuning) and a per-call estimate
            args, _ = setup()
            t0 = time.perf_counter()
            target(*args)
        estimate = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        pytest.skip("out of memory")
    except Exception as exc:  # noqa: BLE001
        if impl.failure_is_skip:
            pytest.skip(f"{impl_name} failed: {type(exc).__name__}: {exc}")
        raise
    rounds = int(min(200, max(5, 1.0 / max(estimate, 1e-6))))
    benchmark.group = f"{case.op} {case.label} {pass_}"
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
    median = benchmark.stats.stats.median
    nbytes = spec.bytes(dims, DTYPE, backward=(pass_ == "fwdbwd"))
    flops = spec.flops(dims, backward=(pass_ == "fwdbwd"))
    benchmark.extra_info.update(device=DEVICE.type, dtype=str(DTYPE), bytes=nbytes, GBps=nbytes / median / 1e9)
    if flops:
        benchmark.extra_info.update(flops=flops, TFLOPs=flops / median / 1e12)
