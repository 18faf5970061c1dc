"""A checkpoint step that fails on one rank fails on every rank, at once and in one line.

Two gloo ranks (spawned) save a small model's checkpoint while one step fails on
one rank only: rank 0 cannot make the folder (the checkpoint root is a regular
file), rank 1 cannot write its RNG file, rank 0's rename into place fails, and
rank 0's publish fails in a background save. Each time both ranks raise the same
``CheckpointError`` naming the checkpoint and the failing rank within seconds
(the process group's timeout is 30 s, and the test joins with a deadline, so a
regression fails instead of hanging: before, the other rank waited in a barrier
for the 30-minute default), no ``.tmp-*`` folder is left, and the next save
works. On load, an RNG file that only rank 1 reads as damaged is judged damaged
by both ranks, which fall back to the same older checkpoint and log the same
lines (the damaged one moved aside under the name rank 0 gave it).
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import free_port, spawn_with_deadline

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

DEADLINE_S = 120  # the whole two-rank run; each failure must be agreed on within FAIL_S
FAIL_S = 10.0


def _attempt(fn) -> tuple[str | None, float]:
    """(the error's type and message, or None; seconds taken)."""
    t0 = time.perf_counter()
    try:
        fn()
        return None, time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - compared across the ranks by the test
        return f"{type(exc).__name__}: {exc}", time.perf_counter() - t0


def _worker(rank: int, world: int, port: int, root: str) -> None:
    from olmo2.train import checkpoint as ckpt
    from olmo2.train.parallel import destroy_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        out: dict[str, object] = {}
        base = Path(root)

        def save(where, step):
            return ckpt.save_checkpoint(where, step, model, None, {"tokens_seen": 0})

        # 1. rank 0 cannot make the folder: the checkpoint root is a regular file.
        blocked = base / "blocked"
        out["mkdir"] = _attempt(lambda: save(blocked, 1))
        dist.barrier()
        if rank == 0:
            blocked.unlink()
        dist.barrier()
        out["mkdir_then"] = _attempt(lambda: save(blocked, 1))

        # 2. rank 1 cannot write its RNG file.
        real_save = torch.save

        def rng_fails(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == "rng":
                raise PermissionError(13, "Permission denied (simulated)", str(f))
            return real_save(obj, f, *args, **kwargs)

        runs = base / "runs"
        out["first"] = _attempt(lambda: save(runs, 1))
        if rank == 1:
            torch.save = rng_fails
        try:
            out["rng"] = _attempt(lambda: save(runs, 2))
        finally:
            torch.save = real_save

        # 3. rank 0's rename into place fails.
        real_publish = ckpt._publish

        def publish_fails(*args, **kwargs):
            raise OSError(30, "Read-only file system (simulated)")

        ckpt._publish = publish_fails
        try:
            out["publish"] = _attempt(lambda: save(runs, 3))
        finally:
            ckpt._publish = real_publish
        out["after"] = _attempt(lambda: save(runs, 4))

        # 4. the same in a background save (collectives on a gloo group of their own).
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=30))
        with ThreadPoolExecutor(max_workers=1) as pool:
            ckpt._publish = publish_fails
            try:
                pending = ckpt.save_checkpoint_async(runs, 5, model, None, {"tokens_seen": 0}, pool,
                                                     process_group=group)
                out["async"] = _attempt(lambda: pending.future.result(timeout=60))
            finally:
                ckpt._publish = real_publish
        out["tmp_left"] = sorted(p.name for p in base.rglob(".tmp-*"))
        out["steps"] = [step for step, _ in ckpt.list_checkpoints(runs)]

        # 5. load: rank 1 finds its RNG file of step 4 damaged; both ranks fall back to step 1
        # (verify="size": the checksum on rank 0 would find it first, for both ranks).
        dist.barrier()
        if rank == 1:  # the same size, so the size check on rank 0 passes: only rank 1's load sees it
            damaged = runs / "step00000004" / "rng" / "rank00001.pt"
            damaged.write_bytes(b"x" * damaged.stat().st_size)
        dist.barrier()
        lines: list[str] = []
        found = {}

        def load():
            path, _ = ckpt.load_newest_good(runs, model, verify="size", log=lines.append, move_damaged=True)
            found["path"] = path.name

        out["load"] = _attempt(load)
        out["loaded"] = found.get("path")
        out["load_log"] = lines
        Path(root, f"rank{rank}.json").write_text(json.dumps(out))
        del model, pending, group
    finally:
        # Joins the gloo threads before the interpreter exits (a thread still dropping a
        # collective's tensors at shutdown aborts the process: see destroy_distributed).
        destroy_distributed()


