"""The one timing and measuring harness every benchmark here uses.

* :func:`time_calls`: warm-up, then many timed calls; median with 20/80
  quantiles. CUDA events around each call on GPU, ``perf_counter`` on CPU.
  Inputs rotate through several copies so the caches do not flatter small
  shapes; a ``prepare`` hook (zeroing gradients, restoring inputs an
  implementation overwrote) runs outside the timed region.
* :func:`peak_memory`: bytes allocated above what was live before a call:
  ``torch.cuda.max_memory_allocated`` on GPU; on CPU the CPU allocator's
  allocation and free events recorded by ``torch.profiler``.
* :func:`reference_results` and :func:`measure_errors`: an implementation's
  outputs and gradients against the float64 spec on the same input values.
* :func:`measure_ceilings`: the device's copy bandwidth and matmul rate,
  the denominators of "fraction of speed of light".
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from olmo2_kernels import reference
from .specs import OpSpec


# --------------------------------------------------------------------------- timing
@dataclass
class TimingConfig:
    """How long to warm up and how many calls to time.

    The number of timed calls is ``budget_s`` over the per-call time seen in
    warm-up, clamped to ``[min_repeats, max_repeats]``.
    """

    warmup_calls: int = 3
    warmup_s: float = 0.05
    budget_s: float = 0.5
    min_repeats: int = 5
    max_repeats: int = 500
    max_warmup_calls: int = 50
    # Slow calls (seconds each) stop warming up after two calls once this much
    # time has gone by: the second call already runs compiled and tuned.
    warmup_cap_s: float = 2.0


@dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    min_ms: float
    mean_ms: float
    repeats: int
    warmup: int

    def as_dict(self) -> dict:
        return asdict(self)


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not sorted_values:
        raise ValueError("quantile of no values")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: list[float], warmup: int) -> Timing:
    s = sorted(times_ms)
    return Timing(
        median_ms=quantile(s, 0.5),
        q20_ms=quantile(s, 0.2),
        q80_ms=quantile(s, 0.8),
        min_ms=s[0],
        mean_ms=statistics.fmean(s),
        repeats=len(s),
        warmup=warmup,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _gc_paused():
    """No garbage collection pass lands inside a timed call."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_calls(
    step: Callable[[object], object],
    input_sets: list,
    device: torch.device,
    config: TimingConfig | None = None,
    prepare: Callable[[object], None] | None = None,
) -> Timing:
    """Time ``step(input_sets[i % len(input_sets)])`` over many calls.

    ``prepare(inputs)`` runs before each call, outside the timed region (on
    GPU it is enqueued before the start event, so its device work is not
    counted either). Returns the median and 20/80 quantiles in milliseconds.
    """
    cfg = config or TimingConfig()
    if not input_sets:
        raise ValueError("time_calls: input_sets must hold at least one set of inputs")
    n_sets = len(input_sets)

    def run(i: int) -> None:
        inputs = input_sets[i % n_sets]
        if prepare is not None:
            prepare(inputs)
        step(inputs)

    # Warm-up: compilation, autotuning and allocator growth happen here. Each
    # call is synchronized so its time estimates the cost of one call; the
    # first (which compiles) is left out of the estimate.
    warm_times = []
    start = time.perf_counter()
    calls = 0
    while calls < cfg.max_warmup_calls and (calls < cfg.warmup_calls or time.perf_counter() - start < cfg.warmup_s):
        if calls >= 2 and time.perf_counter() - start > cfg.warmup_cap_s:
            break
        t0 = time.perf_counter()
        run(calls)
        synchronize(device)
        warm_times.append(time.perf_counter() - t0)
        calls += 1
    estimate = statistics.median(warm_times[1:] if len(warm_times) > 1 else warm_times)
    repeats = int(min(cfg.max_repeats, max(cfg.min_repeats, math.ceil(cfg.budget_s / max(estimate, 1e-7)))))

    times_ms: list[float] = []
    with _gc_paused():
        if device.type == "cuda":
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            for i in range(repeats):
                inputs = input_sets[(calls + i) % n_sets]
                if prepare is not None:
                    prepare(inputs)
                starts[i].record()
                step(inputs)
                ends[i].record()
            torch.cuda.synchronize(device)
            times_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            for i in range(repeats):
                inputs = input_sets[(calls + i) % n_sets]
                if prepare is not None:
                    prepare(inputs)
                t0 = time.perf_counter_ns()
                step(inputs)
                times_ms.append((time.perf_counter_ns() - t0) / 1e6)
    return summarize(times_ms, warmup=calls)


