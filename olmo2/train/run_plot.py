"""A run's curves in one figure: loss, gradient norm with the OLMo 2 spike
scores, and each in-loop downstream task's primary metric over the steps
(the ``olmo2-plot`` command is :mod:`olmo2.cli.plot`).

Everything comes from the run folder's ``metrics.jsonl``. The spike scores of
the loss and of the gradient norm (:mod:`olmo2.train.spike_score`) are those
the trainer logs as ``spike_score/loss`` and ``spike_score/grad_norm`` when
present, else computed here from the ``loss`` and ``grad_norm`` columns with
the same definition (the two agree when the log has every step).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .spike_score import SIGMA, WINDOW, spike_score

DOWNSTREAM = "downstream/"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` (a line cut by a crash is skipped), by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a run folder of olmo2-train?)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    if not records:
        raise ValueError(f"{path}: no step records")
    return sorted(records, key=lambda r: r["step"])


def column(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(int(r["step"]))
            values.append(float(v))
    return steps, values


def summarize(records: list[dict[str, Any]], window: int = WINDOW, sigma: float = SIGMA) -> dict[str, Any]:
    """Spike scores (logged or computed), spike steps, the downstream series and the last values."""
    out: dict[str, Any] = {"steps": len(records), "last_step": records[-1]["step"], "spike_score": {}, "spikes": {},
                           "spike_score_source": {}, "downstream": {}}
    for key in ("loss", "grad_norm"):
        steps, values = column(records, key)
        score, idx = spike_score(values, window, sigma)
        logged = column(records, f"spike_score/{key}")[1]
        if logged and window == WINDOW and sigma == SIGMA:
            out["spike_score"][key], out["spike_score_source"][key] = logged[-1], "logged by the trainer"
        else:
            out["spike_score"][key], out["spike_score_source"][key] = score, "computed from metrics.jsonl"
        out["spikes"][key] = [steps[i] for i in idx]
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = defaultdict(dict)
    for key in sorted({k for r in records for k in r if k.startswith(DOWNSTREAM) and k.count("/") == 2}):
        _, task, metric = key.split("/")
        series[task][metric] = column(records, key)
    out["downstream"] = dict(series)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, window: int = WINDOW,
             sigma: float = SIGMA) -> tuple[Path, dict[str, Any]]:
    """Draw the run's figure (PNG at ``out``, default ``<run_dir>/curves.png``); returns its path and :func:`summarize`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    summary = summarize(records, window, sigma)
    tasks = summary["downstream"]
    # Downstream tasks in two panels: accuracies (the primary metric) and bits per byte.
    acc_tasks = sorted(t for t, m in tasks.items() if "acc_raw" in m)
    bpb_tasks = sorted(t for t, m in tasks.items() if "acc_raw" not in m and "bpb" in m)
    panels = 2 + bool(acc_tasks) + bool(bpb_tasks)
    cols = 2
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    name = Path(run_dir).resolve().name

    for ax, key, label in ((flat[0], "loss", "loss"), (flat[1], "grad_norm", "gradient norm")):
        steps, values = column(records, key)
        ax.plot(steps, values, lw=1, label=f"train {label}")
        if key == "loss":
            e_steps, e_values = column(records, "eval/ce_loss")
            if e_steps:
                ax.plot(e_steps, e_values, "o-", ms=3, lw=1, label="held-out CE")
        spikes = set(summary["spikes"][key])
        if spikes:
            ax.plot([s for s in steps if s in spikes], [v for s, v in zip(steps, values) if s in spikes], "rx",
                    label=f"spikes (>= {sigma:g} std)")
        score = summary["spike_score"][key]
        ax.set_title(f"{label}: spike score {score:.2f}% ({sigma:g} std, last {window})", fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log" if key == "grad_norm" else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    groups = [(acc_tasks, "primary", "downstream accuracy (primary metric; chance is the floor)"),
              (bpb_tasks, "bpb", "downstream bits per byte of the gold answer (lower is better)")]
    ax_iter = iter(flat[2:])
    for group, metric, title in groups:
        if not group:
            continue
        ax = next(ax_iter)
        for task in group:
            steps, values = tasks[task][metric]
            ax.plot(steps, values, "o-", ms=3, lw=1, label=task)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(f"{name}: {summary['steps']} logged steps (last {summary['last_step']})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(out) if out is not None else Path(run_dir) / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, summary
