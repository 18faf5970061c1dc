"""The kernels benchmark: every op x implementation x shape of a plan, measured
for numerics, time, achieved bandwidth or FLOP/s, and peak memory.

Per case (one op, one shape):

1. Numerics: the float64 spec on the case's inputs (first rows only when the
   case is too large for a float64 copy, see ``specs.numerics_dims``), then
   each implementation forward and backward on the same values; errors of
   every output and every input gradient.
2. Timing: rotating copies of the inputs, shared by all implementations; each
   implementation timed forward (inputs requiring grad, as in training) and
   forward+backward, with peak memory measured on one extra untimed call.
3. Speedups over the eager ``torch`` row of the same case and run.

Rows are yielded as they complete, so a long run shows progress.
"""
from __future__ import annotations

import gc
import traceback
from typing import Callable, Iterator

import torch

from olmo2_kernels import BackendUnavailableError

from . import harness
from .impls import BASELINE, IMPLS, Impl
from .specs import SPECS, Case, input_bytes

PASSES = ("fwd", "fwdbwd")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class _RunnerCache:
    """One runner per (implementation, shape) within a case: a compiled
    baseline used for numerics and timing on the same shape compiles once."""

    def __init__(self) -> None:
        self._runners: dict = {}

    def get(self, impl: Impl, spec, dims: dict):
        key = (impl.name, tuple(sorted(dims.items())))
        if key not in self._runners:
            self._runners[key] = impl.build(spec, dims)
        return self._runners[key]


def _failure(impl: Impl, exc: BaseException, what: str) -> tuple[str, str]:
    if _oom(exc):
        return "skipped", f"{what}: out of memory"
    if impl.failure_is_skip or isinstance(exc, BackendUnavailableError):
        return "skipped", f"{what}: {_short(exc)}"
    return "error", f"{what}: {_short(exc)}"


def run_case(
    case: Case,
    impls: list[Impl],
    device: torch.device,
    dtype: torch.dtype,
    *,
    quick: bool,
    seed: int,
    timing: harness.TimingConfig,
    ceilings: dict,
    log: Callable[[str], None] = print,
    numerics_cache: dict | None = None,
) -> list[dict]:
    spec = SPECS[case.op]
    dims = case.d
    rows = {impl.name: _new_row(case, spec, impl, dims, dtype) for impl in impls}
    active = []
    for impl in impls:
        reason = impl.unavailable(case.op, device, dtype, quick)
        if reason:
            rows[impl.name].update(status="skipped", reason=reason)
        else:
            active.append(impl)
    runners = _RunnerCache()

    # 1. numerics (cases whose numerics shape is the same, e.g. the cross-entropy
    # sizes shortened to one row count, share one measurement per implementation)
    ndims = spec.numerics_dims(dims)
    nkey = (case.op, tuple(sorted(ndims.items())))
    cache = numerics_cache if numerics_cache is not None else {}
    pending = []
    for impl in active:
        hit = cache.get(nkey + (impl.name,))
        if hit is None:
            pending.append(impl)
        else:
            rows[impl.name].update(hit)
    ref = None
    if pending:
        try:
            ref = harness.reference_results(spec, ndims, dtype, device, seed)
        except Exception as exc:  # noqa: BLE001
            why = "float64 reference: out of memory" if _oom(exc) else f"float64 reference failed: {_short(exc)}"
            for impl in pending:
                rows[impl.name]["numerics_error"] = why
    if ref is not None:
        for impl in pending:
            try:
                runner = runners.get(impl, spec, ndims)
                rows[impl.name]["numerics"] = harness.measure_errors(spec, runner, ndims, dtype, device, seed, ref)
            except Exception as exc:  # noqa: BLE001
                status, reason = _failure(impl, exc, "numerics")
                if status == "error":
                    rows[impl.name]["numerics_error"] = reason
                    rows[impl.name]["traceback"] = traceback.format_exc(limit=6)
                else:
                    rows[impl.name].update(status=status, reason=reason)
            keep = ("numerics", "numerics_error", "traceback", "status", "reason")
            cache[nkey + (impl.name,)] = {k: rows[impl.name][k] for k in keep if k in rows[impl.name]}
            _free(device)
    active = [impl for impl in active if rows[impl.name]["status"] == "ok"]
    del ref
    _free(device)

    # 2. timing
    try:
        sets, upstream = make_input_sets(spec, dims, dtype, device, seed)
    except Exception as exc:  # noqa: BLE001
        if not _oom(exc):
            raise
        for impl in active:
            rows[impl.name].update(status="skipped", reason="inputs do not fit in memory")
        active = []
        sets, upstream = [], []
    for impl in active:
        row = rows[impl.name]
        try:
            runner = runners.get(impl, spec, dims)
        except Exception as exc:  # noqa: BLE001
            row["status"], row["reason"] = _failure(impl, exc, "build")
            continue
        for pass_ in PASSES:
            try:
                row[pass_] = _time_pass(spec, impl, runner, pass_, sets, upstream, device, timing)
            except Exception as exc:  # noqa: BLE001
                status, reason = _failure(impl, exc, pass_)
                row[pass_] = {"status": "skipped" if status == "skipped" else "error", "reason": reason}
                if status == "error":
                    row["traceback"] = traceback.format_exc(limit=6)
            _free(device)
        if all(row.get(p, {}).get("status") != "ok" for p in PASSES):
            reasons = "; ".join(row[p]["reason"] for p in PASSES)
            row["status"] = "error" if any(row[p]["status"] == "error" for p in PASSES) else "skipped"
            row["reason"] = reasons
        elif row.get("numerics_error", "").startswith("numerics:"):
            row["status"] = "error"
            row["reason"] = row["numerics_error"]
    del sets, upstream
    runners = None
    _free(device)

    # 3. derived columns
    base = rows.get(BASELINE)
    for row in rows.values():
        _derive(row, spec, dims, dtype, ceilings, base)
    return list(rows.values())


