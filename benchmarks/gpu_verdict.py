#!/usr/bin/env python3
"""The correctness verdict of a first GPU run: every op on the kernel backends
against the float64 spec, one line per (op, backend, dtype, shape).

    python benchmarks/gpu_verdict.py                        # GPU: backends triton,cuda; bf16 and fp32
    python benchmarks/gpu_verdict.py --backends triton --jobs 5 --json v.json
    python benchmarks/gpu_verdict.py --device cpu --size tiny --backends triton,cpu   # CPU smoke run

For each case the op runs forward and backward on the benchmark's inputs and
upstream gradients (:mod:`benchmarks.specs`: the same values, the
same call convention as ``olmo2-bench``), and every output and every input
gradient is compared with the spec (:mod:`olmo2_kernels.reference`) evaluated
in float64 on the same input values, with the one tolerance table,
``tests/tolerances.py`` (weight gradients and summed losses widen atol with
the reduction length, as the tests do). A case passes when every tensor is
finite and within ``atol + rtol * |expected|`` everywhere; the line shows the
worst tensor as a multiple of its tolerance (``0.31x tol``) and its max
absolute error.

Shapes (``--size gpu``, from the model presets of :mod:`olmo2.config`): OLMo 2
training widths with 4096 tokens (1B, 7B; the 32B's 40/8 heads for GQA),
odd ones (rows 1, 7, 199; widths 200, 2049, 5003), and a strided copy of an
odd one whose rows sit in NaN-filled wider buffers (a read past a row's end
gives NaN, so it fails). ``linear_cross_entropy`` at full vocabulary runs
with 256 (1B) and 128 (7B) tokens: its float64 reference is a float64 matmul
of 6*N*H*V FLOPs. ``--size tiny`` keeps only small odd shapes (for a CPU
machine, where Triton runs under its interpreter).

Exit status: 0 when every case that ran passed, 1 when any failed or raised,
2 when nothing ran at all (every backend unavailable), 3 when ``--deadline``
stopped it first.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a file, this script has its own folder first on sys.path: the benchmarks
# package, whose kernels.py, model.py and report.py would shadow top-level modules
# of those names (transformers probes for a ``kernels`` package). Import from the
# repository root instead, which also finds olmo2_kernels when it is not installed.
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)
OPS = ("rms_norm", "qk_norm_rope", "swiglu", "cross_entropy", "linear_cross_entropy")
DTYPE_NAMES = ("bf16", "fp32")
STRIDE_PAD = 64  # extra (NaN) elements at the end of each row of a strided input: keeps 16-byte alignment


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--backends", default=None,
                   help="comma-separated, among torch, triton, cuda, cpu (default: triton,cuda on cuda; "
                        "triton,cpu on cpu, Triton under its interpreter)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated among {', '.join(OPS)} (default: all)")
    p.add_argument("--dtypes", default=",".join(DTYPE_NAMES), help="comma-separated among bf16, fp32")
    p.add_argument("--size", choices=("gpu", "tiny"), default=None,
                   help="gpu: training widths + odd shapes; tiny: small odd shapes (default: gpu on cuda)")
    p.add_argument("--jobs", type=int, default=1,
                   help="share the ops among this many processes running at once (each compiles its own "
                        "Triton kernels; default 1)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds: stop what is still running then, print the summary, exit 3")
    p.add_argument("--json", type=Path, default=None, help="write every case's result here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)  # worker processes
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad or not args.ops:
        p.error(f"--ops must be a comma-separated subset of {', '.join(OPS)}; got {','.join(args.ops) or '(none)'}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or any(d not in DTYPE_NAMES for d in args.dtypes):
        p.error(f"--dtypes must be a comma-separated subset of {', '.join(DTYPE_NAMES)}; got {args.dtypes}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


# --------------------------------------------------------------------------- shapes
def cases(op: str, size: str) -> list[tuple[str, dict, bool]]:
    """(label, dims, strided) for ``op``: dims in the op's benchmark spec's names."""
    from benchmarks.specs import layout

    tokens = 4096
    odd_rows, odd_widths = (1, 7, 199), (200, 2049, 5003)
    if size == "tiny":
        odd_rows, odd_widths = (1, 7), (200, 2049)
    l1, l7 = layout("olmo2-1b"), layout("olmo2-7b")
    out: list[tuple[str, dict, bool]] = []
    if op in ("rms_norm", "swiglu"):
        width = "d_model" if op == "rms_norm" else "mlp_hidden"
        if size == "gpu":
            out += [(lay.name, {"rows": tokens, "width": getattr(lay, width)}, False) for lay in (l1, l7)]
        out += [("odd", {"rows": r, "width": w}, False) for r, w in zip(odd_rows, odd_widths)]
        out.append(("odd", {"rows": odd_rows[-1], "width": odd_widths[1]}, True))
    elif op == "qk_norm_rope":
        def qk(batch, seq, hq, hk, d):
            return {"batch": batch, "seq": seq, "q_heads": hq, "kv_heads": hk, "head_dim": d}

        if size == "gpu":
            l32 = layout("olmo2-32b")
            out += [(lay.name, qk(1, tokens, lay.n_heads, lay.n_kv_heads, lay.head_dim), False) for lay in (l1, l7)]
            out.append((l32.name, qk(1, tokens // 2, l32.n_heads, l32.n_kv_heads, l32.head_dim), False))
            out += [("odd", qk(1, 1, 1, 1, 128), False), ("odd", qk(1, 7, 3, 1, 64), False),
                    ("odd", qk(2, 199, 6, 2, 128), False), ("odd", qk(2, 199, 6, 2, 128), True)]
        else:
            out += [("odd", qk(1, 1, 1, 1, 64), False), ("odd", qk(1, 7, 3, 1, 64), False),
                    ("odd", qk(2, 7, 3, 1, 64), True)]
    elif op == "cross_entropy":
        if size == "gpu":
            out.append((l1.name, {"tokens": tokens, "vocab": l1.vocab}, False))
        widths = odd_widths if size == "gpu" else (200, 5003)
        out += [("odd", {"tokens": r, "vocab": w}, False) for r, w in zip(odd_rows, widths)]
        out.append(("odd", {"tokens": odd_rows[-1], "vocab": widths[-1]}, True))
    elif op == "linear_cross_entropy":
        if size == "gpu":
            out += [(l1.name, {"tokens": 256, "hidden": l1.d_model, "vocab": l1.vocab}, False),
                    (l7.name, {"tokens": 128, "hidden": l7.d_model, "vocab": l7.vocab}, False)]
            odd = [(1, 64, 200), (7, 200, 2049), (199, 256, 5003)]
        else:
            odd = [(1, 64, 200), (7, 64, 2049)]
        out += [("odd", {"tokens": n, "hidden": h, "vocab": v}, False) for n, h, v in odd]
        n, h, v = odd[-1]
        out.append(("odd", {"tokens": n, "hidden": h, "vocab": v}, True))
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return out


# --------------------------------------------------------------------------- tolerances
def tolerance_rule(op: str, name: str, dims: dict, dtype):
    """(dtype whose tolerance applies, reduction length) for one compared tensor
    (an output's name, or "d" + an input's name), as the op's tests choose them."""
    import torch

    if op == "rms_norm" and name == "dweight":
        return dtype, dims["rows"]
    if op == "qk_norm_rope" and name in ("dq_weight", "dk_weight"):
        return dtype, dims["batch"] * dims["seq"]
    if op == "cross_entropy" and name in ("ce", "z", "loss"):
        # losses are computed in fp32 from the exact logits, as the spec does
        return torch.float32, dims["tokens"]
    if op == "linear_cross_entropy" and name in ("ce", "z", "loss", "dweight"):
        # the logits are rounded once to the input dtype before the row kernels
        return dtype, dims["tokens"]
    return dtype, 1


