"""``olmo2-soup``: average the weights of several checkpoints into a Hugging
Face checkpoint (see :func:`olmo2.soup.soup`).

    olmo2-soup runs/anneal-a runs/anneal-b runs/anneal-c --out runs/soup
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..dtypes import DTYPES
from ..soup import soup
from . import errors

PROG = "olmo2-soup"


def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="olmo2-soup",
        description="Average the weights of several checkpoints (trainer or Hugging Face) into a Hugging Face checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoints", nargs="+", help="trainer checkpoint/run folders or Hugging Face folders")
    parser.add_argument("--out", "-o", required=True, help="output Hugging Face folder")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="output dtype (None: that of the first checkpoint)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json to copy into the output")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also OLMO2_DEBUG=1)")
    args = parser.parse_args(argv)
    return errors.run(PROG, lambda: _soup(args), ["--debug"] if args.debug else [], errors.expected_errors())


def _soup(args: argparse.Namespace) -> int:
    if len(args.checkpoints) == 1:
        _say(f"warning: only one checkpoint given ({args.checkpoints[0]}): there is nothing to average, the "
             "output is a copy of it in Hugging Face format")
    out = soup(args.checkpoints, args.out, DTYPES[args.dtype] if args.dtype else None, args.tokenizer, log=_say)
    print(f"{PROG}: averaged {len(args.checkpoints)} checkpoints into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
