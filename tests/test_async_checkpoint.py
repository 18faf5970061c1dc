"""Checkpoints written in the background (``checkpoint.async_save``).

* Training goes on while a save is in flight: the background write of the
  step-N checkpoint is held until the main thread has finished two more steps;
  the recorded order of events shows those steps before the write completes
  (a synchronous save would wait forever there and fail the run).
* A save that fails in the background stops the run with one line naming the
  step, removes its temporary folder and leaves the previous checkpoint intact
  and loadable; a rerun resumes from it.
* A process killed during the background write leaves the previous checkpoint
  and ``latest`` as they were; resume picks it and ends bitwise equal to a run
  saving synchronously.
* Runs with async saves end bitwise equal to runs with synchronous saves, in
  one process and with two gloo ranks (FSDP2), and their checkpoints verify.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from olmo2.cli.train import main
from olmo2.train import Trainer
from olmo2.train import checkpoint as ckpt
from test_train_utils import make_config, synthetic_tokens

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path, max_steps=6, **extra):
    # A fixed decay horizon so runs of different lengths share one schedule.
    return make_config(tmp_path, max_steps=max_steps, **{"schedule.decay_steps": 8, "checkpoint.interval": 2,
                                                         "checkpoint.keep_last": 0, **extra})


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.base_model.state_dict().items()}


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory):
    """Weights after 6 steps saving synchronously at 2, 4 and 6."""
    trainer = Trainer(config(tmp_path_factory.mktemp("sync"), **{"checkpoint.async_save": False}))
    assert trainer.checkpointer.async_save is False
    trainer.fit()
    return weights(trainer)


def test_async_is_off_on_cpu_by_default(tmp_path):
    trainer = Trainer(config(tmp_path))
    try:
        assert trainer.cfg.checkpoint.async_save is None and trainer.checkpointer.async_save is False
    finally:
        trainer.close()


def test_training_continues_while_a_save_is_in_flight(tmp_path, monkeypatch, synchronous):
    events: list[tuple[str, int]] = []
    released = {step: threading.Event() for step in (2, 4)}
    real_step, real_write_rest = Trainer.train_step, ckpt._write_rest

    def recorded_step(self, batch):
        result = real_step(self, batch)
        events.append(("step", self.step))
        if self.step - 2 in released:
            released[self.step - 2].set()  # two steps after a save: let its write finish
        return result

    def held_write_rest(tmp, record, *args):
        step = record["step"]
        if step not in released:  # the final save (synchronous)
            return real_write_rest(tmp, record, *args)
        events.append(("writing", step))
        if not released[step].wait(timeout=120):
            raise TimeoutError(f"the trainer did not run two steps past the save of step {step}")
        real_write_rest(tmp, record, *args)
        events.append(("written", step))

    monkeypatch.setattr(Trainer, "train_step", recorded_step)
    monkeypatch.setattr(ckpt, "_write_rest", held_write_rest)
    trainer = Trainer(config(tmp_path, **{"checkpoint.async_save": True}))
    trainer.fit()
    for saved in (2, 4):
        assert events.index(("step", saved + 2)) < events.index(("written", saved)), events
        assert events.index(("step", saved)) < events.index(("writing", saved)), events
    root = trainer.ckpt_dir
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4, 6]
    assert (root / "latest").read_text().strip() == "step00000006"
    for _, path in ckpt.list_checkpoints(root):
        assert ckpt.verify_checkpoint(path) is True
    assert not list(root.glob(".tmp-*"))
    assert_bitwise(weights(trainer), synchronous)

    # Resuming the step-4 checkpoint written in the background ends where the synchronous run did.
    resumed = Trainer(config(tmp_path, resume=str(root / "step00000004"), run_name="resumed",
                             **{"checkpoint.async_save": True}))
    assert resumed.step == 4
    resumed.fit()
    assert_bitwise(weights(resumed), synchronous)


def test_failed_background_save_stops_the_run_and_keeps_the_previous_one(tmp_path, monkeypatch, capsys,
                                                                         synchronous):
    real_write_rest = ckpt._write_rest

    def failing(tmp, record, *args):
        if record["step"] == 4:
            raise OSError(28, "No space left on device (simulated)")
        real_write_rest(tmp, record, *args)

    monkeypatch.setattr(ckpt, "_write_rest", failing)
    cfg = config(tmp_path, **{"checkpoint.async_save": True})
    argv = ["--preset=test", f"--out_dir={cfg.out_dir}", f"--data.sources=[{{paths: [{tmp_path / 'syn.npy'}]}}]",
            "--max_steps=6", "--schedule.decay_steps=8", "--checkpoint.interval=2", "--checkpoint.keep_last=0",
            "--checkpoint.async_save=true"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("olmo2-train: step 4: saving checkpoint step00000004 in the background failed"), err
    assert "no space left" in last.lower() and "step00000002" in last
    root = Path(cfg.run_dir) / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
    assert (root / "latest").read_text().strip() == "step00000002"
    assert not (root / ".tmp-step00000004").exists()
    assert ckpt.verify_checkpoint(root / "step00000002") is True

    monkeypatch.setattr(ckpt, "_write_rest", real_write_rest)
    resumed = Trainer(cfg)
    assert resumed.step == 2
    resumed.fit()
    assert_bitwise(weights(resumed), synchronous)


KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, "tests")
    from olmo2.train import Trainer
    from olmo2.train import checkpoint as ckpt
    from test_async_checkpoint import config
    real = ckpt._write_rest
    def stall(tmp, record, *args):
        if record["step"] == 4:
            Path(sys.argv[2]).write_text("writing")
            time.sleep(600)
        real(tmp, record, *args)
    ckpt._write_rest = stall
    Trainer(config(Path(sys.argv[1]), **{"checkpoint.async_save": True})).fit()
""")


