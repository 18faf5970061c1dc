"""``olmo2-dpo``: Tülu 3 length-normalized DPO of an OLMo 2 HF folder on preference JSONL (see :mod:`olmo2.dpo`).

    olmo2-dpo --model SFT_HF --data prefs.jsonl --output DPO_HF [--preset olmo2_7b] [key=value ...] [--dry-run]
    torchrun --nproc_per_node=8 -m olmo2.cli.dpo --model ... strategy=fsdp   # FSDP2 (the default with N > 1) or ddp

Keys are :class:`olmo2.dpo.DPOConfig`'s fields (loss_type=dpo_norm|dpo|simpo,
beta, lr, ...); resolution as for ``olmo2-sft``.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from . import errors
from .sft import process_group, resolve

PROG = "olmo2-dpo"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="HF folder of the SFT model (the policy's start and the reference)")
    p.add_argument("--data", help="preference JSONL (prompt / chosen / rejected message lists per line)")
    p.add_argument("--output", help="HF folder to write (with tokenizer.json and the chat template)")
    p.add_argument("--preset", help="Tülu 3 DPO hyperparameters: tulu3_8b, olmo2_7b")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("overrides", nargs="*", help="key=value overrides of DPOConfig fields")
    args = p.parse_args(argv)

    def body() -> int:
        import dataclasses
        import json

        from ..dpo import PRESETS, DPOConfig, train_dpo

        cfg = resolve(args, DPOConfig, PRESETS)
        if args.dry_run:
            print(json.dumps(dataclasses.asdict(cfg), indent=1))
            return 0
        with process_group():
            result = train_dpo(cfg)
        h = result["history"] or [None]  # empty when a finished run is rerun
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({"steps": result["steps"], "first": h[0], "last": h[-1],
                              "bad_records": result["bad_records"], "output": cfg.output}))
        return 0

    return errors.run(PROG, body, ["--debug"] if args.debug else [], errors.expected_errors())


if __name__ == "__main__":
    raise SystemExit(main())
