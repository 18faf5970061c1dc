"""``olmo2-generate``: continue a prompt with a Hugging Face checkpoint folder
that holds ``tokenizer.json`` (see :func:`olmo2.generation.generate`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Sequence

import torch

import olmo2_kernels

from ..checkpoint_hf import load_pretrained
from ..dtypes import DTYPES
from ..generation import generate

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="olmo2-generate",
        description="Continue a prompt with an OLMo 2 checkpoint folder (Hugging Face layout plus tokenizer.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint folder: config.json, *.safetensors, tokenizer.json")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--backend", default=None, choices=["auto", *olmo2_kernels.BACKENDS],
                   help="olmo2_kernels backend (None: OLMO2_KERNELS_BACKEND or auto)")
    p.add_argument("--attn-backend", default=None, choices=["sdpa", "eager", "flash_attn"],
                   help="attention implementation (None: the checkpoint config's, sdpa)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model):
        parser.error(f"--model: {args.model} is not a folder")
    tokenizer_path = os.path.join(args.model, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        parser.error(f"--model: {args.model} has no tokenizer.json")
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        parser.error("--prompt encodes to no tokens")
    try:
        model = load_pretrained(args.model, dtype=dtype, device=device, attn_backend=args.attn_backend)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"olmo2-generate: {exc}", file=sys.stderr)
        return 2
    model.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    backend = olmo2_kernels.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    with backend:
        out = generate(
            model,
            torch.tensor([ids], device=device),
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            generator=generator,
        )
    continuation = out[0, len(ids):].tolist()
    sys.stdout.write(tokenizer.decode(continuation, skip_special_tokens=True) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
