"""``olmo2-dpo``: Tülu 3 length-normalized DPO of an OLMo 2 HF folder on preference JSONL (see :mod:`olmo2.dpo`).

    olmo2-dpo --model SFT_HF --data prefs.jsonl --output DPO_HF [--preset olmo2_7b] [key=value ...] [--dry-run]
    torchrun --nproc_per_node=8 -m olmo2.cli.dpo --model ... strategy=fsdp   # FSDP2 (the default with N > 1) or ddp

Keys are :class:`olmo2.dpo.DPOConfig`'s fields (loss_type=dpo_norm|dpo|simpo,
beta, lr, ...); resolution as for ``olmo2-sft`` (``--config configs/dpo-olmo2-7b.yaml``,
``--preset``, ``key=value``; ``--dry-run`` prints the YAML saved beside each checkpoint).
"""
from __future__ import annotations

import os
from typing import Sequence

from . import errors
from .sft import dump, parse, parser, process_group, resolve

PROG = "olmo2-dpo"


def main(argv: Sequence[str] | None = None) -> int:
    from ..dpo import DPOConfig

    p = parser(PROG, __doc__, DPOConfig, {
        "model": "HF folder of the SFT model (the policy's start and the reference)",
        "data": "preference JSONL (prompt / chosen / rejected message lists per line)",
        "output": "HF folder to write (with tokenizer.json and the chat template)"},
        "Tülu 3 DPO hyperparameters: olmo2_7b, olmo2_13b, tulu3_8b (also as configs/dpo-olmo2-*.yaml)")
    args = parse(p, argv)

    def body() -> int:
        import json

        from ..dpo import PRESETS, train_dpo

        cfg = resolve(args, DPOConfig, PRESETS)
        if args.dry_run:
            print(dump(cfg), end="")
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
