"""``olmo2-train``: parse the config, build the trainer, run it.

    olmo2-train                                  # the tiny default on the built-in corpus (CPU, minutes)
    olmo2-train --config configs/x.yaml --optim.lr=1e-3 --dry-run
    torchrun --nproc_per_node=8 -m olmo2.train --preset=olmo2-1b --data.sources='[{paths: [data/*.npy]}]'
    olmo2-train --config configs/olmo2-13b-stage1.yaml --plan --nodes 8 --gpus-per-node 8 --gpu h100

Expected errors (a bad config value, a refused resume, a damaged checkpoint, a
locked run folder, a full disk, an unavailable device or backend) print one
line on stderr, ``olmo2-train: <what> (<path>)``, and exit 2; ``--debug`` or
``OLMO2_DEBUG=1`` adds the traceback. SIGINT/SIGTERM finish the step, save a
checkpoint and exit 130/143 (128 + the signal); a second signal stops at once,
with the same code. Exit codes: 0 done, 2 error, 130 SIGINT, 143 SIGTERM.
``--plan`` prints the per-GPU memory and expected speed of the resolved config
(:mod:`olmo2.train.planner`) and exits 0 without training.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from ..config import FLOPS_CONVENTION, flops_per_token, num_parameters
from ..train import checkpoint as ckpt
from ..train.config import PRESETS, ConfigError, TrainConfig, options_help, resolve
from ..train.parallel import destroy_distributed, init_distributed, runtime_problem
from ..train.signals import GracefulStop, StopNow, TrainingStopped, exit_code, signal_name
from ..train.trainer import Trainer
from . import errors

PROG = "olmo2-train"
USAGE = ("olmo2-train [--config FILE] [--key=value ...] [--dry-run] [--debug] [-h]\n"
         "       olmo2-train [--config FILE] [--key=value ...] --plan [--nodes N] [--gpus-per-node G] [--gpu KIND]")
DESCRIPTION = (
    "Train OLMo 2. The config is the dataclass defaults (the tiny demo run), then the preset "
    f"(--preset=NAME: {', '.join(PRESETS)}), then the YAML file (--config), then --key=value overrides "
    "(dotted keys for sections: --optim.lr=1e-3), merged by OmegaConf."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="olmo2-train", usage=USAGE, add_help=False, allow_abbrev=False)
    p.add_argument("--config", default=None, metavar="FILE", help="YAML file merged over the preset")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="check the config, device and kernel backend, print the resolved config, then exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also OLMO2_DEBUG=1)")
    p.add_argument("--plan", action="store_true",
                   help="print the per-GPU memory and the expected speed of the run (olmo2.train.planner), then exit")
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="with --plan: nodes of the job (default 1)")
    p.add_argument("--gpus-per-node", "--gpus_per_node", dest="gpus_per_node", type=int, default=None, metavar="G",
                   help="with --plan: GPUs (ranks) per node (default 8; 1 with --gpu=cpu)")
    p.add_argument("--gpu", default="h100", metavar="KIND", help="with --plan: h100, h200, a100 or cpu (default h100)")
    p.add_argument("--mfu", type=float, default=None, metavar="F",
                   help="with --plan: the model FLOP utilization assumed for the speed (default 0.40)")
    p.add_argument("-h", "--help", action="store_true", help="show this listing and exit")
    return p


def help_text(cfg: TrainConfig | None = None) -> str:
    """The ``--help`` listing: the options, then every config key with its value and doc."""
    rows = options_help(cfg)
    width = min(max(len(f"--{k}={v}") for k, v, _ in rows) + 2, 48)
    lines = [f"usage: {USAGE}", "", *textwrap.wrap(DESCRIPTION, 100), "", "options:"]
    for action in _parser()._actions:
        names = ", ".join(action.option_strings) + (f" {action.metavar}" if action.metavar else "")
        lines.append(f"  {names:<{width}}{action.help}")
    lines += ["", "config keys (--key=value; the value shown is the default, or the one --preset/--config give):"]
    for key, value, doc in rows:
        option = f"--{key}={value}"
        pad = width if len(option) < width else len(option) + 2
        lines.append(f"  {option:<{pad}}{doc}".rstrip())
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """``[--config FILE] [--key=value ...] [--dry-run] [--debug]`` -> (config, dry_run)."""
    args, overrides = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    return resolve(args.config, overrides), args.dry_run


def check_runtime(cfg: TrainConfig) -> None:
    """Refuse a device or kernel backend this machine does not have (ConfigError)."""
    problem = runtime_problem(cfg.device, cfg.kernel_backend)
    if problem is not None:
        raise ConfigError(problem)


def describe(cfg: TrainConfig, world_size: int) -> str:
    """The resolved config and what it implies, for ``--dry-run``."""
    n = num_parameters(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    lines = [
        cfg.to_yaml().rstrip(),
        "# ---- derived",
        f"# parameters: {n:,} ({n / 1e9:.3f}B)",
        f"# training FLOPs per token: {fpt:.4g} ({FLOPS_CONVENTION})",
        f"# global batch: {cfg.global_batch_instances} instances x {cfg.data.seq_len} = {cfg.global_batch_tokens:,} tokens",
        f"# micro-batch per rank: {cfg.micro_batch_instances} instances; gradient accumulation x"
        f"{cfg.grad_accum_steps(world_size)} at {world_size} rank(s)",
        f"# total: {cfg.max_steps:,} steps = {cfg.max_steps * cfg.global_batch_tokens:,} tokens",
        f"# schedule: {cfg.schedule.name}, warmup {cfg.schedule.warmup_steps} steps, decay horizon "
        f"{cfg.decay_steps} steps to {cfg.schedule.final_lr_ratio} x peak",
        f"# run folder: {cfg.run_dir}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _parser().parse_known_args(argv)[0].help:
        try:
            cfg, _ = parse_args([a for a in argv if a not in ("-h", "--help")])
        except ConfigError:
            cfg = None  # the listing still shows the defaults
        print(help_text(cfg))
        return 0
    return errors.run(PROG, lambda: _train(argv), argv, errors.expected_errors())


def _plan(argv: list[str]) -> int:
    """``--plan``: the planner's table for the config on ``--nodes`` x ``--gpus-per-node`` ``--gpu``."""
    from ..train.planner import DEFAULT_MFU, plan_text

    args, overrides = _parser().parse_known_args(argv)
    cfg = resolve(args.config, overrides)
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (1 if args.gpu == "cpu" else 8)
    print(plan_text(cfg, nodes=args.nodes, gpus_per_node=gpus, gpu=args.gpu,
                    mfu=DEFAULT_MFU if args.mfu is None else args.mfu))
    return 0


