"""``olmo2-plot``: a run's loss, gradient norm (with the OLMo 2 spike scores)
and in-loop downstream metrics over the steps, from its ``metrics.jsonl``
(see :mod:`olmo2.train.run_plot`).

    olmo2-plot runs/olmo2-tiny                 # writes runs/olmo2-tiny/curves.png
    olmo2-plot runs/olmo2-tiny --out loss.png --window 1000 --sigma 7
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..train.run_plot import plot_run
from ..train.spike_score import SIGMA, WINDOW
from . import errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="olmo2-plot",
        description="Plot a training run: loss and gradient norm with their spike scores (the share of steps at "
                    "least SIGMA standard deviations from the rolling mean of the last WINDOW), and each in-loop "
                    "downstream task's metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", help="run folder of olmo2-train (holds metrics.jsonl)")
    parser.add_argument("--out", "-o", default=None, help="PNG file (default: <run>/curves.png)")
    parser.add_argument("--window", type=int, default=WINDOW, help="rolling window of the spike score")
    parser.add_argument("--sigma", type=float, default=SIGMA, help="standard deviations that make a spike")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also OLMO2_DEBUG=1)")
    args = parser.parse_args(argv)
    if args.window < 2:
        parser.error(f"--window must be >= 2, got {args.window}")
    if not args.sigma > 0:
        parser.error(f"--sigma must be > 0, got {args.sigma}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("olmo2-plot: needs matplotlib: pip install 'olmo2-kernels[eval]' (or pip install matplotlib)",
              file=sys.stderr)
        return 2
    return errors.run("olmo2-plot", lambda: _plot(args), ["--debug"] if args.debug else [])


def _plot(args: argparse.Namespace) -> int:
    path, summary = plot_run(args.run, args.out, args.window, args.sigma)
    for key in ("loss", "grad_norm"):
        spikes = summary["spikes"][key]
        print(f"spike score {key}: {summary['spike_score'][key]:.3f}% ({summary['spike_score_source'][key]}; "
              f"{len(spikes)} spike step(s){': ' + ', '.join(map(str, spikes[:10])) if spikes else ''})")
    for task, metrics in summary["downstream"].items():
        steps, values = metrics.get("primary", next(iter(metrics.values())))
        print(f"{task}: primary {values[-1]:.4f} at step {steps[-1]} ({len(steps)} evaluations)")
    print(f"olmo2-plot: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
