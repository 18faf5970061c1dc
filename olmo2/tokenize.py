"""Text or JSONL files to an OLMo token file, and the repeated n-gram filter
(the ``olmo2-tokenize`` command is :mod:`olmo2.cli.tokenize`).

Input: ``.txt``/``.md``/``.py``/... files (each file one document, or each line
with ``--doc-per-line``), ``.jsonl`` files (one JSON object per line, the text
in ``--text-field``, default ``text``), gzip-compressed versions of both
(``.gz``), and folders (every file inside, recursively, in sorted order).
Output: a headerless flat array of token ids (``uint32`` by default), EOS
after each document, written to a temporary file and renamed, plus a
``<out>.json`` sidecar with counts and the tokenizer used.

Tokenizer: any Hugging Face ``tokenizer.json`` (``--tokenizer path``) or the
built-in byte tokenizer (``--tokenizer byte``). Note that a ``tokenizer.json``
matches its special tokens inside text (``<|endoftext|>`` in a document becomes
the EOS id), as the ``tokenizers`` library does; the byte tokenizer never does.

``--ngram-filter`` drops every document in which a span of period 1..13 tokens
repeats 32 or more times consecutively (OLMo-core's instance filter defaults);
see :func:`find_repeated_ngram`.
"""
from __future__ import annotations

import gzip
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from .byte_tokenizer import EOS_TOKEN, ByteTokenizer
from .files import atomic_write
from .train.data import TOKEN_DTYPES

MIN_PERIOD = 1
MAX_PERIOD = 13
MAX_COUNT = 32


# ---------------------------------------------------------------------- n-gram filter
class Repetition(NamedTuple):
    """A span ``tokens[start:end]`` that is a block of ``period`` tokens repeated ``times`` times
    (``end - start = times * period`` plus a partial block of fewer than ``period`` tokens)."""

    start: int
    end: int
    period: int
    times: int


