"""``olmo2-train``: parse the config, build the trainer, run it.

    olmo2-train                                  # the tiny default on the built-in corpus (CPU, minutes)
    olmo2-train --config configs/x.yaml --optim.lr=1e-3 --dry-run
    torchrun --nproc_per_node=8 -m olmo2.train --preset=olmo2-1b --data.sources='[{paths: [data/*.npy]}]'

Expected errors (a bad config value, a refused resume) print one line on
stderr and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from ..config import FLOPS_CONVENTION, flops_per_token, num_parameters
from ..train.config import PRESETS, ConfigError, TrainConfig, options_help, resolve
from ..train.parallel import destroy_distributed, init_distributed
from ..train.stability import NonFiniteLossError
from ..train.trainer import Trainer

USAGE = "olmo2-train [--config FILE] [--key=value ...] [--dry-run] [-h]"
DESCRIPTION = (
    "Train OLMo 2. The config is the dataclass defaults (the tiny demo run), then the preset "
    f"(--preset=NAME: {', '.join(PRESETS)}), then the YAML file (--config), then --key=value overrides "
    "(dotted keys for sections: --optim.lr=1e-3), merged by OmegaConf."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="olmo2-train", usage=USAGE, add_help=False, allow_abbrev=False)
    p.add_argument("--config", default=None, metavar="FILE", help="YAML file merged over the preset")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the resolved config and what it implies, then exit")
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
    """``[--config FILE] [--key=value ...] [--dry-run]`` -> (config, dry_run)."""
    args, overrides = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    return resolve(args.config, overrides), args.dry_run


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
    try:
        cfg, dry_run = parse_args(argv)
    except ConfigError as exc:
        print(f"olmo2-train: {exc}", file=sys.stderr)
        return 2
    if dry_run:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            print(describe(cfg, world))
        except ConfigError as exc:
            print(f"olmo2-train: {exc}", file=sys.stderr)
            return 2
        return 0
    dist_info = init_distributed(cfg.device)
    try:
        summary = Trainer(cfg, dist_info).fit()
        if dist_info.is_main:
            print(f"olmo2-train: done at step {summary['step']}, loss {summary['last_loss']}, "
                  f"run folder {summary['run_dir']}")
    except (ConfigError, FileNotFoundError, NonFiniteLossError) as exc:
        print(f"olmo2-train: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