def test_killed_during_background_save_resumes_from_the_previous_one(tmp_path, synchronous):
    marker = tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path), str(marker)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the background save never started"
            time.sleep(0.1)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    root = Path(config(tmp_path).run_dir) / "checkpoints"
    assert (root / ".tmp-step00000004" / "state").is_dir()  # the interrupted write
    assert (root / "latest").read_text().strip() == "step00000002"
    resumed = Trainer(config(tmp_path, **{"checkpoint.async_save": True}))
    assert resumed.step == 2
    resumed.fit()
    assert_bitwise(weights(resumed), synchronous)
    assert not (root / ".tmp-step00000004").exists()


# ---------------------------------------------------------------------- two gloo ranks
def _worker(rank: int, world: int, port: int, argv: list) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = main(argv)
    if code:
        raise SystemExit(code)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_rank_fsdp_async_saves_equal_synchronous_ones(tmp_path):
    import torch.multiprocessing as mp
    from gloo_ranks import free_port

    data = synthetic_tokens(tmp_path / "syn.npy")
    for mode in ("true", "false"):
        argv = ["--preset=test", f"--out_dir={tmp_path}", f"--run_name=async-{mode}", "--parallel.strategy=fsdp",
                f"--data.sources=[{{paths: [{data}]}}]", "--max_steps=4", "--checkpoint.interval=2",
                "--checkpoint.keep_last=0", "--checkpoint.export_hf=false", f"--checkpoint.async_save={mode}",
                "--progress=false", "--tensorboard=false"]
        mp.spawn(_worker, args=(2, free_port(), argv), nprocs=2, join=True)
    for step in ("step00000002", "step00000004"):
        paths = [tmp_path / f"async-{mode}" / "checkpoints" / step for mode in ("true", "false")]
        assert all(ckpt.verify_checkpoint(p) for p in paths)
        background, synchronous = (ckpt.load_model_from_checkpoint(p).state_dict() for p in paths)
        assert_bitwise(background, synchronous)
        assert ckpt.read_trainer_state(paths[0])["world_size"] == 2
