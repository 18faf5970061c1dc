"""The memory and speed planner (olmo2.train.planner, ``olmo2-train --plan``)
checked against what torch allocates.

* Activations: the per-block count equals the bytes autograd saves for a real
  block (``saved_tensors_hooks``), parameters excluded, exactly.
* Parameters, gradients and AdamW state: exactly the bytes of a real model and
  optimizer in one process, and of FSDP2 shards under a fake process group
  after a backward and an optimizer step (4 and 3 ranks, first and last rank:
  the padding of dim 0 and the uneven local shards).
* The total: within 10% of the peak tensor memory measured on CPU
  (``tests/memtrack.py``: every op output from creation to the death of its
  storage, including inside our ops) over the trainer's construction and two
  steps, for the ``olmo2-test`` and ``olmo2-tiny`` models, with and without
  gradient accumulation and activation checkpointing, in one process, and with
  FSDP2 and DDP on two gloo ranks (the tracker then follows FSDP2's storage
  resizes and counts DTensors by their local shards).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memtrack import PeakAllocations
from olmo2.cli.train import main
from olmo2.config import Olmo2Config, flops_per_token
from olmo2.hardware import PEAK_BF16_FLOPS
from olmo2.model import Olmo2ForCausalLM
from olmo2.train.config import ConfigError, resolve
from olmo2.train.optim import build_adamw
from olmo2.train.planner import activation_bytes_per_block_token, plan_memory, plan_speed, shard_rows
from olmo2.train.trainer import Trainer
from test_train_utils import make_config

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- activations
@pytest.mark.parametrize("preset", ["olmo2-test", "olmo2-tiny"])  # GQA (4 heads, 2 kv) and MHA
def test_block_activations_equal_saved_tensors(preset):
    cfg = Olmo2Config.preset(preset)
    model = Olmo2ForCausalLM.from_config(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch, seq = 3, 37
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    cos, sin = model.model._rope(None, batch, seq, 0, x.device)
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, cos, sin, None, True, None)
    rope_tables = cos.untyped_storage().nbytes() + sin.untyped_storage().nbytes()  # shared by all blocks
    assert sum(saved.values()) - rope_tables == batch * seq * activation_bytes_per_block_token(cfg, 4)


# ---------------------------------------------------------------------- exact parts
def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_parameters_gradients_optimizer_exact_one_process(tmp_path):
    cfg = make_config(tmp_path)
    model = Olmo2ForCausalLM.from_config(cfg.model)
    optimizer = build_adamw(model, lr=1e-3)
    ids = torch.randint(0, 256, (2, cfg.data.seq_len))
    model(input_ids=ids, labels=ids, reduction="sum").loss.backward()
    grads = _bytes(p.grad for p in model.parameters())
    optimizer.step()
    state = _bytes(v for s in optimizer.state.values() for v in s.values())
    plan = plan_memory(cfg, world_size=1, gpu="cpu")
    assert plan.parameters == _bytes(model.parameters())
    assert plan.gradients == grads
    assert plan.optimizer == state


def test_shard_rows_pad_dim0():
    assert shard_rows(7, 4, 0) == (2, 2)
    assert shard_rows(7, 4, 3) == (2, 1)
    assert shard_rows(2, 4, 3) == (1, 0)  # more ranks than rows: empty local shards
    assert shard_rows(100352, 64, 63) == (1568, 1568)


FAKE_PG = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from olmo2.model import Olmo2ForCausalLM
    from olmo2.train.config import resolve
    from olmo2.train.optim import build_adamw
    from olmo2.train.parallel import parallelize
    from olmo2.train.planner import plan_memory
    for world, rank in [(4, 0), (4, 3), (3, 2)]:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        # 1 kv head: k/v projections of 16 rows; vocabulary 387: uneven shards of the embedding.
        cfg = resolve(preset="test", overrides={"model": {"num_key_value_heads": 1, "vocab_size": 387},
                                                "global_batch_tokens": 64 * world, "micro_batch_tokens": 64})
        model = parallelize(Olmo2ForCausalLM.from_config(cfg.model, device="meta"), "fsdp", torch.device("cpu"),
                            "fp32")
        model.to_empty(device="cpu")
        stored = sum(p._sharded_param_data.numel() * p._sharded_param_data.element_size()
                     for m in model.modules() if isinstance(m, FSDPModule)
                     for p in m._get_fsdp_state()._fsdp_param_group.fsdp_params)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        ids = torch.randint(0, 256, (2, 32))
        model(input_ids=ids, labels=ids, reduction="sum").loss.backward()
        # Gradients are views of each group's padded reduce-scatter output: count its storages once.
        grads = {id(s): s.nbytes() for p in model.parameters() for s in [p.grad.to_local().untyped_storage()]}
        optimizer = build_adamw(model, lr=1e-3)
        optimizer.step()
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for v in s.values()
                    for t in [v.to_local() if hasattr(v, "to_local") else v])
        plan = plan_memory(cfg, world_size=world, gpu="cpu", rank=rank)
        print(world, rank, stored, plan.parameters, sum(grads.values()), plan.gradients, state, plan.optimizer)
        dist.destroy_process_group()
""")


