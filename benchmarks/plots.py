"""PNG plots of benchmark results (matplotlib, optional).

Kernels: per op, forward+backward time and achieved rate (GB/s, or TFLOP/s
for linear_cross_entropy, with the measured ceiling dashed) per
implementation across the op's shapes; for the cross-entropy family, peak
memory against the number of tokens. Model: tokens/s per implementation.
"""
from __future__ import annotations

from pathlib import Path

PASS_LABEL = {"fwd": "forward", "fwdbwd": "forward+backward"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(doc: dict, out: Path, name: str = "model") -> tuple[list[Path], str | None]:
    """Write the plots of ``doc`` under ``out``; returns (paths, why none were written).

    Kernel plots are named by op; the model plot ``<name>.png``."""
    try:
        plt = _pyplot()
    except ImportError:
        return [], "matplotlib is not installed (pip install matplotlib)"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if doc["kind"] == "kernels":
        return _kernel_plots(doc, out, plt), None
    return _model_plots(doc, out, plt, name), None


def _title(doc: dict) -> str:
    env = doc["env"]
    commit = (env["git"].get("commit") or "unknown")[:10]
    return f"{env['device']} | torch {env['torch']} | {doc['config']['dtype']} | {commit} | {env['date'][:10]}"


def _measured(rows: list[dict], p: str) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and (r.get(p) or {}).get("status") == "ok"]


def _kernel_plots(doc: dict, out: Path, plt) -> list[Path]:
    written = []
    ceilings = doc.get("ceilings") or {}
    ops = list(dict.fromkeys(r["op"] for r in doc["rows"]))
    for op in ops:
        rows = [r for r in doc["rows"] if r["op"] == op]
        cases = sorted({(r["size"], r["case"]) for r in rows})
        labels = [c[1] for c in cases]
        index = {c[1]: i for i, c in enumerate(cases)}
        impls = list(dict.fromkeys(r["impl"] for r in _measured(rows, "fwdbwd")))
        if not impls:
            continue
        flops = rows[0]["metric"] == "flops"
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        for impl in impls:
            mine = sorted((r for r in _measured(rows, "fwdbwd") if r["impl"] == impl), key=lambda r: index[r["case"]])
            xs = [index[r["case"]] for r in mine]
            med = [r["fwdbwd"]["median_ms"] for r in mine]
            lo = [r["fwdbwd"]["median_ms"] - r["fwdbwd"]["q20_ms"] for r in mine]
            hi = [r["fwdbwd"]["q80_ms"] - r["fwdbwd"]["median_ms"] for r in mine]
            axes[0].errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=impl)
            rate = [(r["TFLOPs"] if flops else r["GBps"]).get("fwdbwd") for r in mine]
            axes[1].plot(xs, rate, marker="o", label=impl)
        ceiling = ceilings.get("matmul_TFLOPs") if flops else ceilings.get("copy_GBps")
        if ceiling:
            axes[1].axhline(ceiling, linestyle="--", color="gray",
                            label=f"measured {'matmul' if flops else 'copy'} ceiling")
        axes[1].set_ylim(bottom=0)
        axes[0].set_ylabel("forward+backward median ms (bars: 20%-80%)")
        axes[0].set_yscale("log")
        axes[1].set_ylabel("forward+backward " + ("TFLOP/s (6NHV / time)" if flops else "GB/s (minimum bytes / time)"))
        for ax in axes:
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{op}\n{_title(doc)}", fontsize=9)
        fig.tight_layout()
        path = out / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        if op in ("cross_entropy", "linear_cross_entropy"):
            path = _memory_plot(doc, op, rows, out, plt)
            if path:
                written.append(path)
    return written


def _memory_plot(doc: dict, op: str, rows: list[dict], out: Path, plt) -> Path | None:
    series: dict = {}
    for r in _measured(rows, "fwdbwd"):
        peak = r["fwdbwd"].get("peak_mem_bytes")
        if peak is None:
            continue
        label = r["impl"] + (f" H={r['dims']['hidden']}" if "hidden" in r["dims"] else "")
        series.setdefault(label, []).append((r["dims"]["tokens"], peak / 2**30))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens N")
    ax.set_ylabel("peak memory above inputs, forward+backward (GiB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{op} memory\n{_title(doc)}", fontsize=9)
    fig.tight_layout()
    path = out / f"{op}_memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _model_plots(doc: dict, out: Path, plt, name: str) -> list[Path]:
    rows = [r for r in doc["rows"] if r["status"] == "ok"]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r["impl"] for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    bars = ax.bar(names, values)
    for bar, r in zip(bars, rows):
        mfu = r.get("mfu")
        if mfu is not None:
            ax.annotate(f"{100 * mfu:.1f}% MFU", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    cfg = doc["config"]
    ax.set_ylabel("tokens/s (forward+backward)")
    ax.set_title(f"OLMo 2 {cfg['preset']}, batch {cfg['batch_size']} x {cfg['seq_len']}\n{_title(doc)}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
