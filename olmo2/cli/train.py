"""``olmo2-train``: parse the config, build the trainer, run it.

    olmo2-train                                  # the tiny default on the built-in corpus (CPU, minutes)
    olmo2-train --config configs/x.yaml --optim.lr=1e-3 --dry-run
    torchrun --nproc_per_node=8 -m olmo2.train --preset=olmo2-1b --data.sources='[{paths: [data/*.npy]}]'

Expected errors (a bad config value, a refused resume) print one line on
stderr and exit 2.
"""
from __future__ import annotations

import os
import sys

from ..config import flops_per_token, num_parameters
from ..train.config import ConfigError, TrainConfig, parse_args
from ..train.parallel import destroy_distributed, init_distributed
from ..train.trainer import Trainer


def describe(cfg: TrainConfig, world_size: int) -> str:
    """The resolved config and what it implies, for ``--dry-run``."""
    n = num_parameters(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    lines = [
        cfg.to_yaml().rstrip(),
        "# ---- derived",
        f"# parameters: {n:,} ({n / 1e9:.3f}B)",
        f"# training FLOPs per token: {fpt:.4g}",
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
    except ConfigError as exc:
        print(f"olmo2-train: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
