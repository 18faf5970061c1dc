"""Results on disk and on the console: the run's environment (device,
versions, commit, date), JSON writing and reading, and the printed tables."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]  # benchmarks/report.py -> the checkout
COMMIT_ENV = "OLMO2_BENCH_GIT_COMMIT"


# --------------------------------------------------------------------------- environment
def _run_git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """The commit the benchmarked code came from.

    ``OLMO2_BENCH_GIT_COMMIT`` wins (for copies of the tree without ``.git``);
    else ``git rev-parse HEAD`` of this checkout, with ``dirty`` when tracked
    files differ from it.
    """
    env = os.environ.get(COMMIT_ENV, "").strip()
    if env:
        return {"commit": env, "dirty": None, "source": COMMIT_ENV}
    commit = _run_git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "source": "no git checkout (set OLMO2_BENCH_GIT_COMMIT)"}
    status = _run_git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "source": "git"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import olmo2_kernels

    isa = olmo2_kernels.backend_info()["extension"]["capabilities"].get("cpu_isa")
    kernels = f", {isa} kernels" if isa else ""
    return f"CPU: {_cpu_name()} ({torch.get_num_threads()} threads{kernels})"


def device_slug(device: torch.device) -> str:
    """A folder name for the device: ``NVIDIA-H100-80GB-HBM3``, ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in device_name(device)).strip("-")


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device) -> dict:
    import olmo2_kernels

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    info = olmo2_kernels.backend_info()
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "olmo2_kernels": olmo2_kernels.__version__,
        "liger_kernel": _version("liger-kernel"),
        "transformers": _version("transformers"),
        "git": git_state(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extension": info["extension"],
        "triton_interpret": info["triton_interpret"],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["memory_bytes"] = props.total_memory
        env["capability"] = f"{props.major}.{props.minor}"
    return env


# --------------------------------------------------------------------------- JSON
def _clean(value):
    """JSON has no NaN or infinity: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


def write_json(path: Path, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema {doc.get('schema')!r}, this reader understands {SCHEMA_VERSION}")
    return doc


# --------------------------------------------------------------------------- tables
def _num(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else "inf"
    return f"{x:.{digits}g}"


def _err(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if not math.isfinite(x):
        return "NaN" if math.isnan(x) else "inf"
    return f"{x:.1e}"


def _ms(t: dict | None) -> str:
    if not t or t.get("status") != "ok":
        return "-" if not t else t["status"]
    return f"{_num(t['median_ms'], 4)} ({_num(t['q20_ms'], 3)}-{_num(t['q80_ms'], 3)})"


def _mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def _rate(row: dict, p: str) -> str:
    if row["metric"] == "flops":
        value, unit = row.get("TFLOPs", {}).get(p), "TFLOP/s"
    else:
        value, unit = row.get("GBps", {}).get(p), "GB/s"
    if value is None:
        return "-"
    frac = row.get("frac_of_ceiling", {}).get(p)
    return f"{value:.3g} {unit}" + (f" {100 * frac:.0f}%" if frac is not None else "")


def _grid(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


KERNEL_HEADER = [
    "op", "shape", "impl", "err out", "err grad", "fwd ms (q20-q80)", "fwd+bwd ms (q20-q80)",
    "x eager f/fb", "fwd rate %SOL", "fwd+bwd rate %SOL", "MiB f/fb",
]


def kernel_lines(rows: list[dict]) -> tuple[list[list[str]], list[str]]:
    """Table lines for measured rows, and the notes: why anything was not
    measured (one line per implementation and reason, naming the ops)."""
    lines, notes = [], []
    skipped: dict = {}
    for row in rows:
        if row["status"] != "ok":
            skipped.setdefault((row["impl"], row["status"], row["reason"]), []).append(row["op"])
            continue
        num = row.get("numerics") or {}
        speed = row.get("speedup", {})
        err_out = _err(num.get("max_rel_outputs")) if num else ("n/a" if row.get("numerics_error") else "-")
        err_grad = _err(num.get("max_rel_grads")) if num else err_out
        mem = f"{_mib((row.get('fwd') or {}).get('peak_mem_bytes'))}/{_mib((row.get('fwdbwd') or {}).get('peak_mem_bytes'))}"
        lines.append([
            row["op"], row["case"], row["impl"], err_out, err_grad,
            _ms(row.get("fwd")), _ms(row.get("fwdbwd")),
            f"{_num(speed.get('fwd'), 3)}/{_num(speed.get('fwdbwd'), 3)}",
            _rate(row, "fwd"), _rate(row, "fwdbwd"), mem,
        ])
        for p in ("fwd", "fwdbwd"):
            t = row.get(p) or {}
            if t.get("status") not in (None, "ok"):
                notes.append(f"{row['impl']} {row['op']} {row['case']} {p}: {t['status']}: {t['reason']}")
        if row.get("numerics_error"):
            notes.append(f"{row['impl']} {row['op']} {row['case']}: errors n/a: {row['numerics_error']}")
        if num and num.get("dims") != row["dims"]:
            nd = " ".join(f"{k}={v}" for k, v in num["dims"].items())
            note = f"{row['op']} {row['case']}: errors measured on {nd} (float64 reference size limit)"
            if note not in notes:
                notes.append(note)
    for (impl, status, reason), ops in skipped.items():
        ops = list(dict.fromkeys(ops))
        notes.append(f"{impl} {status} ({', '.join(ops)}): {reason}")
    return lines, notes


def format_kernel_table(doc: dict) -> str:
    env = doc["env"]
    ceil = doc.get("ceilings") or {}
    head = [
        f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | dtype {doc['config']['dtype']}"
        f" | commit {(env['git'].get('commit') or 'unknown')[:12]}{'+dirty' if env['git'].get('dirty') else ''}"
        f" | {env['date']}",
    ]
    if ceil:
        head.append(
            f"ceilings (measured): copy {ceil.get('copy_GBps', float('nan')):.0f} GB/s, "
            f"{ceil.get('matmul_dtype')} matmul {ceil.get('matmul_TFLOPs', float('nan')):.4g} TFLOP/s"
        )
    head.append(
        "err = max relative error vs the float64 spec (outputs / input gradients); times: median (20%-80%) ms; "
        "x eager = speedup over the torch row; rate = minimum bytes (or matmul FLOPs) / median time, "
        "%SOL = share of the measured ceiling; MiB = peak memory above the inputs, fwd/fwd+bwd"
    )
    lines, notes = kernel_lines(doc["rows"])
    parts = ["\n".join(head), _grid(KERNEL_HEADER, lines)]
    if notes:
        parts.append("notes (skips, errors, reduced numerics):\n" + "\n".join(f"  {n}" for n in notes))
    return "\n\n".join(parts)


MODEL_HEADER = ["model", "impl", "tokens/s", "step ms (q20-q80)", "MFU", "CE loss (step 1)", "peak GiB", "note"]


def format_model_table(doc: dict) -> str:
    env = doc["env"]
    cfg = doc["config"]
    head = (
        f"device: {env['device']} | torch {env['torch']} | commit {(env['git'].get('commit') or 'unknown')[:12]}"
        f" | {env['date']}\nmodel {cfg['preset']}: batch {cfg['batch_size']} x seq {cfg['seq_len']}, "
        f"{cfg['dtype']}, attention {cfg.get('attn_backend', 'sdpa')}, forward+backward per step; "
        f"MFU against {doc.get('peak_flops_source', 'n/a')}"
    )
    lines = []
    for r in doc["rows"]:
        if r["status"] != "ok":
            lines.append([cfg["preset"], r["impl"], "-", "-", "-", "-", "-", f"{r['status']}: {r['reason']}"])
            continue
        t = r["step"]
        lines.append([
            cfg["preset"], r["impl"], f"{r['tokens_per_s']:.0f}",
            f"{_num(t['median_ms'], 4)} ({_num(t['q20_ms'], 3)}-{_num(t['q80_ms'], 3)})",
            "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
            _num(r.get("ce_loss"), 6),
            "-" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**30:.2f}",
            r.get("note") or "",
        ])
    return head + "\n\n" + _grid(MODEL_HEADER, lines)