def _train(argv: list[str]) -> int:
    if _parser().parse_known_args(argv)[0].plan:
        return _plan(argv)
    cfg, dry_run = parse_args(argv)
    check_runtime(cfg)
    if dry_run:
        print(describe(cfg, int(os.environ.get("WORLD_SIZE", "1"))))
        return 0
    with GracefulStop(prog=PROG) as stop:
        try:
            dist_info = init_distributed(cfg.device)
            summary = Trainer(cfg, dist_info).fit(stop=stop)
            if dist_info.is_main:
                # A rerun of a finished run resumes at its last step and runs none: no loss to report.
                loss = (f"loss {summary['last_loss']}" if summary["last_loss"] is not None
                        else "no step left to run (the checkpoint is at the last step)")
                print(f"{PROG}: done at step {summary['step']}, {loss}, run folder {summary['run_dir']}")
        except TrainingStopped as exc:
            print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
            return exit_code(exc.signum)
        except StopNow as exc:
            found = ckpt.list_checkpoints(os.path.join(cfg.run_dir, "checkpoints"))
            newest = f"the newest checkpoint is {found[-1][1]}" if found else "there is no checkpoint"
            print(f"{PROG}: stopped at once by a second {signal_name(exc.signum)}; nothing more was saved, "
                  f"{newest} ({cfg.run_dir})", file=sys.stderr, flush=True)
            return exit_code(exc.signum)
        finally:
            destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