def test_fsdp_shards_exact_under_fake_process_group():
    out = subprocess.run([sys.executable, "-c", FAKE_PG], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.strip().splitlines()]
    assert len(rows) == 3
    for world, rank, stored, planned, grads, planned_grads, state, planned_state in rows:
        assert stored == planned, (world, rank)
        assert grads == planned_grads, (world, rank)
        assert state == planned_state, (world, rank)
    assert rows[0][6] != rows[1][6]  # rank 3 of 4 holds less optimizer state than rank 0


# ---------------------------------------------------------------------- the total against a measured peak
CASES = {
    "test": {"model.preset": "olmo2-test", "global_batch_tokens": 4 * 32},
    "test-checkpointed": {"model.preset": "olmo2-test", "global_batch_tokens": 4 * 32,
                          "parallel.activation_checkpointing": True},
    "tiny": {"model.preset": "olmo2-tiny", "data.seq_len": 128, "micro_batch_tokens": 4 * 128,
             "global_batch_tokens": 4 * 128},
    "tiny-accumulate": {"model.preset": "olmo2-tiny", "data.seq_len": 128, "micro_batch_tokens": 2 * 128,
                        "global_batch_tokens": 4 * 128},
}


@pytest.mark.parametrize("case", list(CASES))
def test_total_within_10_percent_of_measured_peak(tmp_path, case):
    cfg = make_config(tmp_path, **{"checkpoint.save_final": False, **CASES[case]})
    with PeakAllocations() as mem:
        trainer = Trainer(cfg)
        try:
            data = iter(trainer.train_data)
            for _ in range(2):  # the second step has the optimizer state
                trainer.train_step(next(data))
        finally:
            trainer.close()
    plan = plan_memory(cfg, world_size=1, gpu="cpu")
    assert abs(plan.total / mem.peak - 1) < 0.10, (case, plan.total, mem.peak, plan.moments)


def _fsdp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    import os

    from olmo2.train.parallel import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    for strategy, case in TWO_RANK_CASES:
        overrides = {**CASES[case], "global_batch_tokens": 2 * CASES[case]["global_batch_tokens"]}
        cfg = make_config(Path(tmp) / strategy / case, **{"checkpoint.save_final": False,
                                                          "parallel.strategy": strategy, **overrides})
        # follow_resize: FSDP2 frees and re-allocates gathered parameters by resizing their storage.
        with PeakAllocations(follow_resize=True) as mem:
            trainer = Trainer(cfg, info)
            try:
                data = iter(trainer.train_data)
                for _ in range(2):
                    trainer.train_step(next(data))
            finally:
                trainer.close()
        plan = plan_memory(cfg, world_size=world, gpu="cpu", rank=rank)
        (Path(tmp) / f"{strategy}-{case}.rank{rank}").write_text(f"{mem.peak} {plan.total}")


# The global batch doubles: each of the two ranks runs the one-process case's micro-batches.
TWO_RANK_CASES = [("fsdp", "test"), ("fsdp", "tiny"), ("ddp", "test"), ("ddp", "tiny")]


