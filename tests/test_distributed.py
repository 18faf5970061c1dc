"""Two ranks on CPU (gloo): FSDP2 and DDP match one process with the same global
batch, and a checkpoint written by two ranks resumes in one."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from olmo2.cli.train import main
from olmo2.train import Trainer
from olmo2.train import checkpoint as ckpt
from gloo_ranks import assert_released, free_port, leave_and_record
from test_train_utils import make_config, synthetic_tokens

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _worker(rank: int, world: int, port: int, argv: list, teardown: str | None) -> None:
    import olmo2.cli.train as cli_train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    leave = cli_train.destroy_distributed

    if teardown:  # what olmo2-train's own exit path reports
        cli_train.destroy_distributed = lambda: leave_and_record(f"{teardown}{rank}.json", leave)
    code = main(argv)
    if code:
        raise SystemExit(code)


def run_ranks(argv: list, world: int = 2, teardown: str | None = None) -> None:
    """``teardown``: a path prefix; rank r writes there (``<prefix><r>.json``) whether
    olmo2-train's ``destroy_distributed`` released the default group."""
    mp.spawn(_worker, args=(world, free_port(), argv, teardown), nprocs=world, join=True)


def argv_for(root, data, strategy: str) -> list:
    # eps 1e-4 keeps Adam's g / (|g| + eps) smooth, so different reduction orders
    # differ in the weights by rounding only.
    return ["--preset=test", f"--out_dir={root}", f"--run_name={strategy}", f"--parallel.strategy={strategy}",
            f"--data.sources=[{{paths: [{data}]}}]", "--max_steps=4", "--checkpoint.interval=2",
            "--checkpoint.keep_last=0", "--checkpoint.export_hf=false", "--optim.eps=1e-4",
            "--progress=false", "--tensorboard=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = synthetic_tokens(root / "syn.npy")
    assert main(argv_for(root, data, "none")) == 0  # one process: 2 micro-batches of 2 instances
    for strategy in ("fsdp", "ddp"):  # two ranks: 1 micro-batch of 2 instances each
        run_ranks(argv_for(root, data, strategy), teardown=str(root / f"{strategy}-teardown-rank"))
    return root, data


def weights(run_dir):
    return ckpt.load_model_from_checkpoint(run_dir).state_dict()


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_match_one_process(runs, strategy):
    root, _ = runs
    reference = weights(root / "none")
    got = weights(root / strategy)
    state = ckpt.read_trainer_state(ckpt.resolve_checkpoint(root / strategy))
    assert state["world_size"] == 2 and state["step"] == 4
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(value, weights(root / strategy / "checkpoints" / "step00000002")[name])
               for name, value in got.items())


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_release_the_process_group_at_the_end(runs, strategy):
    """olmo2-train leaves through destroy_distributed, which must release the default group and
    so join its gloo threads (counted in /proc/self/task: Linux) before the interpreter exits; a
    gloo thread dropping a collective's tensors during the exit aborts the process (SIGABRT, see
    destroy_distributed). Under FSDP2 the group outlived the model until DTensor's
    sharding-propagation caches, which hold every parameter's device mesh, were emptied."""
    root, _ = runs
    assert_released(root / f"{strategy}-teardown-rank")


def test_two_rank_fsdp_checkpoint_resumes_in_one_process(runs, tmp_path):
    root, data = runs
    step2 = root / "fsdp" / "checkpoints" / "step00000002"
    cfg = make_config(tmp_path, data=data, max_steps=4, resume=str(step2), **{"optim.eps": 1e-4,
                                                                                "checkpoint.export_hf": False})
    trainer = Trainer(cfg)
    assert trainer.step == 2 and trainer.train_data.next_step == 2
    steps = {int(s["step"].item()) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {2}  # the optimizer state came back, resharded from two ranks
    trainer.fit()
    reference = weights(root / "none")
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=name)