def compare(actual, expected, tol: dict) -> dict:
    """Max |a - e| and the worst ratio |a - e| / (atol + rtol |e|) (inf when
    anything is not finite; <= 1 passes)."""
    import torch

    a = actual.detach().to(device=expected.device, dtype=torch.float64)
    e = expected.detach().to(torch.float64)
    if tuple(a.shape) != tuple(e.shape):
        return {"ratio": math.inf, "max_abs": math.inf, "note": f"shape {tuple(a.shape)} != {tuple(e.shape)}"}
    if a.numel() == 0:
        return {"ratio": 0.0, "max_abs": 0.0}
    if not bool(torch.isfinite(a).all()):
        return {"ratio": math.inf, "max_abs": math.inf, "note": "non-finite values"}
    diff = (a - e).abs()
    ratio = float((diff / (tol["atol"] + tol["rtol"] * e.abs())).max())
    return {"ratio": ratio, "max_abs": float(diff.max())}


def nan_padded(t):
    """The same values in a wider NaN-filled buffer: row stride > width."""
    import torch

    buf = torch.full((*t.shape[:-1], t.shape[-1] + STRIDE_PAD), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[..., : t.shape[-1]]
    view.copy_(t)
    return view


# --------------------------------------------------------------------------- running
def _fmt_dims(dims: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in dims.items())


def _line(rec: dict) -> str:
    shape = f"{rec['label']} {_fmt_dims(rec['dims'])}{' strided' if rec['strided'] else ''}"
    head = f"{rec['status']:<5} {rec['op']:<20} {rec['backend']:<6} {rec['dtype']:<4} {shape:<60}"
    if rec["status"] in ("PASS", "FAIL"):
        w = rec["worst"]
        return f"{head} worst {w['name']} {w['ratio']:.3g}x tol (max abs {w['max_abs']:.2e}) {rec['seconds']:.1f}s"
    return f"{head} {rec.get('reason', '')}"


def run_op(op: str, args, device, emit, deadline: float | None = None) -> bool:
    """Run ``op``'s cases, passing each result to ``emit``; False when the
    deadline (``time.monotonic()``) stopped it early."""
    import torch

    import olmo2_kernels
    from benchmarks import harness
    from benchmarks.specs import SPECS

    sys.path.insert(0, str(ROOT / "tests"))
    from tolerances import tolerance  # the one tolerance table

    spec = SPECS[op]
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for dname in args.dtypes:
        dtype = dtypes[dname]
        for label, dims, strided in cases(op, args.size):
            if deadline is not None and time.monotonic() > deadline:
                return False
            ref = None
            for backend in args.backends:
                rec = {"op": op, "backend": backend, "dtype": dname, "label": label, "dims": dims,
                       "strided": strided, "status": "SKIP"}
                reason = olmo2_kernels.backend_unavailable_reason(backend, device, op)
                if reason:
                    rec["reason"] = reason
                    emit(rec)
                    continue
                start = time.perf_counter()
                try:
                    if ref is None:
                        ref = harness.reference_results(spec, dims, dtype, device, args.seed)
                    inputs = spec.make_inputs(dims, dtype, device, args.seed)
                    for name in spec.grad_inputs:
                        t = inputs[name]
                        if strided and t.dim() >= 2:
                            t = nan_padded(t)
                        inputs[name] = t.detach().requires_grad_(True)
                    upstream = spec.make_upstream(dims, dtype, device, args.seed)
                    with olmo2_kernels.use_backend(backend):
                        outputs = spec.call(getattr(olmo2_kernels, op), inputs)
                        harness.backward(spec, outputs, upstream)
                    # outputs by name, input gradients as "d" + the input's name
                    got = {name: outputs[name] for name in ref["outputs"] if name in outputs}
                    got.update({"d" + name: inputs[name].grad for name in ref["grads"]})
                    expected = {**ref["outputs"], **{"d" + k: v for k, v in ref["grads"].items()}}
                    tensors = {}
                    for name, exp in expected.items():
                        tol_dtype, reduction = tolerance_rule(op, name, dims, dtype)
                        tol = tolerance(tol_dtype, reduction=reduction)
                        if got.get(name) is None:
                            tensors[name] = {"ratio": math.inf, "max_abs": math.inf, "note": "missing"}
                        else:
                            tensors[name] = compare(got[name], exp, tol)
                        tensors[name].update(atol=tol["atol"], rtol=tol["rtol"], reduction=reduction)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    worst_name = max(tensors, key=lambda n: tensors[n]["ratio"])
                    rec["tensors"] = tensors
                    rec["worst"] = {"name": worst_name, **tensors[worst_name]}
                    rec["status"] = "PASS" if all(v["ratio"] <= 1.0 for v in tensors.values()) else "FAIL"
                except Exception as exc:  # noqa: BLE001
                    rec["status"] = "ERROR"
                    first = (str(exc).strip().splitlines() or [""])[0]
                    rec["reason"] = f"{type(exc).__name__}: {first}"[:300]
                    rec["traceback"] = traceback.format_exc(limit=8)
                rec["seconds"] = time.perf_counter() - start
                emit(rec)
                inputs = outputs = upstream = got = expected = None
                if device.type == "cuda":
                    try:
                        torch.cuda.empty_cache()
                    except Exception:  # noqa: BLE001 - an earlier kernel broke the CUDA context
                        return False  # the rest of this op reported unfinished, not as a crash
            ref = None
    return True


def summary(records: list[dict], unfinished: list[str]) -> tuple[str, int]:
    lines = ["", "== verdict: op x backend (pass/ran; fail, error, skip)"]
    keys = sorted({(r["op"], r["backend"]) for r in records}, key=lambda k: (OPS.index(k[0]), k[1]))
    for op, backend in keys:
        rs = [r for r in records if r["op"] == op and r["backend"] == backend]
        n = {s: sum(r["status"] == s for r in rs) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
        ran = n["PASS"] + n["FAIL"] + n["ERROR"]
        worst = max((r["worst"]["ratio"] for r in rs if "worst" in r), default=None)
        text = f"{op:<20} {backend:<6} {n['PASS']}/{ran} pass"
        if n["FAIL"] or n["ERROR"]:
            text += f", {n['FAIL']} FAIL, {n['ERROR']} ERROR"
        if worst is not None:
            text += f"; worst {worst:.3g}x tol"
        if n["SKIP"]:
            reasons = sorted({r["reason"] for r in rs if r["status"] == "SKIP"})
            text += f"; {n['SKIP']} skipped ({'; '.join(reasons)})"
        lines.append(text)
    bad = [r for r in records if r["status"] in ("FAIL", "ERROR")]
    ran = [r for r in records if r["status"] != "SKIP"]
    for op in unfinished:
        lines.append(f"{op:<20} TIMEOUT: stopped at the deadline before it finished")
    if bad:
        lines.append(f"VERDICT: FAIL ({len(bad)} of {len(ran)} cases)")
        code = 1
    elif unfinished:
        lines.append(f"VERDICT: INCOMPLETE ({len(ran)} cases passed; {', '.join(unfinished)} not finished)")
        code = 3
    elif not ran:
        lines.append("VERDICT: NOTHING RAN (every backend unavailable: see the skip reasons)")
        code = 2
    else:
        lines.append(f"VERDICT: PASS ({len(ran)} cases)")
        code = 0
    return "\n".join(lines), code


def _header(device, backends) -> str:
    import torch
    import triton

    import olmo2_kernels

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    text = (f"[verdict] {name} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}"
            f" | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    for b in backends:
        reason = olmo2_kernels.backend_unavailable_reason(b, device)
        text += f"\n[verdict] backend {b}: {'available' if reason is None else 'unavailable: ' + reason}"
    return text


def _write_json(path: Path | None, records: list[dict], extra: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**extra, "cases": records}, indent=1, default=str))
    tmp.replace(path)


def _run_parallel(args, argv: list[str]) -> tuple[list[dict], list[str]]:
    """The ops shared round-robin among ``args.jobs`` worker processes, each
    printing its lines as cases finish; their JSON files are merged here. At
    the deadline the workers still running are stopped and their unfinished
    ops reported."""
    deadline = None if args.deadline is None else time.monotonic() + args.deadline
    tmp = Path(tempfile.mkdtemp(prefix="olmo2-verdict-"))
    groups = [args.ops[i::args.jobs] for i in range(min(args.jobs, len(args.ops)))]
    procs = []
    for i, ops in enumerate(groups):
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--ops", ",".join(ops), "--jobs", "1",
               "--json", str(tmp / f"worker{i}.json"), "--no-summary"]
        procs.append(subprocess.Popen(cmd))
    while any(p.poll() is None for p in procs):
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.2)
    records: list[dict] = []
    for i in range(len(groups)):
        f = tmp / f"worker{i}.json"
        if f.exists():
            records += json.loads(f.read_text())["cases"]
    # an op is finished when every (dtype, shape, backend) of it has a result
    per_case = len(args.dtypes) * len(args.backends)
    unfinished = [op for op in args.ops
                  if sum(r["op"] == op for r in records) < per_case * len(cases(op, args.size))]
    records.sort(key=lambda r: OPS.index(r["op"]))
    return records, unfinished


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch  # after parsing: --help needs no torch

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("[verdict] --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    if args.backends is None:
        args.backends = "triton,cuda" if device_type == "cuda" else "triton,cpu"
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or any(b not in ("torch", "triton", "cuda", "cpu") for b in args.backends):
        print(f"[verdict] --backends must be among torch, triton, cuda, cpu; got {args.backends}", file=sys.stderr)
        return 2
    args.size = args.size or ("gpu" if device_type == "cuda" else "tiny")
    if device_type == "cpu" and "triton" in args.backends:
        # Triton runs CPU tensors only under its interpreter, read at import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import olmo2_kernels  # noqa: F401  (after TRITON_INTERPRET)

    device = torch.device(device_type)
    if not args.no_summary:
        print(_header(device, args.backends), flush=True)
    start = time.perf_counter()
    extra = {"device": torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu",
             "torch": torch.__version__, "backends": args.backends, "dtypes": args.dtypes, "size": args.size}
    if args.jobs > 1 and len(args.ops) > 1:
        # Workers get the resolved options; --json/--jobs/--deadline are the parent's.
        child_argv = ["--device", device_type, "--backends", ",".join(args.backends), "--dtypes",
                      ",".join(args.dtypes), "--size", args.size, "--seed", str(args.seed)]
        records, unfinished = _run_parallel(args, child_argv)
    else:
        records = []
        unfinished = []

        def emit(rec):
            records.append(rec)
            print(_line(rec), flush=True)
            _write_json(args.json, records, extra)  # after every case: a killed run keeps what it checked

        deadline = None if args.deadline is None else time.monotonic() + args.deadline
        for op in args.ops:
            if not run_op(op, args, device, emit, deadline):
                unfinished.append(op)
    extra["wall_s"] = time.perf_counter() - start
    _write_json(args.json, records, extra)
    if args.no_summary:
        return 1 if any(r["status"] in ("FAIL", "ERROR") for r in records) else 0
    text, code = summary(records, unfinished)
    print(text)
    print(f"[verdict] {len(records)} cases in {extra['wall_s']:.0f} s" + (f"; JSON: {args.json}" if args.json else ""))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