@pytest.mark.slow
def test_total_within_10_percent_of_measured_peak_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    from gloo_ranks import free_port

    mp.spawn(_fsdp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for strategy, case in TWO_RANK_CASES:
        for rank in range(2):
            measured, planned = map(int, (tmp_path / f"{strategy}-{case}.rank{rank}").read_text().split())
            assert abs(planned / measured - 1) < 0.10, (strategy, case, rank, planned, measured)


# ---------------------------------------------------------------------- speed, fit, errors
def test_speed_is_mfu_times_peak_over_flops_per_token():
    cfg = resolve(preset="olmo2-7b")
    speed = plan_speed(cfg, world_size=32, gpu="h100", mfu=0.4)
    fpt = flops_per_token(cfg.model, 4096)
    assert speed.tokens_per_second_per_gpu * fpt == pytest.approx(0.4 * PEAK_BF16_FLOPS["H100"])
    assert speed.step_seconds == pytest.approx(cfg.global_batch_tokens / (32 * speed.tokens_per_second_per_gpu))
    assert plan_speed(cfg, world_size=1, gpu="cpu") is None


def test_fits_and_does_not_fit():
    cfg = resolve(config_file=ROOT / "configs" / "olmo2-32b-stage1.yaml")
    assert plan_memory(cfg, world_size=128, gpu="h100").fits
    no_checkpointing = resolve(config_file=ROOT / "configs" / "olmo2-32b-stage1.yaml",
                               overrides=["--parallel.activation_checkpointing=false"])
    plan = plan_memory(no_checkpointing, world_size=8, gpu="h100")
    assert not plan.fits and plan.activations > 50 * 2**30
    # Sharding over fewer ranks (HSDP) holds more of the model per GPU.
    hsdp, flat = plan_memory(cfg, world_size=128, shard_degree=8), plan_memory(cfg, world_size=128)
    assert hsdp.parameters > 15 * flat.parameters


def test_32b_config_is_the_published_run():
    cfg = resolve(config_file=ROOT / "configs" / "olmo2-32b-stage1.yaml")
    m = cfg.model
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads,
            m.intermediate_size, m.vocab_size, m.head_dim) == (5120, 64, 40, 8, 27648, 100352, 128)
    assert cfg.optim.lr == 6e-4 and cfg.optim.eps == 1e-8 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.global_batch_tokens == 2048 * 4096 and cfg.data.seq_len == 4096
    assert cfg.schedule.warmup_steps * cfg.global_batch_tokens == pytest.approx(8.39e9, rel=1e-3)
    assert cfg.decay_steps * cfg.global_batch_tokens == pytest.approx(6.5e12, rel=1e-5)
    assert cfg.max_steps * cfg.global_batch_tokens == pytest.approx(6.06e12, rel=1e-5)
    assert cfg.schedule.name == "cosine" and cfg.schedule.final_lr_ratio == 0.1


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")  # pretraining ones
                                            if not p.name.startswith(("sft-", "dpo-"))))
def test_plan_cli_prints_table_for_shipped_configs(config, capsys):
    where = ["--nodes=8"] if config.startswith("olmo2-") else ["--gpu=cpu"]  # the tiny ones: one CPU process
    assert main(["--config", str(ROOT / "configs" / config), "--plan", *where]) == 0
    out = capsys.readouterr().out
    for part in ("parameters", "gradients", "optimizer", "activations, no checkpointing",
                 "activations, checkpointing each block", "LM-head loss buffer", "communication", "total"):
        assert part in out, (config, part)
    assert ("FITS" in out) == ("tokens/s per GPU" in out) == config.startswith("olmo2-")


@pytest.mark.parametrize("args, message", [
    (["--gpu=v100"], "gpu must be one of"),
    (["--nodes=0"], "nodes must be an int >= 1"),
    (["--mfu=1.5", "--gpu=cpu"], "mfu must be in (0, 1]"),
    (["--preset=olmo2-7b", "--nodes=3"], "must be a multiple of micro_batch_tokens"),
    (["--preset=olmo2-7b", "--parallel.precision=bf16", "--gpu=cpu"], "precision=bf16 is for GPUs"),
])
def test_plan_cli_errors_are_one_line(args, message, capsys):
    assert main(["--plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_shard_degree_must_divide_world():
    with pytest.raises(ConfigError, match="shard_degree"):
        plan_memory(resolve(preset="olmo2-7b"), world_size=16, shard_degree=3)
