"""Sharded, world-size-independent initialization (olmo2.train.init) in one process.

Any split of a parameter's rows gives the values a single process draws, bitwise
(the block logic that makes FSDP/HSDP shards on any number of ranks agree; the
real multi-rank check is in tests/test_hsdp.py); the values are OLMo 2's
truncated normal; they depend on the seed and the parameter's name only, not on
wrappers, thread count or parameter dtype. HSDP's config key is validated.
"""
from __future__ import annotations

import math

import pytest
import torch

from olmo2.cli.train import main
from olmo2.config import Olmo2Config
from olmo2.model import Olmo2ForCausalLM
from olmo2.train.config import ConfigError
from olmo2.train.init import (
    BLOCK_ELEMENTS,
    block_seed,
    build_model,
    fill_rows_,
    init_parameters_,
    rows_per_block,
    trunc_normal_,
)
from olmo2.train.parallel import check_shard_degree, fsdp_mesh_shape
from olmo2.train.simulate import main as simulate_main
from olmo2.train.trainer import Trainer
from test_train_utils import make_config

CPU = torch.device("cpu")


def full_values(shape, name="w", seed=5, std=0.02):
    out = torch.empty(shape)
    fill_rows_(out, "trunc_normal", std, seed, name, shape, 0)
    return out


