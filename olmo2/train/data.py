"""Training data: token files, fixed-length instances, a seeded data mix with a
resumable order, and each rank's slice of every global batch.

Format (OLMo's): a token file is a headerless flat array of ``uint32`` token
ids (``uint16`` with ``dtype="uint16"``), documents concatenated, each followed
by EOS. ``.npy`` is only the name; there is no numpy header.

Instances: every file is cut into consecutive windows of ``seq_len`` tokens;
the tail shorter than a window is dropped, and no window spans two files.
Documents may span windows (as in OLMo 2 pretraining). A window is given to the
model as both ``input_ids`` and ``labels`` (the Hugging Face convention: the
model shifts labels inside), so an instance of ``seq_len`` tokens trains
``seq_len - 1`` next-token predictions, exactly like OLMo's 4096-token
instances.

Order: the stream of global instance positions 0, 1, 2, ... is fixed by the
seed and the sources' sizes. With several sources (a data mix), each *mix
epoch* of ``M`` positions holds exactly ``round(weight * M)`` instances of each
source, in a seeded shuffled order; ``M`` is the largest size at which no
source repeats within a mix epoch. Each source walks its own instances in a
fresh seeded permutation per pass, so a source that is subsampled in one mix
epoch continues where it stopped in the next. Everything is a pure function of
``(seed, position)``: resuming needs only the next step number.

Global batch ``b`` is positions ``[b * B, (b + 1) * B)``; rank ``r`` of ``W``
reads the contiguous ``B / W`` of them starting at ``b * B + r * B / W``.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator, Sequence

import numpy as np
import torch

TOKEN_DTYPES = {"uint32": np.uint32, "uint16": np.uint16}
NPY_MAGIC = b"\x93NUMPY"
# How many tokens at the head and tail of each file are checked against the
# vocabulary when it is opened (a cheap guard against a wrong dtype).
CHECK_TOKENS = 1 << 20


# ---------------------------------------------------------------------- files
def open_token_file(path: str | os.PathLike, dtype: str = "uint32", vocab_size: int | None = None) -> np.memmap:
    """Memory-map a token file, checking its size, header and (sampled) ids.

    Raises ValueError naming the file when its size is not a multiple of the
    dtype's size (truncated, or written with another dtype), when it carries a
    numpy header, or when a sampled id is outside ``[0, vocab_size)``.
    """
    path = os.fspath(path)
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(TOKEN_DTYPES)}, got {dtype!r} (file {path})")
    np_dtype = np.dtype(TOKEN_DTYPES[dtype])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head == NPY_MAGIC:
        raise ValueError(
            f"token file {path} has a numpy (.npy) header; expected a headerless flat array of {dtype} "
            "(write it with ndarray.tofile or olmo2-tokenize)"
        )
    if size % np_dtype.itemsize:
        raise ValueError(
            f"token file {path} is {size} bytes, not a multiple of {np_dtype.itemsize} ({dtype}): "
            "it is truncated or was written with another dtype"
        )
    if size == 0:
        return np.zeros(0, dtype=np_dtype)  # np.memmap refuses empty files
    tokens = np.memmap(path, dtype=np_dtype, mode="r")
    if vocab_size is not None:
        check_token_ids(path, tokens, dtype, vocab_size)
    return tokens


def check_token_ids(path: str, tokens: np.ndarray, dtype: str, vocab_size: int) -> None:
    """Check the head and tail of ``tokens`` for ids a ``vocab_size`` model cannot take.

    A ``uint16`` file read as ``uint32`` pairs two ids into one large value; a
    ``uint32`` file of small ids read as ``uint16`` puts a zero (the high half)
    at every odd position. Both are reported with the likely cause.
    """
    n = len(tokens)
    samples = [np.asarray(tokens[: min(n, CHECK_TOKENS)])]
    if n > CHECK_TOKENS:
        samples.append(np.asarray(tokens[max(CHECK_TOKENS, n - CHECK_TOKENS):]))
    for sample in samples:
        if not len(sample):
            continue
        top = int(sample.max())
        if top >= vocab_size:
            raise ValueError(
                f"token file {path}: token id {top} is outside the model's vocabulary [0, {vocab_size})"
                f"{_out_of_vocab_hint(path, dtype, vocab_size)}"
            )
    head = samples[0]
    if dtype == "uint16" and len(head) >= 64 and not head[1::2].any() and head[0::2].any():
        raise ValueError(
            f"token file {path}: every odd-position uint16 value is 0, the signature of a uint32 file "
            "read as uint16; pass dtype uint32"
        )


def _out_of_vocab_hint(path: str, dtype: str, vocab_size: int) -> str:
    """The likely cause of ids past the vocabulary: what the olmo2-tokenize sidecar says
    the file holds (another dtype, or a tokenizer with more ids than the model has
    rows), else a uint16 file read as uint32."""
    meta = read_sidecar(path)
    if meta is not None:
        if meta.get("dtype") in ("uint16", "uint32") and meta["dtype"] != dtype:
            return f" (its sidecar {path}{SIDECAR_SUFFIX} says {meta['dtype']}: pass dtype {meta['dtype']})"
        ids = meta.get("vocab_size")
        if isinstance(ids, int) and ids > vocab_size:
            padded = -(-ids // 128) * 128
            return (
                f" (written with the tokenizer {meta['tokenizer']} of {ids} ids, its sidecar says: set "
                f"model.vocab_size to at least {ids}, e.g. --model.vocab_size={padded}, a multiple of 128)"
            )
    return " (was it written as uint16? pass dtype uint16)" if dtype == "uint32" else ""


SIDECAR_SUFFIX = ".json"


def read_sidecar(path: str | os.PathLike) -> dict | None:
    """The ``<file>.json`` that ``olmo2-tokenize`` writes beside a token file, or None
    when there is none (or it is not such a sidecar: no ``tokenizer`` and ``tokens``)."""
    side = os.fspath(path) + SIDECAR_SUFFIX
    if not os.path.isfile(side):
        return None
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and "tokenizer" in meta and "tokens" in meta else None


def sidecar_tokenizer(path: str | os.PathLike) -> str | None:
    """The tokenizer the sidecar of token file ``path`` names: ``"byte"`` or a path
    (a relative one is taken from the sidecar's folder when it is not found from here)."""
    meta = read_sidecar(path)
    if meta is None or not isinstance(meta.get("tokenizer"), str):
        return None
    name = meta["tokenizer"]
    if name == "byte" or os.path.isabs(name) or os.path.exists(name):
        return name
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    return beside if os.path.exists(beside) else name


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Paths from a list of paths and glob patterns, in sorted order per pattern."""
    out: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(os.fspath(pattern))
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"no token file matches {pattern!r}")
            out.extend(matches)
        else:
            out.append(pattern)
    return out


class TokenSource:
    """One source of a data mix: token files cut into ``seq_len`` instances."""

    def __init__(self, paths: Sequence[str], seq_len: int, dtype: str = "uint32",
                 vocab_size: int | None = None, name: str | None = None):
        if isinstance(paths, (str, os.PathLike)):
            paths = [os.fspath(paths)]
        if not paths:
            raise ValueError(f"source {name or '?'}: paths must name at least one token file, got none")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
        self.paths = expand_paths(paths)
        self.name = name or os.path.basename(self.paths[0])
        self.seq_len = seq_len
        self.dtype = dtype
        self.files = [open_token_file(p, dtype, vocab_size) for p in self.paths]
        counts = np.array([len(f) // seq_len for f in self.files], dtype=np.int64)
        self.file_starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_instances = int(self.file_starts[-1])
        self.num_tokens = int(sum(len(f) for f in self.files))
        if self.num_instances == 0:
            raise ValueError(
                f"source {self.name}: {self.num_tokens} tokens in {len(self.paths)} file(s) make no instance "
                f"of seq_len={seq_len} (each file needs at least seq_len tokens)"
            )

    def instance(self, index: int) -> np.ndarray:
        file_id = int(np.searchsorted(self.file_starts, index, side="right")) - 1
        start = (index - int(self.file_starts[file_id])) * self.seq_len
        return np.asarray(self.files[file_id][start:start + self.seq_len])

    def fingerprint(self) -> dict:
        return {"name": self.name, "files": len(self.paths), "tokens": self.num_tokens,
                "instances": self.num_instances}


# ---------------------------------------------------------------------- order
def _permutation(seed: int, *key: int, n: int) -> np.ndarray:
    """A seeded permutation of ``range(n)``: ``Generator.permutation(n)``'s order, held in
    uint32 when it fits (4 bytes per instance: 4 GB for a billion instances)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *key])))
    order = np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64)
    rng.shuffle(order)
    return order


