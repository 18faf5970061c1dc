"""Text or JSONL files to an OLMo token file, and the repeated n-gram filter
(the ``olmo2-tokenize`` command is :mod:`olmo2.cli.tokenize`).

Input: UTF-8 text files (each file one document, or each line with
``--doc-per-line``), ``.jsonl`` files (one JSON object per line, the text in
``--text-field``, default ``text``), gzip-compressed versions of both
(``.gz``), and folders (recursively, in sorted order). From a folder only
JSONL files and files whose first 64 KiB are UTF-8 text without NUL bytes are
taken; the others, and the outputs of ``olmo2-tokenize`` itself (a token file
with its sidecar, the sidecar), are skipped and reported. A JSONL line that is
not an object with the text field (or not UTF-8) is an error naming
``file:line``, or with ``--skip-bad-lines`` is skipped, counted and reported.
Files with no document are reported; inputs with no document at all are an
error (no empty token file is written).

Output: a headerless flat array of token ids (``uint32`` by default), EOS
after each document, written to a temporary file and renamed, plus a
``<out>.json`` sidecar with counts and the tokenizer used (``"byte"`` or the
absolute path of the ``tokenizer.json``; the trainer reads it to export the
tokenizer with the model). ``--out`` may not be an input, lie inside an input
folder, or have its sidecar there.

Tokenizer: OLMo 2's own (``dolma2``, shipped in :mod:`olmo2.tokenizers`; the
command's default), any Hugging Face ``tokenizer.json`` (``--tokenizer path``)
or the built-in byte tokenizer of the demo (``--tokenizer byte``). Note that a ``tokenizer.json``
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
    """``(encode_batch, eos_id, vocab_size, name)`` for ``"byte"``, ``"dolma2"`` or a ``tokenizer.json`` path.

    ``eos_token`` defaults to ``<|endoftext|>``; a tokenizer without it needs
    ``--eos-token`` (a token string) or ``--eos-id``.
    """
    if spec == "dolma2":  # OLMo 2's own, shipped in the package (olmo2.tokenizers)
        from .tokenizers import load_tokenizer as load_shipped

        tok = load_shipped("dolma2")
        eos = tok.token_to_id(eos_token or EOS_TOKEN)
        if eos is None:
            raise ValueError(f"--eos-token {eos_token!r} is not a token of the dolma2 tokenizer")
        return (lambda texts: [np.asarray(e.ids, dtype=np.int64)
                               for e in tok.encode_batch(texts, add_special_tokens=False)]), eos, \
            tok.get_vocab_size(with_added_tokens=True), "dolma2"
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
        raise FileNotFoundError(f"--tokenizer: expected 'dolma2', 'byte' or a tokenizer.json file, got {spec!r} (not found)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    name = eos_token or EOS_TOKEN
    eos = tok.token_to_id(name)
    if eos is None:
        raise ValueError(f"--tokenizer {path}: has no token {name!r}; name the EOS with --eos-token or --eos-id")

    def encode_batch(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(texts, add_special_tokens=False)]

    return encode_batch, eos, tok.get_vocab_size(with_added_tokens=True), str(path.resolve())


# ---------------------------------------------------------------------- documents
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
SNIFF_BYTES = 64 << 10


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith(JSONL_SUFFIXES)


def looks_like_text(path: Path) -> bool:
    """Whether the first 64 KiB of ``path`` (decompressed for ``.gz``) are UTF-8 without NUL bytes."""
    try:
        with _open_bytes(path) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError):
        return False
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return len(head) == SNIFF_BYTES and exc.start >= len(head) - 3  # a character cut by the 64 KiB
    return True


def _is_own_output(path: Path) -> str | None:
    """Why ``path`` is an output of olmo2-tokenize (a token file with its sidecar, or the sidecar), or None."""
    from .train.data import read_sidecar

    if read_sidecar(path) is not None:
        return "a token file written by olmo2-tokenize"
    if path.name.endswith(".json") and read_sidecar(path.with_name(path.name[:-5])) is not None:
        return "an olmo2-tokenize sidecar"
    return None


@dataclass
class InputFiles:
    files: list[Path]
    # (path, why) of the files a folder held that are not read.
    skipped: list[tuple[str, str]]


def input_files(inputs: Sequence[str], out: str | None = None) -> InputFiles:
    """The files to read: explicit files as given (refused when binary or our own
    output), folders walked for text and JSONL files (the rest skipped, with why).
    ``out`` (and its sidecar) may not be, or lie inside, an input."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    out_paths = [] if out is None else [Path(out).resolve(), Path(str(out) + ".json").resolve()]
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"input {item!r} is neither a file nor a folder ({item})")
        resolved = p.resolve()
        for target in out_paths:
            if target == resolved or (p.is_dir() and resolved in target.parents):
                what = "is" if target == resolved else "lies inside"
                raise ValueError(f"--out {out} {what} the input {item}: it would overwrite or re-read its own "
                                 f"input; write it elsewhere ({target})")
        if p.is_dir():
            for q in sorted(x for x in p.rglob("*") if x.is_file()):
                why = _is_own_output(q)
                if why is None and not _is_jsonl(q) and not looks_like_text(q):
                    why = "not UTF-8 text (binary?)"
                if why is not None:
                    skipped.append((str(q), why))
                else:
                    files.append(q)
        elif p.is_file():
            why = _is_own_output(p)
            if why is None and not _is_jsonl(p) and not looks_like_text(p):
                why = "not UTF-8 text or JSONL (a binary file?)"
            if why is not None:
                raise ValueError(f"input {item} is {why}; refusing to tokenize it ({item})")
            files.append(p)
    if not files:
        raise ValueError(f"inputs {list(inputs)} contain no text or JSONL files"
                         + (f" ({len(skipped)} skipped: {_listing(skipped)})" if skipped else ""))
    return InputFiles(files, skipped)