def find_repeated_ngram(tokens: Sequence[int] | np.ndarray, min_period: int = MIN_PERIOD,
                        max_period: int = MAX_PERIOD, max_count: int = MAX_COUNT) -> Repetition | None:
    """The first span (smallest period, then leftmost) in which a block of
    ``min_period..max_period`` tokens repeats at least ``max_count`` times in a
    row, or None.

    A span of period ``p`` repeated ``n`` times is a run where
    ``tokens[i] == tokens[i + p]`` holds for ``(n - 1) * p`` consecutive ``i``;
    a run of length ``R`` repeats ``floor((R + p) / p)`` times (OLMo's count,
    a trailing partial block not counted). Found exactly for every alignment,
    in ``O(len * max_period)`` vectorized work.
    """
    for name, value in (("min_period", min_period), ("max_period", max_period), ("max_count", max_count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"find_repeated_ngram: {name} must be a positive int, got {value!r}")
    if max_count < 2:
        raise ValueError(f"find_repeated_ngram: max_count must be >= 2, got {max_count}")
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"find_repeated_ngram: tokens must be 1-D, got shape {arr.shape}")
    n = len(arr)
    for period in range(min_period, max_period + 1):
        need = (max_count - 1) * period  # consecutive matches at this period
        if n - period < need:
            break  # longer periods need even more tokens
        same = arr[period:] == arr[:-period]
        # Run lengths of True in `same`.
        padded = np.concatenate(([False], same, [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        starts, ends = edges[0::2], edges[1::2]
        lengths = ends - starts
        hits = np.flatnonzero(lengths >= need)
        if len(hits):
            i = hits[0]
            start, run = int(starts[i]), int(lengths[i])
            return Repetition(start=start, end=start + run + period, period=period, times=(run + period) // period)
    return None


def has_repeated_ngram(tokens: Sequence[int] | np.ndarray, min_period: int = MIN_PERIOD,
                       max_period: int = MAX_PERIOD, max_count: int = MAX_COUNT) -> bool:
    """Whether the n-gram filter drops ``tokens`` (see :func:`find_repeated_ngram`)."""
    return find_repeated_ngram(tokens, min_period, max_period, max_count) is not None


# ---------------------------------------------------------------------- tokenizers
def load_tokenizer(spec: str, eos_token: str | None = None):
    """``(encode_batch, eos_id, vocab_size, name)`` for ``"byte"`` or a ``tokenizer.json`` path.

    ``eos_token`` defaults to ``<|endoftext|>``; a tokenizer without it needs
    ``--eos-token`` (a token string) or ``--eos-id``.
    """
    if spec == "byte":
        tok = ByteTokenizer()
        eos = tok.eos_token_id if eos_token in (None, EOS_TOKEN) else tok.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"--eos-token {eos_token!r} is not a token of the byte tokenizer")
        return (lambda texts: [tok.encode_array(t) for t in texts]), eos, tok.vocab_size, "byte"
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer: expected 'byte' or a tokenizer.json file, got {spec!r} (not found)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    name = eos_token or EOS_TOKEN
    eos = tok.token_to_id(name)
    if eos is None:
        raise ValueError(f"--tokenizer {path}: has no token {name!r}; name the EOS with --eos-token or --eos-id")

    def encode_batch(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(texts, add_special_tokens=False)]

    return encode_batch, eos, tok.get_vocab_size(with_added_tokens=True), str(path)


# ---------------------------------------------------------------------- documents
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith(JSONL_SUFFIXES)


def input_files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {item!r} is neither a file nor a folder")
    if not files:
        raise ValueError(f"inputs {list(inputs)} contain no files")
    return files


def iter_documents(files: Iterable[Path], text_field: str = "text", doc_per_line: bool = False) -> Iterator[str]:
    """Documents of ``files``: one per JSONL line (``text_field``), else one per file or per non-empty line."""
    for path in files:
        if _is_jsonl(path):
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
                    yield record[text_field]
        else:
            with _open_text(path) as f:
                if doc_per_line:
                    for line in f:
                        line = line.rstrip("\n")
                        if line.strip():
                            yield line
                else:
                    text = f.read()
                    if text:
                        yield text


@dataclass
class TokenizeStats:
    documents: int = 0
    dropped: int = 0
    tokens: int = 0


def tokenize_files(inputs: Sequence[str], out: str, tokenizer: str = "byte", dtype: str = "uint32",
                   text_field: str = "text", doc_per_line: bool = False, ngram_filter: bool = False,
                   min_period: int = MIN_PERIOD, max_period: int = MAX_PERIOD, max_count: int = MAX_COUNT,
                   eos_token: str | None = None, eos_id: int | None = None, batch_size: int = 256,
                   progress: bool = True) -> TokenizeStats:
    """Tokenize ``inputs`` into the token file ``out`` (see the module docstring)."""
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(TOKEN_DTYPES)}, got {dtype!r}")
    encode_batch, eos, vocab_size, tok_name = load_tokenizer(tokenizer, eos_token)
    if eos_id is not None:
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"--eos-id must be in [0, {vocab_size}), got {eos_id}")
        eos = eos_id
    np_dtype = TOKEN_DTYPES[dtype]
    if vocab_size > np.iinfo(np_dtype).max + 1:
        raise ValueError(f"--dtype {dtype} cannot hold the ids of a {vocab_size}-entry vocabulary; use uint32")
    files = input_files(inputs)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats = TokenizeStats()
    eos_arr = np.array([eos], dtype=np_dtype)

    from tqdm import tqdm

    bar = tqdm(total=len(files), unit="file", desc="tokenize", disable=not progress, file=sys.stderr)
    try:
        with atomic_write(out_path, "wb") as f:
            def flush(batch: list[str]) -> None:
                for ids in encode_batch(batch):
                    stats.documents += 1
                    if ngram_filter and has_repeated_ngram(ids, min_period, max_period, max_count):
                        stats.dropped += 1
                        continue
                    np.asarray(ids, dtype=np_dtype).tofile(f)
                    eos_arr.tofile(f)
                    stats.tokens += len(ids) + 1

            batch: list[str] = []
            for path in files:
                for doc in iter_documents([path], text_field, doc_per_line):
                    batch.append(doc)
                    if len(batch) >= batch_size:
                        flush(batch)
                        batch = []
                bar.update(1)
                bar.set_postfix(docs=stats.documents, dropped=stats.dropped, tokens=stats.tokens, refresh=False)
            if batch:
                flush(batch)
        meta = {
            "tokenizer": tok_name,
            "eos_token_id": int(eos),
            "vocab_size": int(vocab_size),
            "dtype": dtype,
            "documents": stats.documents,
            "dropped_by_ngram_filter": stats.dropped,
            "tokens": stats.tokens,
            "ngram_filter": {"min_period": min_period, "max_period": max_period, "max_count": max_count}
            if ngram_filter else None,
            "inputs": [str(p) for p in files],
        }
        with atomic_write(out_path.with_name(out_path.name + ".json")) as f:
            json.dump(meta, f, indent=2)
    finally:
        bar.close()
    return stats
