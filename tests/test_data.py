"""Token files, instances, the data mix, the resumable order and per-rank slices."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from olmo2.train import corpus as corpus_mod
from olmo2.train.corpus import stdlib_corpus
from olmo2.train.data import MixedOrder, TokenSource, TrainData, mix_counts, open_token_file


def write(path, values, dtype=np.uint32):
    np.asarray(values, dtype=dtype).tofile(path)
    return str(path)


# ---------------------------------------------------------------------- files
class TestTokenFiles:
    def test_reads_headerless_uint32_and_uint16(self, tmp_path):
        a = write(tmp_path / "a.npy", range(100))
        b = write(tmp_path / "b.npy", range(100), np.uint16)
        assert open_token_file(a).dtype == np.uint32
        np.testing.assert_array_equal(open_token_file(a)[:5], [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(open_token_file(b, "uint16")[95:], [95, 96, 97, 98, 99])

    def test_truncated_file_names_the_file(self, tmp_path):
        path = tmp_path / "cut.npy"
        path.write_bytes(np.arange(10, dtype=np.uint32).tobytes()[:-1])
        with pytest.raises(ValueError, match=r"cut\.npy is 39 bytes, not a multiple of 4 \(uint32\)"):
            open_token_file(path)

    def test_uint16_file_read_as_uint32(self, tmp_path):
        path = write(tmp_path / "small.npy", np.arange(1000) % 250, np.uint16)
        with pytest.raises(ValueError, match=r"small\.npy: token id \d+ is outside .*was it written as uint16"):
            open_token_file(path, "uint32", vocab_size=512)

    def test_ids_past_the_vocabulary_named_from_the_sidecar(self, tmp_path):
        # olmo2-tokenize's default (dolma2, 100278 ids) fed to the tiny model (512 rows): the sidecar says why
        path = write(tmp_path / "dolma2.npy", [100257, 5, 17, 100257])
        side = {"tokenizer": "dolma2", "vocab_size": 100278, "dtype": "uint32", "tokens": 4}
        (tmp_path / "dolma2.npy.json").write_text(json.dumps(side))
        with pytest.raises(ValueError) as err:
            open_token_file(path, "uint32", vocab_size=512)
        msg = str(err.value)
        assert "token id 100257 is outside the model's vocabulary [0, 512)" in msg
        assert "tokenizer dolma2 of 100278 ids" in msg and "--model.vocab_size=100352" in msg
        assert "uint16" not in msg
        # a sidecar naming another dtype than the one read says so
        write(tmp_path / "small.npy", np.arange(1000) % 250, np.uint16)
        side = {"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16", "tokens": 1000}
        (tmp_path / "small.npy.json").write_text(json.dumps(side))
        with pytest.raises(ValueError, match=r"small\.npy\.json says uint16: pass dtype uint16\)$"):
            open_token_file(str(tmp_path / "small.npy"), "uint32", vocab_size=512)

    def test_uint32_file_read_as_uint16(self, tmp_path):
        path = write(tmp_path / "wide.npy", 1 + np.arange(1000) % 250)
        with pytest.raises(ValueError, match=r"wide\.npy: every odd-position uint16 value is 0"):
            open_token_file(path, "uint16", vocab_size=512)

    def test_npy_header_refused(self, tmp_path):
        path = tmp_path / "with_header.npy"
        np.save(path, np.arange(10, dtype=np.uint32))
        with pytest.raises(ValueError, match=r"with_header\.npy has a numpy \(\.npy\) header"):
            open_token_file(path)

    def test_bad_dtype_and_missing_file(self, tmp_path):
        with pytest.raises(ValueError, match="dtype must be one of"):
            open_token_file(write(tmp_path / "x.npy", [1]), "int64")
        with pytest.raises(FileNotFoundError, match="nope.npy does not exist"):
            open_token_file(tmp_path / "nope.npy")

    def test_source_too_small(self, tmp_path):
        with pytest.raises(ValueError, match="make no instance of seq_len=8"):
            TokenSource([write(tmp_path / "t.npy", range(7))], seq_len=8)


# ---------------------------------------------------------------------- instances
def test_instance_boundaries_within_and_across_files(tmp_path):
    f1 = write(tmp_path / "1.npy", range(0, 25))        # 2 instances of 10, tail of 5 dropped
    f2 = write(tmp_path / "2.npy", range(1000, 1031))   # 3 instances, tail of 1 dropped
    src = TokenSource([f1, f2], seq_len=10)
    assert src.num_instances == 5 and src.num_tokens == 56
    np.testing.assert_array_equal(src.instance(0), np.arange(0, 10))
    np.testing.assert_array_equal(src.instance(1), np.arange(10, 20))
    np.testing.assert_array_equal(src.instance(2), np.arange(1000, 1010))  # never spans two files
    np.testing.assert_array_equal(src.instance(4), np.arange(1020, 1030))


def test_glob_patterns(tmp_path):
    for i in range(3):
        write(tmp_path / f"part{i}.npy", range(i * 100, i * 100 + 20))
    src = TokenSource([str(tmp_path / "part*.npy")], seq_len=10)
    assert src.num_instances == 6
    assert src.instance(2)[0] == 100
    with pytest.raises(FileNotFoundError, match="no token file matches"):
        TokenSource([str(tmp_path / "none*.npy")], seq_len=10)


# ---------------------------------------------------------------------- order
def test_single_source_epoch_is_a_seeded_permutation():
    order = MixedOrder([50], [1.0], seed=3)
    epoch0 = [order[i][1] for i in range(50)]
    epoch1 = [order[i][1] for i in range(50, 100)]
    assert sorted(epoch0) == list(range(50)) and sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1 and epoch0 != list(range(50))
    assert epoch0 == [MixedOrder([50], [1.0], seed=3)[i][1] for i in range(50)]
    assert epoch0 != [MixedOrder([50], [1.0], seed=4)[i][1] for i in range(50)]


def test_mix_counts_exact():
    total, counts = mix_counts([100, 1000], [0.3, 0.7])
    assert total == 333 and counts == [100, 233]  # the small source limits the epoch
    assert mix_counts([10, 10, 10], [1, 1, 1]) == (30, [10, 10, 10])
    with pytest.raises(ValueError, match="weights must be positive"):
        mix_counts([10, 10], [1, 0])


def test_mixing_proportions_and_no_repeats_within_a_pass():
    order = MixedOrder([100, 1000], [0.3, 0.7], seed=0)
    m = order.epoch_len
    seen = [order[i] for i in range(3 * m)]
    for e in range(3):
        counts = Counter(s for s, _ in seen[e * m:(e + 1) * m])
        assert counts == {0: 100, 1: 233}  # exact per mix epoch
    # The big source continues across mix epochs without repeating within its pass.
    big = [idx for s, idx in seen if s == 1]
    assert len(big) == 699 and len(set(big)) == 699
    small = [idx for s, idx in seen if s == 0]
    assert sorted(small[:100]) == list(range(100))


def test_data_mix_batches_follow_weights(tmp_path):
    a = TokenSource([write(tmp_path / "a.npy", np.zeros(8 * 200))], seq_len=8)
    b = TokenSource([write(tmp_path / "b.npy", np.ones(8 * 400))], seq_len=8)
    d = TrainData([a, b], [1.0, 3.0], global_batch_instances=16, seed=1)
    sources = [s for step in range(20) for s in d.batch_sources(step)]
    share = sum(sources) / len(sources)
    assert abs(share - 0.75) < 0.03
    batch = d.batch(0)
    assert batch.dtype == torch.int64 and batch.shape == (16, 8)
    np.testing.assert_array_equal(batch[:, 0].numpy(), d.batch_sources(0))  # file a holds 0s, b holds 1s


# ---------------------------------------------------------------------- batches
def make_source(tmp_path, n=400, seq=8):
    return TokenSource([write(tmp_path / "s.npy", np.arange(n * seq) % 60000)], seq_len=seq)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_disjoint_and_covering(tmp_path, world):
    src = make_source(tmp_path)
    full = TrainData([src], [1.0], global_batch_instances=8, seed=5)
    ranks = [TrainData([src], [1.0], global_batch_instances=8, seed=5, rank=r, world_size=world)
             for r in range(world)]
    for step in (0, 1, 49, 50, 123):  # 50 batches per epoch: crosses the epoch boundary
        positions = [set(d.positions(step)) for d in ranks]
        assert set().union(*positions) == set(full.positions(step))
        assert sum(len(p) for p in positions) == 8
        torch.testing.assert_close(torch.cat([d.batch(step) for d in ranks]), full.batch(step), rtol=0, atol=0)


def test_rank_and_batch_validation(tmp_path):
    src = make_source(tmp_path)
    with pytest.raises(ValueError, match="global_batch_instances must be a positive multiple of world_size=3"):
        TrainData([src], [1.0], global_batch_instances=8, world_size=3)
    with pytest.raises(ValueError, match="rank must be in"):
        TrainData([src], [1.0], global_batch_instances=8, rank=2, world_size=2)


def test_resume_position(tmp_path):
    src = make_source(tmp_path)
    straight = TrainData([src], [1.0], global_batch_instances=8, seed=2)
    it = iter(straight)
    first = [next(it) for _ in range(5)]
    state = straight.state_dict()
    rest = [next(it) for _ in range(3)]
    resumed = TrainData([src], [1.0], global_batch_instances=8, seed=2)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for expected in rest:
        torch.testing.assert_close(next(it2), expected, rtol=0, atol=0)
    assert len(first) == 5 and state["next_step"] == 5


def test_resume_refuses_other_data(tmp_path):
    src = make_source(tmp_path)
    state = TrainData([src], [1.0], global_batch_instances=8, seed=2).state_dict()
    other = TrainData([src], [1.0], global_batch_instances=8, seed=3)
    with pytest.raises(ValueError, match="the checkpoint's data differs"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert other.next_step == 0


# ---------------------------------------------------------------------- built-in corpus
def test_stdlib_corpus_built_once(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    root.mkdir()
    texts = {f"m{i}.py": f"x = {i}\n" * (i + 1) for i in range(6)}
    for name, text in texts.items():
        (root / name).write_text(text)
    files = sorted(root.glob("*.py"))
    monkeypatch.setattr(corpus_mod, "_stdlib_files", lambda: (root, files))
    out = stdlib_corpus(tmp_path / "cache", val_every=3)
    train = np.fromfile(out["train"], dtype=np.uint32)
    val = np.fromfile(out["val"], dtype=np.uint32)
    eos = 256
    expected_val = b"".join(texts[f"m{i}.py"].encode() + b"\x00" for i in (2, 5))
    assert (val == eos).sum() == 2 and (train == eos).sum() == 4
    assert bytes(val[val != eos].astype(np.uint8)) == expected_val.replace(b"\x00", b"")
    assert stdlib_corpus(tmp_path / "cache", val_every=3) == out  # cached
