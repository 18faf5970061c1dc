"""Every command's --help exits 0 and lists its options with their defaults."""
import pytest

from olmo2.cli import generate, soup, tokenize, train


@pytest.mark.parametrize("module,expect", [
    (generate, ["--max-new-tokens", "(default: 64)"]),
    (tokenize, ["--ngram-filter", "(default: dolma2)"]),
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


def test_bench_report_on_a_missing_or_bad_file_is_one_line(tmp_path, capsys):
    from benchmarks.cli import main as bench

    (tmp_path / "bad.json").write_text('{"schema": ')
    (tmp_path / "other.json").write_text('{"schema": 1}')
    for name, what in (("missing.json", "no such file"), ("bad.json", "not an olmo2-bench result file: Expecting"),
                       ("other.json", "not an olmo2-bench result file: missing key 'kind'")):
        assert bench(["report", str(tmp_path / name), "--no-plots"]) == 2
        err = capsys.readouterr().err
        assert err == f"olmo2-bench report: {err.split(': ', 1)[1]}" and err.count("\n") == 1
        assert what in err and err.rstrip().endswith(f"({tmp_path / name})")


@pytest.mark.parametrize("argv,message", [
    (["kernels", "--threads", "0"], "olmo2-bench: --threads must be a positive int, got 0"),
    (["generate", "--k", "0"], "olmo2-bench generate: --k must be a positive int, got 0"),
    (["generate", "--batch-sizes", "0"], "olmo2-bench generate: --batch-sizes must be positive ints, got [0]"),
])
def test_bench_bad_arguments_are_one_line_exit_2(argv, message, tmp_path, capsys):
    from benchmarks.cli import main as bench

    assert bench(argv + ["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("module", [generate, soup, tokenize])
def test_debug_flag_is_listed(module, capsys):
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert "--debug" in capsys.readouterr().out


def test_train_debug_shows_the_traceback(capsys, monkeypatch):
    assert train.main(["--preset=nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("olmo2-train: preset must be one of") and "Traceback" not in err
    assert train.main(["--preset=nope", "--debug"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("OLMO2_DEBUG", "1")
    assert train.main(["--preset=nope"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_dry_run_checks_device_and_backend(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device=cuda is valid here")
    assert train.main(["--device=cuda", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("olmo2-train: device=cuda but this machine has no usable CUDA device") and err.count("\n") == 1
    assert train.main(["--kernel_backend=cuda", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("olmo2-train: kernel_backend=cuda cannot run on cpu: ")


@pytest.mark.parametrize("prog,trainer,entry", [
    ("olmo2-sft", "olmo2.sft", "train_sft"),
    ("olmo2-dpo", "olmo2.dpo", "train_dpo"),
    ("olmo2-rl", "olmo2.rl.trainer", "train_rl"),
])
def test_posttraining_divergence_is_one_line(prog, trainer, entry, tmp_path, monkeypatch, capsys):
    """A run that diverges stops with the trainer's FloatingPointError: one line, exit 2, no traceback."""
    import importlib

    from olmo2.cli import dpo, rl, sft

    def diverged(cfg):
        raise FloatingPointError(f"{prog}: non-finite loss nan at step 3")

    monkeypatch.setattr(importlib.import_module(trainer), entry, diverged)
    main = {"olmo2-sft": sft.main, "olmo2-dpo": dpo.main, "olmo2-rl": rl.main}[prog]
    assert main(["--model", "m", "--data", "d", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"{prog}: non-finite loss nan at step 3\n"


def test_train_rerun_of_a_finished_run_says_nothing_was_left(tmp_path, capsys):
    # The README's "the same command resumes": on a finished run it resumes at the last step and runs none.
    argv = ["--preset=test", f"--out_dir={tmp_path}", "--max_steps=2", "--device=cpu"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "done at step 2, loss " in out and "loss None" not in out
    assert train.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("olmo2-train: done at step 2, no step left to run") and "None" not in out
