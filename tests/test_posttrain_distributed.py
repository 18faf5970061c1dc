"""SFT and DPO on two CPU ranks (gloo): FSDP2 and DDP end with the weights of one
process with the same global batch and log the same held-out evaluation, and a
checkpoint written by two ranks resumes in one. One spawn runs every two-rank command (a process group each time would
cost more than the runs)."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from olmo2.checkpoint_hf import save_pretrained
from olmo2.tokenizers import save_tokenizer
from gloo_ranks import assert_released, free_port, join_gloo, leave_and_record
from test_sft import tiny

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.slow]

# 9 conversations / pairs, 4 per step, 3 steps: the last step has 1 micro-batch, so rank 1 runs a
# copy with no targets (SFT) or weighted 0 (DPO); so does the reference pass (9 batches of 1).
# adam_eps 1e-4 keeps Adam's g / (|g| + eps) smooth, so different reduction orders differ in the
# weights by rounding only (as tests/test_distributed.py).
COMMON = ["max_length=64", "micro_batch_size=1", "grad_accum=4", "warmup_ratio=0.25", "adam_eps=1e-4",
          "save_interval=2", "keep_last=0", "device=cpu"]
SFT = [*COMMON, "packing=false", "lr=1e-2", "epochs=1"]
DPO = [*COMMON, "lr=5e-3", "beta=1.0", "epochs=1"]


def even_sum_verifiers() -> dict:
    """The verifier registry with test_even_sum (code points summing to an even number: a random tiny model
    answers about half right), for eval.prompts."""
    import olmo2.rl.verifiers as V

    return {**V.VERIFIERS, "test_even_sum": lambda text, ref: sum(map(ord, text)) % 2 == 0}


def _worker(rank: int, world: int, port: int, runs: list, teardown: str) -> None:
    import olmo2.rl.verifiers as V
    from olmo2.cli import dpo, sft

    V.VERIFIERS = even_sum_verifiers()
    join_gloo(rank, world, port)
    try:
        for command, argv in runs:
            code = (sft if command == "sft" else dpo).main(argv)
            if code:
                raise SystemExit(f"rank {rank}: olmo2-{command} {argv} exited {code}")
    finally:
        leave_and_record(f"{teardown}{rank}.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from olmo2.cli import dpo, sft

    root = tmp_path_factory.mktemp("posttrain_dist")
    base = root / "base"
    save_pretrained(tiny(vocab=258), base)
    save_tokenizer("byte", base)
    chat, prefs = root / "chat.jsonl", root / "prefs.jsonl"
    # 5 held-out records, one per forward: rank 1 scores 2 and runs one copy that counts for nothing
    held_chat, held_prefs = root / "held_chat.jsonl", root / "held_prefs.jsonl"
    held_chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Add {a} and {a + 2}"},
                                                          {"role": "assistant", "content": f"{2 * a + 2}"}]}) + "\n"
                                 for a in range(20, 25)))
    held_prefs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Add {a} and {a + 2}"}],
                                              "chosen": [{"role": "assistant", "content": f"{2 * a + 2}"}],
                                              "rejected": [{"role": "assistant", "content": f"{2 * a} or so"}]})
                                  + "\n" for a in range(20, 25)))
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Add {a} and {a + 1}"},
                                                     {"role": "assistant", "content": f"{2 * a + 1}"}]}) + "\n"
                            for a in range(9)))
    prefs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Add {a} and {a + 1}"}],
                                         "chosen": [{"role": "assistant", "content": f"{2 * a + 1}"}],
                                         "rejected": [{"role": "assistant", "content": f"{2 * a + 2} or so"}]})
                             + "\n" for a in range(9)))

    # 5 prompts with a verifier: rank 0 answers 3 of them, rank 1 2 (greedy; the weights gathered under FSDP2)
    held_prompts = root / "held_prompts.jsonl"
    held_prompts.write_text("".join(json.dumps({"prompt": f"Add {a} and {a + 3}", "verifier": "test_even_sum",
                                                "reference": str(2 * a + 3)}) + "\n" for a in range(5)))

    def argv(command, out, *extra, evaluate=True):
        keys = SFT if command == "sft" else DPO
        held = [f"eval.data={held_chat if command == 'sft' else held_prefs}", "eval.interval=2",
                f"eval.prompts={held_prompts}", "eval.max_new_tokens=5"] if evaluate else []
        return command, ["--model", str(base), "--data", str(chat if command == "sft" else prefs),
                         "--output", str(root / out), *keys, *held, *extra]

    import olmo2.rl.verifiers as V

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(V, "VERIFIERS", even_sum_verifiers())
        for command in ("sft", "dpo"):  # one process: the reference
            assert (sft if command == "sft" else dpo).main(argv(command, f"{command}-one")[1]) == 0
    two_rank = [argv("sft", "sft-fsdp", "strategy=fsdp"), argv("sft", "sft-ddp", "strategy=ddp"),
                argv("sft", "sft-stopped", "strategy=fsdp", "hard_stop=2", evaluate=False),
                argv("dpo", "dpo-fsdp", "strategy=fsdp"), argv("dpo", "dpo-ddp", "strategy=ddp"),
                argv("dpo", "dpo-stopped", "strategy=fsdp", "hard_stop=2")]
    mp.spawn(_worker, args=(2, free_port(), two_rank, str(root / "teardown-rank")), nprocs=2, join=True)
    return root, argv


def test_two_ranks_release_the_process_group_at_the_end(runs):
    """After FSDP2 and DDP runs of both commands, destroy_distributed releases the default group
    and joins its gloo threads (a gloo thread left to the interpreter's exit can abort it: see
    destroy_distributed); under FSDP2, DTensor's caches held it until emptied."""
    root, _ = runs
    assert_released(root / "teardown-rank")


