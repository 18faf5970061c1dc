"""Nothing lost, ever: each way a run was seen to lose work, broken on purpose.

Damaged checkpoints (flipped bytes, truncated, zero-length, a bad manifest or
DCP metadata, NaN weights in an old checkpoint without a manifest) fall back to
the newest good one; non-finite state is never saved and stops the run; a run
folder in use is refused; SIGINT/SIGTERM stop after the step with a checkpoint;
a full disk is one line; a raised max_steps does not re-stretch the schedule.
Each test asserts the one-line message, the exit code, and that no good
checkpoint or metrics line was lost.
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from olmo2.cli.train import main
from olmo2.files import disk_full_error
from olmo2.train import ConfigError, Trainer
from olmo2.train import checkpoint as ckpt
from olmo2.train.optim import LRSchedule
from olmo2.train.runlock import LOCK_FILE, RunLock, RunLockedError
from olmo2.train.stability import NonFiniteStateError
from test_train_utils import make_config, synthetic_tokens

RUN = Path("runs") / "olmo2-test"
SHARD = "state/__0_0.distcp"


def cli(tmp_path, *extra):
    """``olmo2-train`` arguments of the ``test`` preset on a synthetic file in ``tmp_path``."""
    data = tmp_path / "syn.npy"
    if not data.exists():
        synthetic_tokens(data)
    return ["--preset=test", f"--out_dir={tmp_path / 'runs'}", f"--data.sources=[{{paths: [{data}]}}]", *extra]


def steps_logged(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_names(run_dir):
    return [p.name for _, p in ckpt.list_checkpoints(run_dir / "checkpoints")]


def one_line(err):
    """The ``olmo2-train:`` lines of stderr (the progress bar is off in the test preset)."""
    return [line for line in err.splitlines() if line.startswith("olmo2-train:")]


# ---------------------------------------------------------------------- damaged checkpoints
KEEP_ALL = ("--checkpoint.interval=1", "--checkpoint.keep_last=0", "--schedule.decay_steps=4")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run folder with verified checkpoints at steps 1 and 2 (and its data)."""
    base = tmp_path_factory.mktemp("base")
    assert main(cli(base, "--max_steps=2", *KEEP_ALL)) == 0
    return base


