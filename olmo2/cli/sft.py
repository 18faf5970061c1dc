"""``olmo2-sft``: Tülu 3 supervised finetuning of an OLMo 2 HF folder on messages JSONL (see :mod:`olmo2.sft`).

    olmo2-sft --model BASE_HF --data chat.jsonl --output SFT_HF [--preset olmo2_7b] [key=value ...] [--dry-run]
    torchrun --nproc_per_node=8 -m olmo2.cli.sft --model ... strategy=fsdp   # FSDP2 (the default with N > 1) or ddp

Keys are :class:`olmo2.sft.SFTConfig`'s fields; resolution (later wins): the
defaults, ``--preset``, then ``key=value`` overrides (OmegaConf dotlist).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Sequence

from . import errors

PROG = "olmo2-sft"


def resolve(args: argparse.Namespace, config_class=None, presets=None):
    """The config of ``args``: defaults, ``--preset``, --model/--data/--output, then key=value overrides."""
    from omegaconf import OmegaConf

    if config_class is None:
        from ..sft import PRESETS as presets, SFTConfig as config_class
    PRESETS = presets
    base = OmegaConf.structured(config_class)
    layers = [base]
    if args.preset:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
        layers.append(OmegaConf.create(PRESETS[args.preset]))
    layers.append(OmegaConf.create({k: v for k, v in (("model", args.model), ("data", args.data),
                                                       ("output", args.output)) if v}))
    layers.append(OmegaConf.from_dotlist([o.lstrip("-") for o in args.overrides]))
    merged = OmegaConf.merge(*layers)
    cfg = config_class(**OmegaConf.to_container(merged))
    for name in ("model", "data", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    return cfg


@contextlib.contextmanager
def process_group():
    """Leave the process group that the run joined (``torchrun``) when it ends; one
    that was already up (a test's spawned workers) is left to its owner."""
    import torch.distributed as dist

    owned = not (dist.is_available() and dist.is_initialized())
    try:
        yield
    finally:
        if owned:
            from ..train.parallel import destroy_distributed

            destroy_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="HF folder of the base model")
    p.add_argument("--data", help="messages JSONL ({\"messages\": [...]} per line)")
    p.add_argument("--output", help="HF folder to write (with tokenizer.json and the chat template)")
    p.add_argument("--preset", help="Tülu 3 hyperparameters for OLMo 2: olmo2_7b, olmo2_13b")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("overrides", nargs="*", help="key=value overrides of SFTConfig fields")
    args = p.parse_args(argv)

    def body() -> int:
        import dataclasses
        import json

        from ..sft import train_sft

        cfg = resolve(args)
        if args.dry_run:
            print(json.dumps(dataclasses.asdict(cfg), indent=1))
            return 0
        with process_group():
            result = train_sft(cfg)
        losses = result["losses"] or [None]  # empty when a finished run is rerun
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({"steps": result["steps"], "first_loss": losses[0], "last_loss": losses[-1],
                              "bad_records": result["bad_records"], "output": cfg.output}))
        return 0

    return errors.run(PROG, body, ["--debug"] if args.debug else [], errors.expected_errors())


if __name__ == "__main__":
    raise SystemExit(main())