def weights(folder):
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("run", ["sft-fsdp", "sft-ddp", "dpo-fsdp", "dpo-ddp"])
def test_two_ranks_match_one_process(runs, run):
    root, _ = runs
    reference = weights(root / f"{run.split('-')[0]}-one")
    got = weights(root / run)
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    state = json.loads((root / run / "checkpoints" / "step00000002" / "trainer.json").read_text())
    assert state["world_size"] == 2
    start = load_file(root / "base" / "model.safetensors")
    assert any(not torch.equal(value, start[name]) for name, value in got.items())  # it trained


def test_dpo_reference_pass_sharded_equals_one_process(runs):
    root, _ = runs
    for name, n in (("reference_logps.pt", 9), ("reference_logps_eval.pt", 5)):
        one = torch.load(root / "dpo-one" / name)["logps"]
        two = torch.load(root / "dpo-fsdp" / name)["logps"]
        assert two.shape == (n, 2)
        torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-6)


def evaluations(folder):
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: {k: v for k, v in x.items() if k.startswith("eval/") and k != "eval/seconds"}
            for x in lines if "eval/loss" in x}


@pytest.mark.parametrize("run", ["sft-fsdp", "sft-ddp", "dpo-fsdp", "dpo-ddp"])
def test_two_ranks_evaluate_as_one_process(runs, run):
    """Each rank scores a disjoint share of the held-out set and the sums are all-reduced: the held-out
    metrics at steps 2 and 3 (the last) are one process's, up to the rounding the weights differ by; so is
    the greedy verified accuracy on eval.prompts (each rank answers its share, the results merged)."""
    root, _ = runs
    one, two = evaluations(root / f"{run.split('-')[0]}-one"), evaluations(root / run)
    assert sorted(one) == sorted(two) == [2, 3]
    for step, record in one.items():
        assert two[step].keys() == record.keys() and len(record) in (2 + 2, 7 + 2)  # + verified accuracy, reward
        for key, value in record.items():
            assert two[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_two_rank_checkpoint_resumes_in_one_process(runs, command, capsys, monkeypatch):
    """Stopped at step 2 of 2 ranks under FSDP2, finished in one process: the weights of the straight run."""
    import olmo2.rl.verifiers as V
    from olmo2.cli import dpo, sft

    monkeypatch.setattr(V, "VERIFIERS", even_sum_verifiers())

    root, argv = runs
    out = root / f"{command}-stopped"
    assert not (out / "model.safetensors").exists()
    evaluate = command == "dpo"  # DPO's held-out reference, written by 2 ranks, is read back by one process
    assert (sft if command == "sft" else dpo).main(argv(command, f"{command}-stopped", evaluate=evaluate)[1]) == 0
    err = capsys.readouterr().err
    assert "at step 2 (epoch 0, item 8)" in err
    if evaluate:
        assert "held-out reference log-probs of 5 pairs read from" in err
        got, want = evaluations(out), evaluations(root / "dpo-one")
        assert sorted(got) == sorted(want) == [2, 3]
        assert all(got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6) for step in want)
    reference = weights(root / f"{command}-one")
    got = weights(out)
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
