"""``olmo2-tokenize``: text or JSONL files to an OLMo token file (see
:func:`olmo2.tokenize.tokenize_files`)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..tokenize import MAX_COUNT, MAX_PERIOD, MIN_PERIOD, tokenize_files
from ..train.data import TOKEN_DTYPES


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="olmo2-tokenize",
        description="Tokenize text/JSONL files into an OLMo token file (headerless uint32 ids, EOS per document).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="text files, JSONL files (.jsonl[.gz]) or folders")
    parser.add_argument("--out", "-o", required=True, help="output token file (e.g. data/train.npy)")
    parser.add_argument("--tokenizer", default="byte", help="'byte' (built in) or a tokenizer.json path/folder")
    parser.add_argument("--dtype", default="uint32", choices=tuple(TOKEN_DTYPES), help="token id type of the output")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--doc-per-line", action="store_true", help="text files: one document per non-empty line")
    parser.add_argument("--eos-token", default=None, help="EOS token string (None: <|endoftext|>)")
    parser.add_argument("--eos-id", type=int, default=None, help="EOS id, overriding --eos-token")
    parser.add_argument("--ngram-filter", action="store_true",
                        help="drop documents with a repeated n-gram (period 1..13 repeated >= 32 times)")
    parser.add_argument("--min-period", type=int, default=MIN_PERIOD, help="n-gram filter: shortest period")
    parser.add_argument("--max-period", type=int, default=MAX_PERIOD, help="n-gram filter: longest period")
    parser.add_argument("--max-count", type=int, default=MAX_COUNT, help="n-gram filter: repeats that drop a document")
    parser.add_argument("--batch-size", type=int, default=256, help="documents per tokenizer call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        stats = tokenize_files(
            args.inputs, args.out, tokenizer=args.tokenizer, dtype=args.dtype, text_field=args.text_field,
            doc_per_line=args.doc_per_line, ngram_filter=args.ngram_filter, min_period=args.min_period,
            max_period=args.max_period, max_count=args.max_count, eos_token=args.eos_token, eos_id=args.eos_id,
            batch_size=args.batch_size, progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"olmo2-tokenize: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {stats.tokens} tokens from {stats.documents - stats.dropped} documents"
          + (f" ({stats.dropped} dropped by the n-gram filter)" if args.ngram_filter else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