# --------------------------------------------------------------------------- rotation
def cache_bytes(device: torch.device) -> int:
    """The last-level cache the rotation must defeat: L2 on GPU, L3 (or 32 MiB) on CPU."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    for index in (3, 2):
        path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            return int(text.rstrip("KMG")) * scale
        except ValueError:
            continue
    return 32 * 2**20


def free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def rotation_count(set_bytes: int, device: torch.device, max_sets: int = 16, memory_share: float = 0.2) -> int:
    """How many copies of the inputs to cycle through.

    Enough that the copies together are 4x the last-level cache (so a call never
    finds its inputs cached by the call before), at most ``max_sets``, and
    within ``memory_share`` of the free memory. At least 1.
    """
    want = math.ceil(4 * cache_bytes(device) / max(set_bytes, 1))
    free = free_memory(device)
    if free is not None:
        want = min(want, int(free * memory_share // max(set_bytes, 1)))
    return max(1, min(max_sets, want))


# --------------------------------------------------------------------------- memory
class _StderrSilenced:
    """Redirect the C++ stderr while the profiler starts and stops: it prints a
    status line on each, which would interleave with the table."""

    def __enter__(self):
        try:
            self._saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        return False


def _cpu_peak(call: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _StderrSilenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = []
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]":
            events.append((event.start_ns(), event.nbytes()))
    events.sort(key=lambda e: e[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory(call: Callable[[], object], device: torch.device) -> tuple[int | None, str | None]:
    """Run ``call`` once; return (peak bytes allocated above the bytes live
    before it, None) or (None, why it could not be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base), None
    if device.type == "cpu":
        try:
            return _cpu_peak(call), None
        except Exception as exc:  # noqa: BLE001 - the profiler's internals vary across versions
            return None, f"CPU allocation tracking failed ({type(exc).__name__}: {exc})"
    return None, f"no memory measurement for {device.type}"


# --------------------------------------------------------------------------- numerics
def tensor_errors(actual: Tensor, expected: Tensor) -> dict:
    """Errors of ``actual`` against the float64 ``expected`` of the same shape.

    * ``max_abs``: max |a - e|.
    * ``max_rel``: max |a - e| / max(|e|, 1e-3 * max|e|): the elementwise relative
      error, with magnitudes under a thousandth of the tensor's largest counted
      as that thousandth, so values near zero (where gradients cancel) do not
      turn rounding into huge ratios.
    * ``norm_rel``: ||a - e||_2 / ||e||_2.

    Any non-finite value in ``actual`` gives NaN errors.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        raise ValueError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(device=expected.device, dtype=torch.float64)
    e = expected.detach().to(torch.float64)
    if a.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "norm_rel": 0.0}
    if not bool(torch.isfinite(a).all()):
        nan = float("nan")
        return {"max_abs": nan, "max_rel": nan, "norm_rel": nan}
    diff = (a - e).abs()
    scale = float(e.abs().max())
    floor = max(1e-3 * scale, torch.finfo(torch.float64).tiny)
    max_abs = float(diff.max())
    max_rel = float((diff / e.abs().clamp(min=floor)).max())
    e_norm = float(torch.linalg.vector_norm(e))
    d_norm = float(torch.linalg.vector_norm(diff))
    norm_rel = d_norm / e_norm if e_norm > 0 else (0.0 if d_norm == 0 else float("inf"))
    return {"max_abs": max_abs, "max_rel": max_rel, "norm_rel": norm_rel}


def _leaves(inputs: dict, names: tuple) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, Tensor) and k in names:
            v = v.detach().requires_grad_(True)
        out[k] = v
    return out


def backward(spec: OpSpec, outputs: dict, upstream: dict) -> None:
    """Backpropagate ``upstream`` from the spec's ``grad_outputs``."""
    tensors, grads = [], []
    for name in spec.grad_outputs:
        out = outputs[name]
        tensors.append(out)
        grads.append(upstream[name].to(out.dtype))
    torch.autograd.backward(tensors, grads)