def mix_counts(sizes: Sequence[int], weights: Sequence[float]) -> tuple[int, list[int]]:
    """Mix-epoch length ``M`` and each source's instances per mix epoch.

    ``M = floor(min(size / weight))`` (normalized weights): the largest epoch in
    which no source repeats. Counts are ``weight * M`` rounded by largest
    remainder so they sum to ``M`` exactly.
    """
    if len(sizes) != len(weights) or not sizes:
        raise ValueError(f"need one weight per source, got {len(weights)} weights for {len(sizes)} sources")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or not np.isfinite(w):
            raise ValueError(f"data mix weights must be positive numbers, got {list(weights)}")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    total = int(np.floor(min(n / wi for n, wi in zip(sizes, w)) + 1e-9))
    exact = w * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    if (counts == 0).any():
        raise ValueError(
            f"data mix: a weight is too small for a mix epoch of {total} instances "
            f"(counts {counts.tolist()} for sizes {list(sizes)} and weights {w.round(6).tolist()})"
        )
    return total, counts.tolist()


class MixedOrder:
    """The global instance order: position -> (source, instance), seeded and random-access."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        self.sizes = [int(n) for n in sizes]
        self.seed = int(seed)
        self.epoch_len, self.counts = mix_counts(self.sizes, weights)
        self._epoch: int | None = None
        self._slots: np.ndarray | None = None
        self._rank: np.ndarray | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _load_epoch(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        if len(self.counts) == 1:  # no mixing: position i of the epoch is the source's i-th draw
            self._epoch, self._slots, self._rank = epoch, None, None
            return
        dtype = np.int32 if self.epoch_len < 2**31 else np.int64
        labels = np.repeat(np.arange(len(self.counts), dtype=np.int8 if len(self.counts) < 128 else np.int32),
                           self.counts)
        labels = labels[_permutation(self.seed, 1, epoch, n=self.epoch_len)]
        # rank[j]: how many earlier slots of this epoch belong to slot j's source.
        rank = np.empty(self.epoch_len, dtype=dtype)
        for s in range(len(self.counts)):
            where = np.flatnonzero(labels == s)
            rank[where] = np.arange(len(where), dtype=dtype)
        self._epoch, self._slots, self._rank = epoch, labels, rank

    def _source_perm(self, source: int, source_epoch: int) -> np.ndarray:
        key = (source, source_epoch)
        perm = self._perms.get(key)
        if perm is None:
            if len(self._perms) >= 2 * len(self.sizes):
                self._perms.clear()
            perm = _permutation(self.seed, 2, source, source_epoch, n=self.sizes[source])
            self._perms[key] = perm
        return perm

    def __getitem__(self, position: int) -> tuple[int, int]:
        epoch, slot = divmod(int(position), self.epoch_len)
        self._load_epoch(epoch)
        if self._slots is None:
            source, stream = 0, epoch * self.counts[0] + slot
        else:
            source = int(self._slots[slot])
            stream = epoch * self.counts[source] + int(self._rank[slot])
        source_epoch, offset = divmod(stream, self.sizes[source])
        return source, int(self._source_perm(source, source_epoch)[offset])


# ---------------------------------------------------------------------- batches
class TrainData:
    """Global batches of a data mix, read per rank, resumable by step.

    ``batch(step)`` returns this rank's ``(B / W, seq_len)`` int64 tensor of
    global batch ``step``; iterating continues from :attr:`next_step`, which is
    the whole of the resumable state (with a fingerprint of the sources).
    """

    def __init__(self, sources: Sequence[TokenSource], weights: Sequence[float], global_batch_instances: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if not sources:
            raise ValueError("TrainData: sources must hold at least one TokenSource, got none")
        seq_lens = {s.seq_len for s in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"TrainData: all sources must share seq_len, got {sorted(seq_lens)}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"TrainData: rank must be in [0, world_size); got rank={rank!r}, world_size={world_size!r}")
        if (isinstance(global_batch_instances, bool) or not isinstance(global_batch_instances, int)
                or global_batch_instances <= 0 or global_batch_instances % world_size):
            raise ValueError(
                f"TrainData: global_batch_instances must be a positive multiple of world_size={world_size}, "
                f"got {global_batch_instances!r}"
            )
        self.sources = list(sources)
        self.weights = [float(w) for w in weights]
        self.seq_len = seq_lens.pop()
        self.global_batch = global_batch_instances
        self.local_batch = global_batch_instances // world_size
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.order = MixedOrder([s.num_instances for s in self.sources], self.weights, self.seed)
        self.next_step = 0

    def positions(self, step: int, rank: int | None = None) -> range:
        """Global instance positions this rank (or ``rank``) reads at ``step``."""
        r = self.rank if rank is None else rank
        start = step * self.global_batch + r * self.local_batch
        return range(start, start + self.local_batch)

    def batch(self, step: int, rank: int | None = None) -> torch.Tensor:
        rows = []
        for pos in self.positions(step, rank):
            source, index = self.order[pos]
            rows.append(self.sources[source].instance(index))
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def batch_sources(self, step: int) -> list[int]:
        """Source index of every instance of global batch ``step`` (all ranks)."""
        start = step * self.global_batch
        return [self.order[p][0] for p in range(start, start + self.global_batch)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            out = self.batch(self.next_step)
            self.next_step += 1
            yield out

    @property
    def epoch_instances(self) -> int:
        return self.order.epoch_len

    def fingerprint(self) -> dict:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_instances": self.global_batch,
            "weights": self.weights,
            "sources": [s.fingerprint() for s in self.sources],
        }

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue at ``state["next_step"]``; with ``strict``, refuse a different data setup."""
        saved = state.get("fingerprint")
        if strict and saved is not None and _jsonable(saved) != _jsonable(self.fingerprint()):
            raise ValueError(
                "TrainData.load_state_dict: the checkpoint's data differs from this run's "
                f"(saved {saved}, now {self.fingerprint()}); the order would not continue exactly. "
                "Use the same data/seed/batch, or start a new stage with init_from."
            )
        self.next_step = int(state["next_step"])


def _jsonable(value):
    return json.loads(json.dumps(value))


class EvalData:
    """A fixed evaluation set: the first ``num_batches`` global batches of a source, in file order."""

    def __init__(self, source: TokenSource, global_batch_instances: int, num_batches: int,
                 rank: int = 0, world_size: int = 1):
        self.source = source
        self.local_batch = global_batch_instances // world_size
        self.rank = rank
        self.global_batch = global_batch_instances
        self.num_batches = max(1, min(num_batches, source.num_instances // global_batch_instances))
        if source.num_instances < global_batch_instances:
            raise ValueError(
                f"eval source {source.name}: {source.num_instances} instances, fewer than one global batch "
                f"({global_batch_instances})"
            )

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in range(self.num_batches):
            start = b * self.global_batch + self.rank * self.local_batch
            rows = [self.source.instance(i) for i in range(start, start + self.local_batch)]
            yield torch.from_numpy(np.stack(rows).astype(np.int64))
