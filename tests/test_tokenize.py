"""The repeated n-gram filter, the byte tokenizer and the olmo2-tokenize CLI."""
import gzip
import json
import shutil

import numpy as np
import pytest

from olmo2.byte_tokenizer import ByteTokenizer
from olmo2.cli.tokenize import main
from olmo2.tokenize import Repetition, find_repeated_ngram, has_repeated_ngram, tokenize_files


# ---------------------------------------------------------------------- n-gram filter
def brute_force(tokens, min_period, max_period, max_count):
    """Any start whose block of each period repeats max_count times in a row (full blocks)."""
    t = list(tokens)
    for p in range(min_period, max_period + 1):
        for i in range(len(t) - p + 1):
            k = 1
            while t[i + k * p:i + (k + 1) * p] == t[i:i + p] and i + (k + 1) * p <= len(t):
                k += 1
            if k >= max_count:
                return True
    return False


class TestNgramFilter:
    def test_single_token_run(self):
        assert find_repeated_ngram([5] * 32) == Repetition(start=0, end=32, period=1, times=32)
        assert find_repeated_ngram([5] * 31) is None
        assert find_repeated_ngram([1, 2] + [5] * 40 + [3]) == Repetition(start=2, end=42, period=1, times=40)

    def test_period_three_inside_a_document(self):
        prefix, suffix = list(range(100, 120)), list(range(200, 230))
        doc = prefix + [1, 2, 3] * 32 + suffix
        assert find_repeated_ngram(doc) == Repetition(start=20, end=20 + 96, period=3, times=32)
        assert find_repeated_ngram(prefix + [1, 2, 3] * 31 + [1, 2] + suffix) is None  # partial block not counted

    def test_longest_period_is_thirteen(self):
        block = list(range(40, 53))  # 13 distinct tokens
        assert find_repeated_ngram(block * 32).period == 13
        block14 = list(range(40, 54))
        assert find_repeated_ngram(block14 * 40) is None
        assert find_repeated_ngram(block14 * 40, max_period=14).period == 14

    def test_base64_like_spike_text(self):
        # The kind of text that caused OLMo 2 gradient spikes: "g4ODg4OD..." repeated.
        ids = ByteTokenizer().encode("data: " + "g4OD" * 40 + " end")
        hit = find_repeated_ngram(ids)
        assert hit is not None and hit.period == 4 and hit.times >= 32

    def test_ordinary_text_passes(self):
        text = "def f(x):\n    return x + 1\n" * 20  # 27-token period: longer than 13
        assert not has_repeated_ngram(ByteTokenizer().encode(text))
        assert not has_repeated_ngram(np.random.default_rng(0).integers(0, 1000, 5000))
        assert not has_repeated_ngram([])

    @pytest.mark.parametrize("seed", range(30))
    def test_matches_brute_force(self, seed):
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, 2, size=int(rng.integers(1, 60)))
        if seed % 3 == 0:  # plant a repetition
            p = int(rng.integers(1, 4))
            at = int(rng.integers(0, len(tokens)))
            tokens = np.concatenate([tokens[:at], np.tile(rng.integers(0, 3, p), 5), tokens[at:]])
        for max_count in (3, 4, 5):
            assert has_repeated_ngram(tokens, 1, 4, max_count) == brute_force(tokens, 1, 4, max_count)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="max_period must be a positive int"):
            find_repeated_ngram([1, 2], max_period=0)
        with pytest.raises(ValueError, match="tokens must be 1-D"):
            find_repeated_ngram(np.zeros((2, 2)))


# ---------------------------------------------------------------------- byte tokenizer
def test_byte_tokenizer_round_trip_and_hf_equivalence(tmp_path):
    tok = ByteTokenizer()
    text = "héllo\tworld 日本\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids + [tok.eos_token_id]) == text + "<|endoftext|>"
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    hf = tok.to_hf()
    assert hf.encode(text).ids == ids
    assert hf.decode(ids) == text
    assert hf.get_vocab_size() == tok.vocab_size == 258
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(tok.save(tmp_path))
    assert saved.encode(text).ids == ids and saved.token_to_id("<|endoftext|>") == 256
    with pytest.raises(ValueError, match="ids must be in"):
        tok.decode([300])