def reference_results(spec: OpSpec, dims: dict, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """The float64 spec's outputs and input gradients on the inputs
    ``spec.make_inputs(dims, dtype, ...)`` (values rounded to ``dtype`` first,
    so the implementation under test sees exactly the same numbers)."""
    inputs = spec.make_inputs(dims, dtype, device, seed)
    as64 = {k: (v.to(torch.float64) if isinstance(v, Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}
    as64 = _leaves(as64, spec.grad_inputs)
    outputs = spec.call(getattr(reference, spec.name), as64)
    upstream = spec.make_upstream(dims, dtype, device, seed)
    backward(spec, outputs, {k: v.to(torch.float64) for k, v in upstream.items()})
    return {
        "outputs": {k: v.detach() for k, v in outputs.items()},
        "grads": {k: as64[k].grad for k in spec.grad_inputs},
    }


def measure_errors(
    spec: OpSpec,
    runner: Callable[[dict], dict],
    dims: dict,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    ref: dict,
) -> dict:
    """Run ``runner`` forward and backward on the reference's inputs; return
    per-tensor errors (see :func:`tensor_errors`) for every output it shares
    with the reference and every input gradient, and the worst of each kind."""
    inputs = _leaves(spec.make_inputs(dims, dtype, device, seed), spec.grad_inputs)
    outputs = runner(inputs)
    backward(spec, outputs, spec.make_upstream(dims, dtype, device, seed))
    result: dict = {"dims": dict(dims), "outputs": {}, "grads": {}}
    for name, expected in ref["outputs"].items():
        if name in outputs:
            result["outputs"][name] = tensor_errors(outputs[name], expected)
    nan = float("nan")
    for name, expected in ref["grads"].items():
        grad = inputs[name].grad
        if grad is None:
            result["grads"][name] = {"max_abs": nan, "max_rel": nan, "norm_rel": nan, "missing": True}
        else:
            result["grads"][name] = tensor_errors(grad, expected)
    for kind in ("outputs", "grads"):
        values = list(result[kind].values())
        for metric in ("max_abs", "max_rel"):
            nums = [v[metric] for v in values]
            result[f"{metric}_{kind}"] = (nan if any(math.isnan(x) for x in nums) else max(nums)) if nums else None
    return result


# --------------------------------------------------------------------------- ceilings
def measure_ceilings(device: torch.device, dtype: torch.dtype, config: TimingConfig | None = None) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and matmul rate.

    GPU: a 1 GiB device-to-device copy (less when memory is short) and an
    8192^3 matmul in ``dtype``. CPU: a 64 MiB copy and a 1024^3 matmul in
    float32 (CPU matmuls in bf16/fp16 often fall back to slow paths and say
    nothing about the machine).
    """
    cfg = config or TimingConfig(budget_s=0.3, min_repeats=5, max_repeats=100)
    out: dict = {}
    if device.type == "cuda":
        free = free_memory(device) or 2**31
        copy_bytes = int(min(2**30, free // 8)) // 4 * 4
        n = 8192
        mm_dtype = dtype
    else:
        copy_bytes = 64 * 2**20
        n = 1024
        mm_dtype = torch.float32
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_calls(lambda _: dst.copy_(src), [None], device, cfg)
    out["copy_bytes"] = 2 * copy_bytes
    out["copy_GBps"] = 2 * copy_bytes / (t.median_ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(n, n, device=device).to(mm_dtype)
    b = torch.randn(n, n, device=device).to(mm_dtype)
    t = time_calls(lambda _: a @ b, [None], device, cfg)
    out["matmul_shape"] = [n, n, n]
    out["matmul_dtype"] = str(mm_dtype).replace("torch.", "")
    out["matmul_TFLOPs"] = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
    return out