def _overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _damage(step, kind):
    shard = step / SHARD
    if kind.startswith("legacy"):
        (step / ckpt.MANIFEST_FILE).unlink()
    if kind in ("flip", "legacy-nan"):
        _overwrite(shard, shard.stat().st_size // 2, b"\xff" * 4096)  # 0xFFFFFFFF floats are NaN
    elif kind in ("truncate", "legacy-truncate"):
        os.truncate(shard, shard.stat().st_size // 2)
    elif kind == "zero":
        os.truncate(shard, 0)
    elif kind == "manifest":
        (step / ckpt.MANIFEST_FILE).write_text('{"files": {"state/')
    elif kind in ("metadata", "legacy-metadata"):
        os.truncate(step / "state" / ".metadata", 100)


# kind -> (the file the error names, what it says about it)
DAMAGE = {
    "flip": (SHARD, "does not match its sha256"),
    "truncate": (SHARD, "bytes, the manifest says"),
    "zero": (SHARD, "is 0 bytes, the manifest says"),
    "manifest": ("manifest.json", "is not valid JSON"),
    "metadata": ("state/.metadata", "is 100 bytes, the manifest says"),
    "legacy-truncate": (SHARD, "shorter than the"),
    "legacy-metadata": ("state/.metadata", "cannot be read"),
    "legacy-nan": ("state", "holds NaN or infinity ("),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_falls_back_to_the_last_good_one(two_checkpoints, tmp_path, kind, capsys):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    run = tmp_path / RUN
    step2 = run / "checkpoints" / "step00000002"
    _damage(step2, kind)
    file, problem = DAMAGE[kind]

    assert main(cli(tmp_path, "--max_steps=2", *KEEP_ALL)) == 0
    err = capsys.readouterr().err
    lines = one_line(err)
    named = [x for x in lines if x.startswith("olmo2-train: error: checkpoint step00000002: ")]
    assert len(named) == 1 and f"{file} " in named[0] and problem in named[0], err
    assert named[0].endswith(f"({step2 / file})"), named[0]
    assert any("FELL BACK to" in x and "step00000001" in x and "damaged-step00000002" in x for x in lines), err
    assert "resumed from" in err and "step00000001" in err
    # Nothing good lost: step 1 kept, step 2 trained again, the damaged one kept aside, one line per step.
    assert step_names(run) == ["step00000001", "step00000002"]
    assert (run / "checkpoints" / "damaged-step00000002").is_dir()
    assert steps_logged(run) == [1, 2]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step00000002")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000002"


def test_checkpoint_without_manifest_loads_with_a_warning(two_checkpoints, tmp_path, capsys):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    step2 = tmp_path / RUN / "checkpoints" / "step00000002"
    (step2 / ckpt.MANIFEST_FILE).unlink()
    assert main(cli(tmp_path, "--max_steps=3", *KEEP_ALL)) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "has no manifest.json" in err and "FELL BACK" not in err
    assert steps_logged(tmp_path / RUN) == [1, 2, 3]


def test_no_checkpoint_loads_refuses_to_start_from_scratch(two_checkpoints, tmp_path, capsys):
    shutil.copytree(two_checkpoints, tmp_path, dirs_exist_ok=True)
    run = tmp_path / RUN
    for step in ("step00000001", "step00000002"):
        _damage(run / "checkpoints" / step, "zero")
    metrics = (run / "metrics.jsonl").read_text()
    assert main(cli(tmp_path, "--max_steps=2", *KEEP_ALL)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("olmo2-train: no checkpoint in ") and "refusing to start from scratch" in last
    assert step_names(run) == ["step00000001", "step00000002"]  # nothing moved, nothing deleted
    assert (run / "metrics.jsonl").read_text() == metrics


# ---------------------------------------------------------------------- non-finite state
def test_nonfinite_weights_stop_at_once_and_save_nothing(tmp_path, monkeypatch, capsys):
    real_step = Trainer.train_step

    def poisoned(self, batch):
        if self.step == 1:
            with torch.no_grad():
                self.base_model.model.norm.weight.fill_(float("nan"))
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    assert main(cli(tmp_path, "--max_steps=4", "--checkpoint.interval=1", "--checkpoint.keep_last=1")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("olmo2-train: step 2: model.norm.weight holds NaN or infinity; stopping without saving")
    run = tmp_path / RUN
    assert step_names(run) == ["step00000001"] and steps_logged(run) == [1]


def test_no_save_or_prune_while_steps_are_nonfinite(tmp_path):
    cfg = make_config(tmp_path, max_steps=3, micro_batch_tokens=4 * 32,
                      **{"checkpoint.interval": 1, "checkpoint.keep_last": 1})
    trainer = Trainer(cfg)
    calls = {"n": 0}

    def nan_at_steps_2_and_3(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] in (2, 3) else output

    trainer.model.model.norm.register_forward_hook(nan_at_steps_2_and_3)
    saved = []
    real_save = trainer.checkpointer.save
    trainer.checkpointer.save = lambda step: saved.append(step) or real_save(step)
    with pytest.raises(Exception, match="no final checkpoint saved: the last 2 step"):
        trainer.fit()
    assert saved == [1]  # not at the non-finite step 2, not at the end
    assert step_names(trainer.run_dir) == ["step00000001"]  # keep_last=1 pruned nothing
    state = ckpt.read_trainer_state(trainer.ckpt_dir / "step00000001")
    assert state["consecutive_nonfinite"] == 0 and state["finite"] is True
    with pytest.raises(NonFiniteStateError, match="not saving"):
        with torch.no_grad():
            trainer.base_model.lm_head.weight[0, 0] = float("inf")
        ckpt.save_checkpoint(tmp_path / "other", 9, trainer.model, trainer.optimizer, {})
    assert not (tmp_path / "other").exists()


def test_keep_last_keeps_the_newest_finite_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step, finite in ((1, True), (2, True), (3, None)):  # 3: saved before the flag existed
        folder = root / ckpt.step_dirname(step)
        folder.mkdir(parents=True)
        record = {"step": step} if finite is None else {"step": step, "finite": finite}
        (folder / ckpt.TRAINER_FILE).write_text(json.dumps(record))
    (root / "latest").write_text("step00000003\n")
    removed = ckpt.prune_checkpoints(root, keep_last=1)
    assert [p.name for p in removed] == ["step00000001"]
    assert step_names(tmp_path) == ["step00000002", "step00000003"]


# ---------------------------------------------------------------------- the run-folder lock
def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tmp_path, capsys):
    run = tmp_path / RUN
    with RunLock(run):
        assert main(cli(tmp_path, "--max_steps=2")) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"olmo2-train: run folder {run} is in use by pid {os.getpid()} on host "
                               f"{socket.gethostname()} since ")
        assert last.endswith(f"({run / LOCK_FILE})")
        with pytest.raises(RunLockedError):
            RunLock(run).acquire()
    assert not (run / "metrics.jsonl").exists()
    # A lock file left by a process that died (SIGKILL leaves its content, the kernel drops the flock).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0}))
    assert main(cli(tmp_path, "--max_steps=2")) == 0
    err = capsys.readouterr().err
    assert f"olmo2-train: taking over the lock of {run} left by pid {dead.pid}" in err
    assert "which is no longer running" in err
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly


# ---------------------------------------------------------------------- signals
def _signal_at_step(monkeypatch, at_step, signals):
    real_step = Trainer.train_step

    def step(self, batch):
        if self.step + 1 == at_step:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)


def test_sigterm_in_process_finishes_the_step_and_saves(tmp_path, monkeypatch, capsys):
    _signal_at_step(monkeypatch, 2, [signal.SIGTERM])
    assert main(cli(tmp_path, "--max_steps=6", "--checkpoint.interval=0")) == 143
    err = capsys.readouterr().err
    assert "olmo2-train: SIGTERM received: finishing this step" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("olmo2-train: stopped by SIGTERM after step 2; checkpoint ") and "step00000002 saved" in last
    run = tmp_path / RUN
    assert step_names(run) == ["step00000002"] and steps_logged(run) == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch, capsys):
    _signal_at_step(monkeypatch, 2, [signal.SIGINT, signal.SIGINT])
    assert main(cli(tmp_path, "--max_steps=6", "--checkpoint.interval=1")) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("olmo2-train: stopped at once by a second SIGINT; nothing more was saved, "
                           "the newest checkpoint is ")
    run = tmp_path / RUN
    assert step_names(run) == ["step00000001"] and steps_logged(run) == [1]
    assert (run / LOCK_FILE).read_text() == ""  # the lock was released on the way out


def _start(tmp_path, name):
    args = cli(tmp_path, f"--run_name={name}", "--max_steps=100000", "--schedule.decay_steps=100000",
               "--checkpoint.interval=0", "--kernel_backend=torch")
    return subprocess.Popen([sys.executable, "-m", "olmo2.cli.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_a_step(proc, metrics, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run exited {proc.returncode} before its first step: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no step logged in time")


@pytest.mark.slow
def test_signals_and_a_concurrent_run_in_real_processes(tmp_path, capsys):
    """Two real runs: a second run on the first's folder is refused while it lives;
    SIGINT and SIGTERM, sent once a step is logged, each end their run after the
    step with a checkpoint, exit 130 / 143; resuming continues with no line lost."""
    runs = {"a": signal.SIGINT, "b": signal.SIGTERM}
    procs = {name: _start(tmp_path, name) for name in runs}
    try:
        for name, proc in procs.items():
            _wait_for_a_step(proc, tmp_path / "runs" / name / "metrics.jsonl")
        assert main(cli(tmp_path, "--run_name=a", "--max_steps=100000", "--schedule.decay_steps=100000")) == 2
        refusal = capsys.readouterr().err.strip().splitlines()[-1]
        assert refusal.startswith(f"olmo2-train: run folder {tmp_path / 'runs' / 'a'} is in use by "
                                  f"pid {procs['a'].pid} on host {socket.gethostname()}")
        for name, signum in runs.items():
            procs[name].send_signal(signum)
        results = {name: proc.communicate(timeout=120) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, signum in runs.items():
        proc, (out, err) = procs[name], results[name]
        assert proc.returncode == 128 + signum, err
        run = tmp_path / "runs" / name
        logged = steps_logged(run)
        last = err.strip().splitlines()[-1]
        step = logged[-1]
        assert last == (f"olmo2-train: stopped by {signal.Signals(signum).name} after step {step}; checkpoint "
                        f"{run / 'checkpoints' / ckpt.step_dirname(step)} saved; run the same command again "
                        "to continue"), err
        assert logged == list(range(1, step + 1))
        assert step_names(run) == [ckpt.step_dirname(step)]
        assert ckpt.verify_checkpoint(run / "checkpoints" / ckpt.step_dirname(step))
    # Resume one for a step: the file grows by exactly that step.
    b = tmp_path / "runs" / "b"
    stop = steps_logged(b)[-1] + 1
    assert main(cli(tmp_path, "--run_name=b", "--max_steps=100000", "--schedule.decay_steps=100000",
                    f"--hard_stop={stop}", "--checkpoint.interval=0")) == 0
    assert steps_logged(b) == list(range(1, stop + 1))


# ---------------------------------------------------------------------- a full disk
def test_no_space_left_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from torch.distributed.checkpoint import filesystem

    real_write = filesystem._write_item
    saves = {"n": 0}

    def full_disk(*args, **kwargs):
        if saves["n"] >= 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(*args, **kwargs)

    real_save = ckpt.save_checkpoint

    def counting_save(*args, **kwargs):
        try:
            return real_save(*args, **kwargs)
        finally:
            saves["n"] += 1

    monkeypatch.setattr(filesystem, "_write_item", full_disk)
    monkeypatch.setattr(ckpt, "save_checkpoint", counting_save)
    assert main(cli(tmp_path, "--max_steps=4", "--checkpoint.interval=1")) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    root = tmp_path / RUN / "checkpoints"
    assert last == f"olmo2-train: no space left on device ({root / '.tmp-step00000002'})", err
    assert "Traceback" not in err
    assert step_names(tmp_path / RUN) == ["step00000001"] and not (root / ".tmp-step00000002").exists()
    assert steps_logged(tmp_path / RUN) == [1, 2]
    assert ckpt.verify_checkpoint(root / "step00000001")
    monkeypatch.setenv("OLMO2_DEBUG", "1")
    saves["n"] = 1
    assert main(cli(tmp_path, "--max_steps=4", "--checkpoint.interval=1", "--schedule.decay_steps=4")) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_short_write_on_a_full_disk_is_named(tmp_path, monkeypatch):
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    full = disk_full_error(short, tmp_path / "x")
    assert full.errno == errno.ENOSPC and full.filename == str(tmp_path / "x")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 1 << 30, 9 << 30))
    assert disk_full_error(short, tmp_path / "x") is None
    assert disk_full_error(ValueError("other"), tmp_path) is None


# ---------------------------------------------------------------------- the schedule horizon
def test_raising_max_steps_on_a_finished_run_keeps_the_schedule(tmp_path, capsys):
    run = tmp_path / RUN
    assert main(cli(tmp_path, "--max_steps=3", "--schedule.warmup_steps=1")) == 0
    config = (run / "config.yaml").read_text()
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()

    assert main(cli(tmp_path, "--max_steps=6", "--schedule.warmup_steps=1")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("olmo2-train: resuming ") and "would change the learning-rate schedule" in last
    assert "decay_steps 3 -> 6" in last and "add --schedule.decay_steps=3" in last and "--hard_stop=N" in last
    assert (run / "config.yaml").read_text() == config and steps_logged(run) == [1, 2, 3]

    assert main(cli(tmp_path, "--max_steps=6", "--schedule.warmup_steps=1", "--schedule.decay_steps=3")) == 0
    after = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert after[:3] == lrs and after[3:] == pytest.approx([lrs[-1]] * 3)  # no jump: the schedule's tail
    assert (run / "config.before-step00000003.yaml").read_text() == config


def test_hard_stop_ends_early_without_changing_the_schedule(tmp_path):
    early = make_config(tmp_path, max_steps=4, hard_stop=2)
    assert early.stop_step == 2
    first = Trainer(early)
    first.fit()
    assert first.step == 2 and step_names(first.run_dir) == ["step00000002"]
    rest = Trainer(make_config(tmp_path, max_steps=4))  # no hard stop: the same schedule, no refusal
    rest.fit()
    lrs = [h["lr"] for h in first.history + rest.history]
    assert lrs == [LRSchedule(1e-2, "cosine", 1, 4, 0.1)(k) for k in range(1, 5)]
    with pytest.raises(ConfigError, match=r"hard_stop \(5\) must be <= max_steps \(4\)"):
        make_config(tmp_path, max_steps=4, hard_stop=5)


# ---------------------------------------------------------------------- the tokenizer travels with the data
def test_own_data_export_then_generate(tmp_path, capsys):
    from olmo2.cli import generate, tokenize
    from test_tokenize import word_tokenizer_json

    tok = word_tokenizer_json(tmp_path)
    words = ["hello", "world", "olmo", "two"]
    text = "\n".join(" ".join(words[(i * 7 + j) % 4] for j in range(9)) for i in range(300))
    (tmp_path / "corpus.txt").write_text(text)
    data = tmp_path / "data" / "train.npy"
    assert tokenize.main([str(tmp_path / "corpus.txt"), "--out", str(data), "--tokenizer", str(tok),
                          "--doc-per-line", "--no-progress"]) == 0
    assert json.loads((tmp_path / "data" / "train.npy.json").read_text())["tokenizer"] == str(tok.resolve())
    args = ["--preset=test", f"--out_dir={tmp_path / 'runs'}", f"--data.sources=[{{paths: [{data}]}}]",
            "--max_steps=2", "--checkpoint.export_hf=true"]
    assert main(args) == 0
    run = tmp_path / RUN
    assert (run / "hf" / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert (run / "checkpoints" / "step00000002" / "tokenizer.json").read_bytes() == tok.read_bytes()
    capsys.readouterr()
    prompt = ["--prompt", "hello world", "--max-new-tokens", "3", "--device", "cpu"]
    assert generate.main(["--model", str(run), *prompt]) == 0  # the run folder itself: its hf/
    from_run = capsys.readouterr().out
    assert len(from_run.split()) == 3 and set(from_run.split()) <= set(words) | {"[UNK]"}
    assert generate.main(["--model", str(run / "checkpoints"), *prompt]) == 0  # a trainer checkpoint
    assert capsys.readouterr().out == from_run
    assert main([*args, "--data.tokenizer=byte", "--run_name=bytes"]) == 0
    from tokenizers import Tokenizer

    exported = Tokenizer.from_file(str(tmp_path / "runs" / "bytes" / "hf" / "tokenizer.json"))
    assert exported.token_to_id("<|endoftext|>") == 256
