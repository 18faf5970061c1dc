"""HSDP and sharded initialization on real gloo processes (CPU).

* The initial weights of 2 ranks (FSDP), 4 ranks (FSDP) and 4 ranks (HSDP 2 x 2)
  equal a single process's, bitwise: each rank initializes only its shards.
* Training with HSDP 2 x 2 (4 ranks, 1 instance each) equals one process
  (2 micro-batches of 2) within the tolerance tests/test_distributed.py uses for
  FSDP: the replicate groups get different data and gradients average over all 4.
* A checkpoint saved by HSDP 2 x 2 at step 2 resumes on 2 ranks with flat FSDP
  (DCP reshards) and ends at step 4 matching the run that never stopped.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olmo2.cli.train import main
from olmo2.config import Olmo2Config
from olmo2.train import checkpoint as ckpt
from olmo2.train.init import build_model
from gloo_ranks import free_port
from test_train_utils import synthetic_tokens

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.slow]

SEED = 7


def _worker(rank: int, world: int, port: int, argv: list, init_dir: str) -> None:
    from torch.distributed.tensor import Replicate, Shard

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    config = Olmo2Config.preset("olmo2-test")
    for shard_degree in ([None, 2] if world == 4 else [None]):
        model = build_model(config, "fsdp", torch.device("cpu"), "fp32", SEED, shard_degree=shard_degree)
        placements = model.lm_head.weight.placements
        assert placements == ((Shard(0),) if shard_degree is None else (Replicate(), Shard(0))), placements
        full = {name: value.full_tensor() for name, value in model.state_dict().items()}
        if rank == 0:
            torch.save(full, os.path.join(init_dir, f"world{world}-shard{shard_degree or world}.pt"))
    code = main(argv)  # the trainer joins the process group already made
    if code:
        raise SystemExit(code)


def run_ranks(argv: list, world: int, init_dir) -> None:
    mp.spawn(_worker, args=(world, free_port(), argv, str(init_dir)), nprocs=world, join=True)


def argv_for(root, data, name: str, *extra: str) -> list:
    # As tests/test_distributed.py: eps 1e-4 keeps Adam's g / (|g| + eps) smooth, so
    # different reduction orders differ in the weights by rounding only.
    return ["--preset=test", f"--out_dir={root}", f"--run_name={name}", f"--seed={SEED}",
            f"--data.sources=[{{paths: [{data}]}}]", "--max_steps=4", "--checkpoint.interval=2",
            "--checkpoint.keep_last=0", "--checkpoint.export_hf=false", "--optim.eps=1e-4",
            "--progress=false", "--tensorboard=false", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hsdp")
    data = synthetic_tokens(root / "syn.npy")
    assert main(argv_for(root, data, "one", "--parallel.strategy=none")) == 0  # 2 micro-batches of 2 instances
    # 4 ranks, shard groups of 2 replicated twice; 1 instance per rank.
    run_ranks(argv_for(root, data, "hsdp", "--parallel.strategy=fsdp", "--parallel.shard_degree=2",
                       "--micro_batch_tokens=32"), 4, root)
    step2 = root / "hsdp" / "checkpoints" / "step00000002"
    run_ranks(argv_for(root, data, "resumed", "--parallel.strategy=fsdp", f"--resume={step2}"), 2, root)
    return root


def weights(path):
    return ckpt.load_model_from_checkpoint(path).state_dict()


def test_initial_weights_are_the_same_on_1_2_and_4_ranks_fsdp_and_hsdp(runs):
    reference = build_model(Olmo2Config.preset("olmo2-test"), "none", torch.device("cpu"), "fp32", SEED).state_dict()
    for layout in ("world2-shard2", "world4-shard4", "world4-shard2"):
        got = torch.load(runs / f"{layout}.pt")
        assert got.keys() == reference.keys(), layout
        for name, value in reference.items():
            assert torch.equal(got[name], value), (layout, name)


def test_hsdp_training_matches_one_process(runs):
    reference = weights(runs / "one")
    got = weights(runs / "hsdp")
    state = ckpt.read_trainer_state(ckpt.resolve_checkpoint(runs / "hsdp"))
    assert state["world_size"] == 4 and state["step"] == 4
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    at_step2 = weights(runs / "hsdp" / "checkpoints" / "step00000002")
    assert any(not torch.equal(value, at_step2[name]) for name, value in got.items())


def test_hsdp_checkpoint_resumes_on_two_fsdp_ranks(runs):
    state = ckpt.read_trainer_state(ckpt.resolve_checkpoint(runs / "resumed"))
    assert state["world_size"] == 2 and state["step"] == 4
    assert [step for step, _ in ckpt.list_checkpoints(runs / "resumed" / "checkpoints")] == [4]  # resumed at 2
    reference = weights(runs / "one")  # never stopped
    got = weights(runs / "resumed")
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
