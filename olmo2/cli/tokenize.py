"""``olmo2-tokenize``: text or JSONL files to an OLMo token file (see
:func:`olmo2.tokenize.tokenize_files`)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..tokenize import MAX_COUNT, MAX_PERIOD, MIN_PERIOD, _listing, tokenize_files
from ..train.data import TOKEN_DTYPES
from . import errors

PROG = "olmo2-tokenize"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="olmo2-tokenize",
        description="Tokenize text/JSONL files into an OLMo token file (headerless uint32 ids, EOS per document).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="text files, JSONL files (.jsonl[.gz]) or folders")
    parser.add_argument("--out", "-o", required=True, help="output token file (e.g. data/train.npy)")
    parser.add_argument("--tokenizer", default="dolma2", help="'dolma2' (OLMo 2's, shipped; the default), 'byte' (the demo's byte-level one) or a tokenizer.json path/folder")
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
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip JSONL lines that are not an object with the text field (counted and reported)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also OLMO2_DEBUG=1)")
    args = parser.parse_args(argv)
    return errors.run(PROG, lambda: _tokenize(args), ["--debug"] if args.debug else [])


def _warn(text: str) -> None:
    print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


def _tokenize(args: argparse.Namespace) -> int:
    stats = tokenize_files(
        args.inputs, args.out, tokenizer=args.tokenizer, dtype=args.dtype, text_field=args.text_field,
        doc_per_line=args.doc_per_line, ngram_filter=args.ngram_filter, min_period=args.min_period,
        max_period=args.max_period, max_count=args.max_count, eos_token=args.eos_token, eos_id=args.eos_id,
        batch_size=args.batch_size, progress=not args.no_progress, skip_bad_lines=args.skip_bad_lines,
    )
    if stats.skipped_files:
        _warn(f"skipped {len(stats.skipped_files)} file(s) from the input folders: {_listing(stats.skipped_files)}")
    if stats.empty_files:
        _warn(f"{len(stats.empty_files)} input file(s) held no document: {_listing(stats.empty_files)}")
    if stats.bad_lines:
        _warn(f"skipped {stats.bad_lines} bad JSONL line(s): {stats.bad_line_summary}")
    print(f"{args.out}: {stats.tokens} tokens from {stats.documents - stats.dropped} documents"
          + (f" ({stats.dropped} dropped by the n-gram filter)" if args.ngram_filter else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
