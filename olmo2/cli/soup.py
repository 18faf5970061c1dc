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
    args = parser.parse_args(argv)
    try:
        out = soup(args.checkpoints, args.out, DTYPES[args.dtype] if args.dtype else None, args.tokenizer)
    except (FileNotFoundError, ValueError) as exc:
        print(f"olmo2-soup: {exc}", file=sys.stderr)
        return 2
    print(f"olmo2-soup: averaged {len(args.checkpoints)} checkpoints into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
