"""``olmo2-generate``: continue a prompt with a model (see :func:`olmo2.generation.generate`).

``--model`` is a Hugging Face folder holding ``tokenizer.json``, a run folder
(its ``hf/`` export, else its newest trainer checkpoint that verifies) or a
trainer checkpoint folder (the tokenizer travels in it). A model with no
``tokenizer.json`` and an OLMo 2 vocabulary gets OLMo 2's dolma2 tokenizer."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

import olmo2_kernels

from ..checkpoint_hf import CONFIG_NAME, load_pretrained
from ..dtypes import DTYPES
from ..generation import generate
from ..tokenizers import DOLMA2, load_tokenizer
from . import errors

PROG = "olmo2-generate"
TOKENIZER = "tokenizer.json"


def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _dolma2_fits(vocab_size: int) -> bool:
    """Whether a model without a tokenizer.json has an OLMo 2 vocabulary (dolma2's 100,278 ids, or more)."""
    return vocab_size >= DOLMA2.vocab_size


def resolve_model(path: str) -> tuple[str, str, str]:
    """``(kind, folder, tokenizer)`` of ``--model``: kind ``"hf"`` (a Hugging
    Face folder, or a run's ``hf/``) or ``"trainer"`` (a trainer checkpoint, or a
    run or ``checkpoints`` folder holding some); tokenizer its ``tokenizer.json``,
    else ``"dolma2"`` (OLMo 2's, shipped) when the model has an OLMo 2 vocabulary."""
    from ..train.checkpoint import TOKENIZER_FILE, resolve_checkpoint

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {path} is not a folder ({path})")
    for hf in (folder, folder / "hf"):
        if (hf / CONFIG_NAME).is_file():
            tokenizer = hf / TOKENIZER
            if not tokenizer.is_file() and _dolma2_fits(json.loads((hf / CONFIG_NAME).read_text())["vocab_size"]):
                return "hf", str(hf), "dolma2"  # an OLMo 2 vocabulary: OLMo 2's own tokenizer
            if not tokenizer.is_file():
                raise FileNotFoundError(f"--model {path} has no {TOKENIZER} beside its weights (train with "
                                        f"data.tokenizer set, or copy the tokenizer there) ({tokenizer})")
            return "hf", str(hf), str(tokenizer)
    try:
        checkpoint = resolve_checkpoint(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"--model {path} holds no model: expected {CONFIG_NAME} (Hugging Face), an hf/ "
                                f"export or a trainer checkpoint ({path})") from None
    candidates = [checkpoint / TOKENIZER_FILE, folder / TOKENIZER]
    tokenizer = next((c for c in candidates if c.is_file()), None)
    if tokenizer is None:
        from ..train.checkpoint import checkpoint_config

        if _dolma2_fits(checkpoint_config(checkpoint).model.vocab_size):
            return "trainer", str(folder), "dolma2"
        raise FileNotFoundError(f"--model {path}: its checkpoint carries no {TOKENIZER} (trained before the "
                                f"tokenizer travelled with checkpoints, or with no known tokenizer) ({checkpoint})")
    return "trainer", str(folder), str(tokenizer)

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="olmo2-generate",
        description="Continue a prompt with an OLMo 2 checkpoint folder (Hugging Face layout plus tokenizer.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="Hugging Face folder (config.json, *.safetensors, tokenizer.json), run folder or trainer checkpoint")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as one user turn in the Tülu 3 / OLMo 2 Instruct chat template "
                        "(olmo2.chat) and stop at the assistant's EOS")
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
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also OLMO2_DEBUG=1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return errors.run(PROG, lambda: _generate(args), ["--debug"] if args.debug else [],
                      errors.expected_errors())


def _generate(args: argparse.Namespace) -> int:
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but this machine has no usable CUDA device; use --device cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kind, folder, tokenizer_path = resolve_model(args.model)

    if tokenizer_path == "dolma2":
        _say("the checkpoint has no tokenizer.json; using OLMo 2's dolma2 tokenizer (shipped with olmo2)")
    tokenizer = load_tokenizer(tokenizer_path)
    if args.chat:
        from ..chat import encode_chat

        ids, _ = encode_chat(tokenizer, [{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise ValueError(f"--prompt encodes to no tokens ({tokenizer_path})")
    if kind == "hf":
        model = load_pretrained(folder, dtype=dtype, device=device, attn_backend=args.attn_backend)
    else:
        from ..train.checkpoint import load_model_from_checkpoint

        model = load_model_from_checkpoint(folder, device=device, dtype=dtype, log=_say)
        if args.attn_backend is not None:
            model.set_attn_backend(args.attn_backend)
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
    if args.chat:
        eos = tokenizer.token_to_id("<|endoftext|>")
        if eos in continuation:
            continuation = continuation[: continuation.index(eos)]
    sys.stdout.write(tokenizer.decode(continuation, skip_special_tokens=True) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