# ---------------------------------------------------------------------- CLI
def word_tokenizer_json(tmp_path, with_eos=True):
    """A word-level tokenizer.json built in code: ids known by hand."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "olmo": 3, "two": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_eos:
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    path = tmp_path / ("tok.json" if with_eos else "tok_no_eos.json")
    tok.save(str(path))
    return path


def test_cli_text_files_byte_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("dé\n")
    out = tmp_path / "out" / "tokens.npy"
    assert main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(out), "--no-progress", "--tokenizer", "byte"]) == 0
    ids = np.fromfile(out, dtype=np.uint32)
    assert ids.tolist() == [97, 98, 99, 256, 100, 0xC3, 0xA9, 10, 256]
    meta = json.loads((out.parent / "tokens.npy.json").read_text())
    assert meta["documents"] == 2 and meta["tokens"] == 9 and meta["eos_token_id"] == 256


def test_cli_jsonl_with_tokenizer_json(tmp_path):
    tok = word_tokenizer_json(tmp_path)
    lines = [{"text": "hello world"}, {"text": "olmo two zzz", "id": 7}, {"text": "hello"}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "two two"}) + "\n")
    out = tmp_path / "t.npy"
    main([str(tmp_path / "docs.jsonl"), str(tmp_path / "more.jsonl.gz"), "-o", str(out), "--tokenizer", str(tok),
          "--dtype", "uint16", "--no-progress"])
    eos = 5  # added after the 5 words
    assert np.fromfile(out, dtype=np.uint16).tolist() == [1, 2, eos, 3, 4, 0, eos, 1, eos, 4, 4, eos]


def test_cli_ngram_filter_drops_documents(tmp_path):
    docs = [{"text": "normal text"}, {"text": "x" + "ab" * 32 + "y"}, {"text": "x" + "ab" * 31 + "y"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in docs))
    out = tmp_path / "f.npy"
    stats = tokenize_files([str(tmp_path / "d.jsonl")], str(out), ngram_filter=True, progress=False)
    assert (stats.documents, stats.dropped) == (3, 1)
    ids = np.fromfile(out, dtype=np.uint32)
    assert (ids == 256).sum() == 2
    assert bytes(ids[ids != 256].astype(np.uint8)) == b"normal text" + b"x" + b"ab" * 31 + b"y"


def test_cli_errors(tmp_path, capsys):
    tok = word_tokenizer_json(tmp_path, with_eos=False)
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="has no token '<\\|endoftext\\|>'"):
        tokenize_files([str(tmp_path / "a.txt")], str(tmp_path / "o.npy"), tokenizer=str(tok), progress=False)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected an object with a string field 'text'"):
        tokenize_files([str(tmp_path / "bad.jsonl")], str(tmp_path / "o.npy"), progress=False)
    assert not (tmp_path / "o.npy").exists()  # nothing half-written is left behind
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        tokenize_files([str(tmp_path / "missing.txt")], str(tmp_path / "o.npy"), progress=False)


# ---------------------------------------------------------------------- safe tokenizing
def test_out_over_an_input_is_refused_and_the_input_kept(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "keep me"}\n')
    before = docs.read_bytes()
    assert main([str(docs), "--out", str(docs), "--no-progress", "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"olmo2-tokenize: --out {docs} is the input {docs}") and err.count("\n") == 1
    assert docs.read_bytes() == before and not (tmp_path / "docs.jsonl.json").exists()
    assert main([str(tmp_path), "--out", str(tmp_path / "sub" / "t.npy"), "--no-progress", "--tokenizer", "byte"]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert main([str(tmp_path / "other.txt"), str(docs), "--out", str(tmp_path / "other.txt"), "--no-progress", "--tokenizer", "byte"]) == 2
    assert docs.read_bytes() == before


def test_folders_take_text_only_skip_own_outputs_and_report(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("abc")
    (src / "b.jsonl").write_text('{"text": "xy"}\n')
    (src / "c.bin").write_bytes(b"\x00\x01\x02binary")
    (src / "empty.txt").write_text("")
    assert main([str(src / "a.txt"), "--out", str(tmp_path / "prev.npy"), "--no-progress", "--tokenizer", "byte"]) == 0
    for name in ("prev.npy", "prev.npy.json"):  # an earlier output moved next to the text
        shutil.copy(tmp_path / name, src / name)
    capsys.readouterr()
    out = tmp_path / "out" / "t.npy"
    assert main([str(src), "--out", str(out), "--no-progress", "--tokenizer", "byte"]) == 0
    err = capsys.readouterr().err
    assert "skipped 3 file(s) from the input folders" in err
    assert "c.bin (not UTF-8 text (binary?))" in err
    assert "prev.npy (a token file written by olmo2-tokenize)" in err and "prev.npy.json (an olmo2-tokenize sidecar)" in err
    assert f"1 input file(s) held no document: {src / 'empty.txt'}" in err
    assert np.fromfile(out, dtype=np.uint32).tolist() == [97, 98, 99, 256, 120, 121, 256]
    meta = json.loads((tmp_path / "out" / "t.npy.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["skipped_files"] == 3
    assert main([str(src / "c.bin"), "--out", str(tmp_path / "x.npy"), "--no-progress", "--tokenizer", "byte"]) == 2
    assert "is not UTF-8 text or JSONL" in capsys.readouterr().err
    assert main([str(src / "empty.txt"), "--out", str(tmp_path / "x.npy"), "--no-progress", "--tokenizer", "byte"]) == 2
    assert "the inputs hold no document" in capsys.readouterr().err and not (tmp_path / "x.npy").exists()


def test_skip_bad_lines_counts_and_reports(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": \n{"text": "ok2"}\n{"body": "x"}\n\xff\xfe\n')
    assert main([str(path), "--out", str(tmp_path / "t.npy"), "--no-progress", "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: not valid JSON" in err and "--skip-bad-lines skips such lines" in err
    assert main([str(path), "--out", str(tmp_path / "t.npy"), "--no-progress", "--tokenizer", "byte", "--skip-bad-lines"]) == 0
    assert f"skipped 3 bad JSONL line(s): {path}: lines 2, 4, 5" in capsys.readouterr().err
    ids = np.fromfile(tmp_path / "t.npy", dtype=np.uint32)
    assert bytes(ids[ids != 256].astype(np.uint8)) == b"okok2"