def _listing(items: Sequence, limit: int = 5) -> str:
    shown = [f"{x[0]} ({x[1]})" if isinstance(x, tuple) else str(x) for x in list(items)[:limit]]
    return ", ".join(shown) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class BadLines:
    """Bad JSONL lines seen with ``--skip-bad-lines``: a count and the first line numbers per file."""

    def __init__(self, keep: int = 10) -> None:
        self.count = 0
        self.where: dict[str, list[int]] = {}
        self.keep = keep

    def add(self, path: Path, lineno: int) -> None:
        self.count += 1
        lines = self.where.setdefault(str(path), [])
        if len(lines) < self.keep:
            lines.append(lineno)

    def summary(self) -> str:
        return "; ".join(f"{f}: lines {', '.join(map(str, n))}" + (" ..." if len(n) == self.keep else "")
                         for f, n in self.where.items())


def iter_documents(files: Iterable[Path], text_field: str = "text", doc_per_line: bool = False,
                   bad_lines: BadLines | None = None) -> Iterator[str]:
    """Documents of ``files``: one per JSONL line (``text_field``), else one per file or
    per non-empty line. A bad JSONL line raises ValueError naming ``file:line``, or
    with ``bad_lines`` is counted there and skipped."""
    for path in files:
        if _is_jsonl(path):
            with _open_bytes(path) as f:
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw.decode("utf-8"))
                        problem = None
                        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                            problem = f"expected an object with a string field {text_field!r}"
                    except UnicodeDecodeError as exc:
                        problem = f"not UTF-8 ({exc.reason} at byte {exc.start})"
                    except json.JSONDecodeError as exc:
                        problem = f"not valid JSON ({exc})"
                    if problem is not None:
                        if bad_lines is None:
                            raise ValueError(f"{path}:{lineno}: {problem} (--skip-bad-lines skips such lines) "
                                             f"({path})")
                        bad_lines.add(path, lineno)
                        continue
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
    # Files a folder held that were not read: (path, why).
    skipped_files: list = None
    # Input files that held no document.
    empty_files: list = None
    # Bad JSONL lines skipped (--skip-bad-lines): count, and where.
    bad_lines: int = 0
    bad_line_summary: str = ""


def tokenize_files(inputs: Sequence[str], out: str, tokenizer: str = "byte", dtype: str = "uint32",
                   text_field: str = "text", doc_per_line: bool = False, ngram_filter: bool = False,
                   min_period: int = MIN_PERIOD, max_period: int = MAX_PERIOD, max_count: int = MAX_COUNT,
                   eos_token: str | None = None, eos_id: int | None = None, batch_size: int = 256,
                   progress: bool = True, skip_bad_lines: bool = False) -> TokenizeStats:
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
    found = input_files(inputs, out)
    files = found.files
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats = TokenizeStats(skipped_files=found.skipped, empty_files=[])
    bad = BadLines() if skip_bad_lines else None
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
                docs = 0
                for doc in iter_documents([path], text_field, doc_per_line, bad):
                    docs += 1
                    batch.append(doc)
                    if len(batch) >= batch_size:
                        flush(batch)
                        batch = []
                if docs == 0:
                    stats.empty_files.append(str(path))
                bar.update(1)
                bar.set_postfix(docs=stats.documents, dropped=stats.dropped, tokens=stats.tokens, refresh=False)
            if batch:
                flush(batch)
            if bad is not None:
                stats.bad_lines, stats.bad_line_summary = bad.count, bad.summary()
            if stats.documents == 0:
                raise ValueError(f"the inputs hold no document ({len(files)} file(s) read, all empty"
                                 + (f", {bad.count} bad line(s) skipped" if bad is not None and bad.count else "")
                                 + f"); nothing written ({out})")
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
            "skipped_files": len(stats.skipped_files),
            "bad_lines_skipped": stats.bad_lines,
        }
        with atomic_write(out_path.with_name(out_path.name + ".json")) as f:
            json.dump(meta, f, indent=2)
    finally:
        bar.close()
    return stats