# (rows, cols): fewer rows than a block, a block's multiple, rows not dividing,
# one-element rows (many rows per block), rows wider than a block (one row per block).
SHAPES = [(7, 199), (2 * rows_per_block((1, 2049)), 2049), (1001, 64), (5000, 1), (3, BLOCK_ELEMENTS + 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_any_row_split_gives_the_full_tensor_bitwise(shape):
    full = full_values(shape)
    rows = shape[0]
    # FSDP2's chunks for 1..8 shards, plus arbitrary cuts (off every block boundary).
    splits = [[min(rows, i * math.ceil(rows / n)) for i in range(n + 1)] for n in (1, 2, 3, 4, 7, 8)]
    splits.append(sorted({0, rows, 1, rows // 3, rows // 3 + 1, max(0, rows - 1)}))
    for cuts in splits:
        pieced = torch.full(shape, float("nan"))
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            local = torch.empty(hi - lo, *shape[1:])
            fill_rows_(local, "trunc_normal", 0.02, 5, "w", shape, lo)
            pieced[lo:hi] = local
        assert torch.equal(pieced, full), cuts


def test_values_depend_on_seed_name_and_block_only():
    a = full_values((64, 33))
    assert not torch.equal(a, full_values((64, 33), seed=6))
    assert not torch.equal(a, full_values((64, 33), name="v"))
    assert len({block_seed(0, "w", b) for b in range(1000)}) == 1000
    # Written into bf16 or fp64 parameters: the fp32 values, rounded once.
    for dtype in (torch.bfloat16, torch.float64):
        out = torch.empty(64, 33, dtype=dtype)
        fill_rows_(out, "trunc_normal", 0.02, 5, "w", (64, 33), 0)
        assert torch.equal(out, a.to(dtype))
    ones = torch.empty(9)
    fill_rows_(ones, "ones", 0.0, 5, "n", (9,), 0)
    assert torch.equal(ones, torch.ones(9))
    with pytest.raises(ValueError, match="unknown initialization 'xavier' for parameter w"):
        fill_rows_(torch.empty(3, 3), "xavier", 0.02, 5, "w", (3, 3), 0)


def test_thread_count_does_not_change_the_values():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = full_values((300, 517))
        torch.set_num_threads(max(2, threads))
        many = full_values((300, 517))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_the_distribution_is_olmo2s_truncated_normal():
    """std 0.02 truncated at +-3 std: the bounds hold, and a Kolmogorov-Smirnov test
    against the exact truncated-normal CDF passes at the 1% level (2**20 draws from
    16 blocks), as torch's own sampler does; the test sees a std 1% off."""
    std, n = 0.02, 1 << 20
    ours = torch.empty(n)
    generator = torch.Generator()
    for i in range(n >> 16):
        generator.manual_seed(i)
        trunc_normal_(ours[i << 16:(i + 1) << 16], std, generator)
    assert ours.abs().max() <= 3 * std

    def ks_statistic(sample, sigma, bound):
        x = sample.double().sort().values / sigma
        lo, hi = torch.special.ndtr(torch.tensor(-bound / sigma, dtype=torch.float64)), \
            torch.special.ndtr(torch.tensor(bound / sigma, dtype=torch.float64))
        cdf = ((torch.special.ndtr(x) - lo) / (hi - lo)).clamp(0, 1)
        i = torch.arange(1, len(x) + 1, dtype=torch.float64)
        return max((i / len(x) - cdf).max().item(), (cdf - (i - 1) / len(x)).max().item())

    critical = 1.63 / math.sqrt(n)  # 1% level
    assert ks_statistic(ours, std, 3 * std) < critical  # measured 0.00058 against 0.00159
    reference = torch.empty(n)
    torch.nn.init.trunc_normal_(reference, std=std, a=-3 * std, b=3 * std, generator=torch.Generator().manual_seed(1))
    assert ks_statistic(reference, std, 3 * std) < critical  # torch's inverse-CDF sampler: 0.00115
    assert ks_statistic(ours, 1.01 * std, 3.03 * std) > critical  # a std 1% off is seen: 0.0025


def test_single_process_model_ignores_wrappers_and_matches_the_description():
    config = Olmo2Config.preset("olmo2-test")
    plain = build_model(config, "none", CPU, "fp32", seed=3)
    wrapped = build_model(config, "none", CPU, "fp32", seed=3, activation_checkpointing=True, compile=True)
    assert any("_orig_mod" in name and "_checkpoint_wrapped_module" in name for name, _ in wrapped.named_parameters())
    plain_state = plain.state_dict()
    wrapped_state = {k.replace("._orig_mod", "").replace("._checkpoint_wrapped_module", ""): v
                     for k, v in wrapped.state_dict().items()}
    assert plain_state.keys() == wrapped_state.keys()
    for name, value in plain_state.items():
        assert torch.equal(value, wrapped_state[name]), name
        kind, std = plain.parameter_init()[name]
        if kind == "ones":
            assert torch.equal(value, torch.ones_like(value)), name
        else:
            assert torch.equal(value, full_values(tuple(value.shape), name=name, seed=3, std=std)), name
    other = build_model(config, "none", CPU, "fp32", seed=4)
    assert not torch.equal(other.lm_head.weight, plain.lm_head.weight)


def test_init_refuses_unknown_and_unallocated_parameters():
    model = Olmo2ForCausalLM.from_config(Olmo2Config.preset("olmo2-test"), device="meta")
    with pytest.raises(ValueError, match="model.embed_tokens.weight is on the meta device"):
        init_parameters_(model, 0)
    model.to_empty(device="cpu")
    with pytest.raises(ValueError, match="no initialization is described for parameter model.embed_tokens.weight"):
        init_parameters_(model, 0, spec={})


def test_trainer_builds_the_keyed_initialization(tmp_path):
    cfg = make_config(tmp_path, seed=11)
    trainer = Trainer(cfg)
    try:
        reference = build_model(cfg.model, "none", CPU, "fp32", seed=11).state_dict()
        for name, value in trainer.model.state_dict().items():
            assert torch.equal(value, reference[name]), name
    finally:
        trainer.close()


def test_shard_degree_mesh_and_errors(tmp_path, capsys):
    assert fsdp_mesh_shape(8, None) == (8,)
    assert fsdp_mesh_shape(8, 8) == (8,)
    assert fsdp_mesh_shape(64, 8) == (8, 8)
    check_shard_degree(2, 4, "fsdp")
    with pytest.raises(ValueError, match=r"parallel.shard_degree=3 must divide the world size \(4 ranks\)"):
        check_shard_degree(3, 4, "fsdp")
    with pytest.raises(ValueError, match="parallel.shard_degree=2 needs parallel.strategy=fsdp"):
        check_shard_degree(2, 4, "ddp")
    with pytest.raises(ConfigError, match="parallel.shard_degree must be an int >= 1, got 0"):
        make_config(tmp_path, **{"parallel.shard_degree": 0})
    with pytest.raises(ConfigError, match="parallel.shard_degree=2 needs parallel.strategy=fsdp .or auto., got 'ddp'"):
        make_config(tmp_path, **{"parallel.shard_degree": 2, "parallel.strategy": "ddp"})
    # One process cannot be split into shard groups of 2: the trainer says so by key.
    with pytest.raises(ConfigError, match=r"parallel.shard_degree=2 needs parallel.strategy=fsdp .*'none' with 1 rank"):
        Trainer(make_config(tmp_path / "one", **{"parallel.shard_degree": 2}))
    assert main(["--preset=test", "--parallel.strategy=ddp", "--parallel.shard_degree=2", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.shard_degree=2 needs parallel.strategy=fsdp" in err[0]
    # The simulator refuses the same before it joins a (fake) process group.
    assert simulate_main(["--preset=test", "--world=4", "--shard_degree=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m olmo2.train.simulate: parallel.shard_degree=3 must divide the world size (4 ranks) "
                   "into replicate groups of equal size"]
    assert simulate_main(["--preset=test", "--world=4", "--rank=4"]) == 2
    assert capsys.readouterr().err.strip().endswith("rank must be in [0, 4), got 4")
    assert simulate_main(["--preset=test", "--world=0"]) == 2  # named as the world, not as a rank out of [0, 0)
    assert capsys.readouterr().err.strip().endswith("simulate: --world must be >= 1, got 0")
