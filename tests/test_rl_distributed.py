"""olmo2-rl on two CPU ranks (gloo): with each prompt sampled from its own generator
(``sampling_seed=prompt``, the default under torchrun), FSDP2 and DDP end with the weights
of one process on the same global batch, log the same rollout metrics and the same greedy
evaluation, and a checkpoint written by two ranks finishes in one process. One spawn runs
every two-rank command."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import olmo2.rl.verifiers as V
from olmo2.checkpoint_hf import save_pretrained
from olmo2.tokenizers import save_tokenizer
from gloo_ranks import assert_released, free_port, join_gloo, leave_and_record
from test_sft import tiny

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.slow]

# 3 prompts per step over 2 ranks: rank 0 samples slots 0 and 2, rank 1 slot 1, so the ranks hold
# 4 and 2 completions; 2 mini-batches of 3 completions (the first: both of slot 0 and one of slot 1)
# and micro-batches of 2, so rank 1 runs passes of weight 0 and a padded reference forward.
# adam_eps 1e-4 keeps Adam's g / (|g| + eps) smooth, so different reduction orders differ in the
# weights by rounding only (as tests/test_distributed.py).
RL = ["k=2", "prompts_per_step=3", "steps=3", "mini_batches=2", "micro_batch_size=2", "max_new_tokens=6",
      "max_prompt_length=64", "beta=0.1", "lr=1e-2", "adam_eps=1e-4", "save_interval=1", "keep_last=0",
      "device=cpu"]


def parity(text, reference):
    """Right for about half of a random model's answers (groups with mixed rewards) and, when
    the greedy answers all start alike, for about half of the prompts (an evaluation whose
    merge over ranks shows)."""
    return len(text) > 0 and (ord(text[0]) + int(reference)) % 2 == 0


def _worker(rank: int, world: int, port: int, runs: list, teardown: str) -> None:
    from olmo2.cli import rl

    V.VERIFIERS = {**V.VERIFIERS, "test_parity": parity}
    join_gloo(rank, world, port)
    try:
        for argv in runs:
            code = rl.main(argv)
            if code:
                raise SystemExit(f"rank {rank}: olmo2-rl {argv} exited {code}")
    finally:
        leave_and_record(f"{teardown}{rank}.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from olmo2.cli import rl

    root = tmp_path_factory.mktemp("rl_dist")
    base = root / "base"
    save_pretrained(tiny(vocab=258, seed=1), base)
    save_tokenizer("byte", base)
    prompts, held_out = root / "prompts.jsonl", root / "eval.jsonl"
    for path, numbers in ((prompts, range(5)), (held_out, range(10, 17))):
        path.write_text("".join(json.dumps({"prompt": f"Add {a} and {a + 1}", "verifier": "test_parity",
                                            "reference": str(a)}) + "\n" for a in numbers))

    def argv(out, *extra):
        return ["--model", str(base), "--data", str(prompts), "--output", str(root / out), *RL,
                f"eval_data={held_out}", *extra]

    saved = V.VERIFIERS
    V.VERIFIERS = {**saved, "test_parity": parity}
    try:
        assert rl.main(argv("one", "sampling_seed=prompt")) == 0  # one process: the reference
        mp.spawn(_worker, args=(2, free_port(), [argv("fsdp", "strategy=fsdp"), argv("ddp", "strategy=ddp"),
                                                  argv("stopped", "strategy=fsdp", "hard_stop=2")],
                                str(root / "teardown-rank")),
                 nprocs=2, join=True)
        yield root, argv
    finally:
        V.VERIFIERS = saved


def test_two_ranks_release_the_process_group_at_the_end(runs):
    """After FSDP2 and DDP runs, destroy_distributed releases the default group and joins its gloo
    threads (a gloo thread left to the interpreter's exit can abort it: see destroy_distributed)."""
    root, _ = runs
    assert_released(root / "teardown-rank")


def weights(folder):
    return load_file(folder / "model.safetensors")


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("run", ["fsdp", "ddp"])
def test_two_ranks_match_one_process(runs, run):
    root, _ = runs
    reference, got = weights(root / "one"), weights(root / run)
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    start = load_file(root / "base" / "model.safetensors")
    assert any(not torch.equal(value, start[name]) for name, value in got.items())  # it trained
    state = json.loads((root / run / "checkpoints" / "step00000002" / "trainer.json").read_text())
    assert state["world_size"] == 2 and state["sampling"] == "prompt"
    one, two = metrics(root / "one"), metrics(root / run)
    assert [m["step"] for m in two] == [m["step"] for m in one]
    for a, b in zip(one, two):
        for key in ("reward", "accuracy", "equal_reward_groups", "completion_length", "truncated",
                    "eval/accuracy", "eval/reward"):
            assert (key in a) == (key in b) and a.get(key) == b.get(key), (key, a, b)
        for key in ("loss", "kl", "ratio", "entropy", "grad_norm", "advantage_abs"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert any(0 < m["equal_reward_groups"] < 1 for m in one if "loss" in m)  # groups with a gradient
    assert any(0 < m["eval/accuracy"] < 1 for m in one if "eval/accuracy" in m)  # the merge order matters


def test_two_rank_checkpoint_resumes_in_one_process(runs, capsys):
    """Stopped after step 2 of 2 FSDP2 ranks, finished in one process (which keeps the
    checkpoint's per-prompt sampling): the weights of the straight run."""
    from olmo2.cli import rl

    root, argv = runs
    out = root / "stopped"
    assert not (out / "model.safetensors").exists()
    assert rl.main(argv("stopped")) == 0
    assert "at step 2" in capsys.readouterr().err
    reference, got = weights(root / "one"), weights(out)
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_layout_deals_prompts_to_ranks_in_turn():
    from olmo2.rl.trainer import Layout

    layout = Layout(n_prompts=3, k=2, world=2, rank=1)
    assert layout.slots() == [1] and layout.rows() == [2, 3] and layout.rows(0) == [0, 1, 4, 5]
    assert layout.max_rows() == 4


def test_fsdp_param_groups_read_either_layout_of_the_private_state():
    """gathered_weights reads FSDP2's private parameter groups: the list of torch 2.13
    and the single group (or None) of earlier releases, such as the GPU image's."""
    from types import SimpleNamespace

    from olmo2.train.parallel import _param_groups

    def module(**state):
        return SimpleNamespace(_get_fsdp_state=lambda: SimpleNamespace(**state))

    assert _param_groups(module(_fsdp_param_groups=["a", "b"])) == ["a", "b"]
    assert _param_groups(module(_fsdp_param_group="a")) == ["a"]
    assert _param_groups(module(_fsdp_param_group=None)) == []
    with pytest.raises(RuntimeError, match="neither _fsdp_param_groups nor _fsdp_param_group"):
        _param_groups(module())