def test_a_save_step_failing_on_one_rank_fails_on_every_rank_at_once(tmp_path):
    (tmp_path / "blocked").write_text("a file where the checkpoint folder should be")
    world = 2
    spawn_with_deadline(_worker, (world, free_port(), str(tmp_path)), world, DEADLINE_S)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    r0, r1 = ranks

    def agreed(case: str, failing_rank: int, *words: str) -> str:
        (e0, t0), (e1, t1) = r0[case], r1[case]
        assert e0 is not None and e0 == e1, (case, e0, e1)
        assert e0.startswith("CheckpointError: ") and "\n" not in e0
        assert f"failed on rank {failing_rank} of 2" in e0, e0
        for word in words:
            assert word in e0, (word, e0)
        assert t0 < FAIL_S and t1 < FAIL_S, (case, t0, t1)
        return e0

    agreed("mkdir", 0, "step00000001", str(tmp_path / "blocked" / ".tmp-step00000001"))
    agreed("rng", 1, "step00000002", "Permission denied (simulated)", ".tmp-step00000002")
    agreed("publish", 0, "step00000003", "Read-only file system (simulated)")
    agreed("async", 0, "step00000005", "Read-only file system (simulated)")
    for case in ("mkdir_then", "first", "after"):
        assert r0[case][0] is None and r1[case][0] is None, case
    assert r0["tmp_left"] == [] and r1["tmp_left"] == []
    assert r0["steps"] == r1["steps"] == [1, 4]

    assert r0["load"][0] is None and r1["load"][0] is None, (r0["load"], r1["load"])
    assert r0["loaded"] == r1["loaded"] == "step00000001"
    assert r0["load_log"] == r1["load_log"]
    assert "rank 1 of 2: checkpoint step00000004: rng/rank00001.pt cannot be loaded" in r0["load_log"][0]
    assert "FELL BACK to" in r0["load_log"][-1] and "moved aside as damaged-step00000004" in r0["load_log"][-1]
    assert (tmp_path / "runs" / "damaged-step00000004").is_dir()
    assert (tmp_path / "runs" / "latest").read_text().strip() == "step00000001"


def _cli_worker(rank: int, world: int, port: int, runs: list, root: str) -> None:
    import contextlib

    from olmo2.cli import rl, sft, train
    from olmo2.train.parallel import destroy_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # The commands join this group (one spawn for all of them); its 30 s timeout turns a rank
    # left waiting into an error, and the test's deadline catches the rest.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        for name, argv in runs:
            main = {"train": train.main, "sft": sft.main, "rl": rl.main}[name]
            with open(Path(root, f"{name}.stderr{rank}.txt"), "w") as err, contextlib.redirect_stderr(err):
                code = main(argv)
            Path(root, f"{name}.code{rank}.txt").write_text(str(code))
    finally:
        destroy_distributed()  # olmo2-train, run last, already left the group at its end


def test_every_command_stops_every_rank_in_one_line_when_the_save_fails_on_one(tmp_path):
    """olmo2-train, olmo2-sft and olmo2-rl on two ranks whose checkpoint folder cannot be made
    (a regular file where it should be, so rank 0's mkdir fails): both ranks exit 2 with the
    same one line. (olmo2-dpo saves through the same PostTrainCheckpointer as olmo2-sft.)"""
    from olmo2.checkpoint_hf import save_pretrained
    from olmo2.tokenizers import save_tokenizer
    from test_sft import tiny
    from test_train_utils import synthetic_tokens

    data = synthetic_tokens(tmp_path / "syn.npy")
    run = tmp_path / "runs" / "blocked"
    run.mkdir(parents=True)
    (run / "checkpoints").write_text("not a folder")
    base = tmp_path / "base"
    save_pretrained(tiny(vocab=258), base)
    save_tokenizer("byte", base)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Add {a} and {a + 1}"},
                                                     {"role": "assistant", "content": f"{2 * a + 1}"}]}) + "\n"
                            for a in range(4)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Add {a} and {a + 1}", "verifier": "gsm8k",
                                           "reference": str(2 * a + 1)}) + "\n" for a in range(4)))
    blocked = {name: tmp_path / f"{name}-checkpoints" for name in ("sft", "rl")}
    for path in blocked.values():
        path.write_text("not a folder")
    runs = [  # olmo2-train last: it leaves the process group when it ends
        ("sft", ["--model", str(base), "--data", str(chat), "--output", str(tmp_path / "sft"), "max_length=64",
                 "micro_batch_size=1", "grad_accum=2", "max_steps=1", "device=cpu",
                 f"checkpoint_dir={blocked['sft']}"]),
        ("rl", ["--model", str(base), "--data", str(prompts), "--output", str(tmp_path / "rl"), "steps=1",
                "prompts_per_step=2", "k=2", "max_new_tokens=2", "max_prompt_length=64", "beta=0", "device=cpu",
                f"checkpoint_dir={blocked['rl']}"]),
        ("train", ["--preset=test", f"--out_dir={tmp_path / 'runs'}", "--run_name=blocked",
                   "--parallel.strategy=fsdp", f"--data.sources=[{{paths: [{data}]}}]", "--max_steps=2",
                   "--checkpoint.export_hf=false", "--progress=false", "--tensorboard=false"]),
    ]
    spawn_with_deadline(_cli_worker, (2, free_port(), runs, str(tmp_path)), 2, DEADLINE_S)
    tmp = {"train": run / "checkpoints" / ".tmp-step00000002", "sft": blocked["sft"] / ".tmp-step00000001",
           "rl": blocked["rl"] / ".tmp-step00000001"}
    for name, _ in runs:
        last = []
        for rank in range(2):
            assert (tmp_path / f"{name}.code{rank}.txt").read_text() == "2", name
            last.append((tmp_path / f"{name}.stderr{rank}.txt").read_text().strip().splitlines()[-1])
        assert last[0] == last[1], last
        step = tmp[name].name.removeprefix(".tmp-")
        assert last[0].startswith(f"olmo2-{name}: saving checkpoint {step} failed on rank 0 of 2: "), last[0]
        assert last[0].endswith(f"({tmp[name]})"), last[0]
