"""A byte-level tokenizer built in code: one id per byte, plus two special tokens.

Ids 0..255 are the bytes of the UTF-8 text, ``<|endoftext|>`` (EOS) is 256 and
``<|pad|>`` is 257: 258 ids, which fit the ``olmo2-tiny`` and ``olmo2-test``
vocabularies. Nothing is downloaded or trained, so the built-in demo corpus can
be tokenized on any machine.

:meth:`ByteTokenizer.to_hf` builds the same tokenizer as a
``tokenizers.Tokenizer`` (byte-level BPE without merges), so it can be saved as
``tokenizer.json`` next to a Hugging Face checkpoint and used by any tool that
reads one.
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from .files import atomic_write

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
NUM_BYTES = 256


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (GPT-2).

    Printable Latin-1 bytes map to themselves; the others (controls, space,
    a few Latin-1 gaps) are shifted to code points 256 and up, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping: dict[int, str] = {}
    shifted = 0
    for byte in range(NUM_BYTES):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(NUM_BYTES + shifted)
            shifted += 1
    return mapping


class ByteTokenizer:
    """UTF-8 bytes as token ids, with EOS = 256 and pad = 257."""

    eos_token = EOS_TOKEN
    pad_token = PAD_TOKEN
    eos_token_id = NUM_BYTES
    pad_token_id = NUM_BYTES + 1
    vocab_size = NUM_BYTES + 2

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS appended)."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str, dtype=np.uint32) -> np.ndarray:
        """Token ids of ``text`` as a numpy array (fast path for corpora)."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: text must be a str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (a sequence cut mid-character) decodes as U+FFFD."""
        out: list[str] = []
        pending = bytearray()
        for raw in ids:
            token = int(raw)
            if 0 <= token < NUM_BYTES:
                pending.append(token)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if token == self.eos_token_id:
                out.append("" if skip_special_tokens else EOS_TOKEN)
            elif token == self.pad_token_id:
                out.append("" if skip_special_tokens else PAD_TOKEN)
            else:
                raise ValueError(f"ByteTokenizer.decode: ids must be in [0, {self.vocab_size}), got {token}")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        return {EOS_TOKEN: self.eos_token_id, PAD_TOKEN: self.pad_token_id}.get(token)

    def to_hf(self):
        """The same tokenizer as a ``tokenizers.Tokenizer`` (identical ids)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        char_of = _byte_to_unicode()
        vocab = {char_of[b]: b for b in range(NUM_BYTES)}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        # Added in id order right after the 256 byte ids.
        tokenizer.add_special_tokens([
            AddedToken(EOS_TOKEN, special=True, normalized=False),
            AddedToken(PAD_TOKEN, special=True, normalized=False),
        ])
        assert tokenizer.token_to_id(EOS_TOKEN) == self.eos_token_id
        assert tokenizer.token_to_id(PAD_TOKEN) == self.pad_token_id
        return tokenizer

    def save(self, path: str | os.PathLike) -> str:
        """Write ``tokenizer.json`` (into ``path`` if it is a folder); returns the file path."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        with atomic_write(path) as f:
            f.write(self.to_hf().to_str())
        return path