def _new_row(case: Case, spec, impl: Impl, dims: dict, dtype: torch.dtype) -> dict:
    return {
        "op": case.op,
        "preset": case.preset,
        "case": case.label,
        "dims": dict(dims),
        "size": spec.size(dims),
        "impl": impl.name,
        "baseline": impl.baseline,
        "dtype": str(dtype).replace("torch.", ""),
        "metric": spec.metric,
        "status": "ok",
        "reason": None,
        "numerics": None,
    }


def make_input_sets(spec, dims, dtype, device, seed):
    """Rotating copies of a case's inputs (gradient leaves marked) and their
    upstream gradients; the first copy has exactly the numerics inputs."""
    first = spec.make_inputs(dims, dtype, device, seed)
    count = harness.rotation_count(input_bytes(first), device)
    sets = [first] + [spec.make_inputs(dims, dtype, device, seed + 1000 * i) for i in range(1, count)]
    for s in sets:
        for name in spec.grad_inputs:
            s[name].requires_grad_(True)
    upstream = [spec.make_upstream(dims, dtype, device, seed + 1000 * i) for i in range(count)]
    return sets, upstream


def _time_pass(spec, impl: Impl, runner, pass_: str, sets, upstream, device, timing) -> dict:
    # Each entry carries its set's index so the step finds its upstream gradients.
    entries = list(enumerate(sets))
    mutated = impl.mutates.get(spec.name, ()) if isinstance(impl.mutates, dict) else ()
    pristine = {i: {n: s[n].detach().clone() for n in mutated} for i, s in entries} if mutated else {}

    def prepare(entry) -> None:
        i, inputs = entry
        for name in spec.grad_inputs:
            inputs[name].grad = None
        for name, saved in pristine.get(i, {}).items():
            with torch.no_grad():
                inputs[name].copy_(saved)

    if pass_ == "fwd":
        def step(entry):
            runner(entry[1])
    else:
        def step(entry):
            i, inputs = entry
            harness.backward(spec, runner(inputs), upstream[i])

    t = harness.time_calls(step, entries, device, timing, prepare=prepare)
    prepare(entries[0])
    peak, why = harness.peak_memory(lambda: step(entries[0]), device)
    prepare(entries[0])
    out = {"status": "ok", **t.as_dict(), "peak_mem_bytes": peak}
    if why:
        out["peak_mem_note"] = why
    return out


def _derive(row: dict, spec, dims: dict, dtype, ceilings: dict, base: dict | None) -> None:
    row["bytes"] = {p: spec.bytes(dims, dtype, backward=(p == "fwdbwd")) for p in PASSES}
    flops = {p: spec.flops(dims, backward=(p == "fwdbwd")) for p in PASSES}
    row["flops"] = flops if any(v for v in flops.values()) else None
    row["speedup"], row["GBps"], row["TFLOPs"], row["frac_of_ceiling"] = {}, {}, {}, {}
    for p in PASSES:
        timing = row.get(p)
        if not timing or timing.get("status") != "ok":
            continue
        seconds = timing["median_ms"] * 1e-3
        row["GBps"][p] = row["bytes"][p] / seconds / 1e9
        if row["flops"]:
            row["TFLOPs"][p] = row["flops"][p] / seconds / 1e12
        if spec.metric == "flops" and row["flops"] and ceilings.get("matmul_TFLOPs"):
            row["frac_of_ceiling"][p] = row["TFLOPs"][p] / ceilings["matmul_TFLOPs"]
        elif spec.metric == "bandwidth" and ceilings.get("copy_GBps"):
            row["frac_of_ceiling"][p] = row["GBps"][p] / ceilings["copy_GBps"]
        btiming = (base or {}).get(p)
        if btiming and btiming.get("status") == "ok":
            row["speedup"][p] = btiming["median_ms"] / timing["median_ms"]


def run(
    cases: list[Case],
    impl_names: list[str],
    device: torch.device,
    dtype: torch.dtype,
    *,
    quick: bool,
    seed: int,
    timing: harness.TimingConfig,
    ceilings: dict,
    log: Callable[[str], None] = print,
) -> Iterator[list[dict]]:
    """Yield the rows of each case in turn."""
    impls = [IMPLS[n] for n in impl_names]
    numerics_cache: dict = {}
    for case in cases:
        log(f"[bench] {case.key} ...")
        yield run_case(case, impls, device, dtype, quick=quick, seed=seed, timing=timing, ceilings=ceilings,
                       log=log, numerics_cache=numerics_cache)
