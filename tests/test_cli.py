"""Every command's --help exits 0 and lists its options with their defaults."""
import pytest

from olmo2.cli import generate, soup, tokenize, train


@pytest.mark.parametrize("module,expect", [
    (generate, ["--max-new-tokens", "(default: 64)"]),
    (tokenize, ["--ngram-filter", "(default: byte)"]),
    (soup, ["--out", "--dtype"]),
], ids=["olmo2-generate", "olmo2-tokenize", "olmo2-soup"])
def test_help_exits_zero(module, expect, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: olmo2-")
    for text in expect:
        assert text in out


def test_train_help_exits_zero(capsys):
    assert train.main(["--help"]) == 0
    assert "--schedule.warmup_steps=20" in capsys.readouterr().out


def test_tokenize_error_is_one_line(tmp_path, capsys):
    assert tokenize.main([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o.npy"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("olmo2-tokenize: ") and err.count("\n") == 1
