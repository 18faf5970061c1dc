"""``olmo2-sft``: Tülu 3 supervised finetuning of an OLMo 2 HF folder on messages JSONL (see :mod:`olmo2.sft`).

    olmo2-sft --model BASE_HF --data chat.jsonl --output SFT_HF [--preset olmo2_7b] [key=value ...] [--dry-run]
    olmo2-sft --config configs/sft-olmo2-7b.yaml --model BASE_HF --data chat.jsonl --output SFT_HF
    torchrun --nproc_per_node=8 -m olmo2.cli.sft --model ... strategy=fsdp   # FSDP2 (the default with N > 1) or ddp

Keys are :class:`olmo2.sft.SFTConfig`'s fields. Resolution (later wins), by the
resolver every stage uses (:func:`olmo2.train.config.resolve_config`): the
defaults, the preset (``--preset`` or the file's ``preset:``), the YAML file
(``--config``), ``--model/--data/--output``, then ``key=value`` (or
``--key=value``) overrides. ``--dry-run`` prints the resolved config as YAML;
the same YAML is saved beside each checkpoint (``config.yaml``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Sequence

from . import errors

PROG = "olmo2-sft"


def resolve(args: argparse.Namespace, config_class=None, presets=None):
    """The config of ``args`` (``model``, ``data``, ``output``, ``preset``, ``overrides``
    and optionally ``config``) through the one resolver of every stage."""
    from omegaconf import OmegaConf

    from ..train.config import parse_overrides, resolve_config

    if config_class is None:
        from ..sft import PRESETS as presets, SFTConfig as config_class
    paths = {k: v for k, v in (("model", args.model), ("data", args.data), ("output", args.output)) if v}
    given = parse_overrides([o if o.startswith("--") else f"--{o}" for o in args.overrides])
    cfg = resolve_config(config_class, presets, getattr(args, "config", None),
                         OmegaConf.merge(OmegaConf.create(paths), OmegaConf.create(given)), args.preset or None)
    for name in ("model", "data", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required (or {name}: in the --config file)")
    return cfg


def keys_help(config_class) -> str:
    """``key=default  doc`` for every field of ``config_class`` (the comments above or beside the fields)."""
    import dataclasses
    import inspect
    import re

    def walk(cls, prefix: str) -> list[str]:
        docs = {}
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"^ {4}(\w+)\s*:.*?#\s*(.+)$", line)
            if m:
                docs[m.group(1)] = m.group(2).strip()
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):  # a section (eval): its keys, dotted
                rows += walk(type(default), f"{prefix}{f.name}.")
                continue
            rows.append(f"  {f'{prefix}{f.name}={default}':<28} {docs.get(f.name, '')}".rstrip())
        return rows

    return "config keys (key=value; the default shown):\n" + "\n".join(walk(config_class, ""))


def parser(prog: str, doc: str, config_class, what: dict[str, str], preset_help: str) -> argparse.ArgumentParser:
    """The argument parser olmo2-sft and olmo2-dpo share; unknown ``--key=value`` go to the overrides."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc + "\n" + keys_help(config_class))
    for name, text in what.items():
        p.add_argument(f"--{name}", help=text)
    p.add_argument("--config", metavar="FILE", help="YAML file of config keys (e.g. configs/sft-olmo2-7b.yaml)")
    p.add_argument("--preset", help=preset_help)
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the resolved config (YAML) and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config keys below")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args, unknown = p.parse_known_args(argv)
    bad = [u for u in unknown if not (u.startswith("--") and "=" in u)]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*unknown, *args.overrides]
    return args


def dump(cfg) -> str:
    import dataclasses

    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(dataclasses.asdict(cfg))


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
    from ..sft import SFTConfig

    p = parser(PROG, __doc__, SFTConfig, {
        "model": "HF folder of the base model",
        "data": "messages JSONL ({\"messages\": [...]} per line)",
        "output": "HF folder to write (with tokenizer.json and the chat template)"},
        "Tülu 3 hyperparameters for OLMo 2: olmo2_7b, olmo2_13b (also as configs/sft-olmo2-*.yaml)")
    args = parse(p, argv)

    def body() -> int:
        import json

        from ..sft import train_sft

        cfg = resolve(args)
        if args.dry_run:
            print(dump(cfg), end="")
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
