"""The big runs simulated in one process under torch's fake process group
(olmo2.train.simulate): the trainer's model building, sharded initialization,
AdamW state and checkpoint save plan for one rank of 64.

* 32B, FSDP over 64 ranks, rank 0, initialized for real on the CPU: its
  parameters are exactly 1/64 of the model (no dim needs padding at 64), and the
  peak resident memory the initialization adds stays below 1/64 of the fp32 model
  plus INIT_OVERHEAD (measured: about 5 MB over the 2.01 GB shard).
* 32B, HSDP 8 x 8, rank 13 (on meta): parameters 1/8 of the model.
* The test model on 6 ranks, HSDP 2 x 3, the last shard (uneven rows: FSDP2 pads).
In every case the parameter bytes (FSDP2's padded buffers) and AdamW's bytes
equal the planner's (olmo2.train.planner.plan_memory) to the byte, and the local
checkpoint plan writes exactly the parameters and the optimizer state.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from olmo2.config import Olmo2Config, num_parameters

ROOT = Path(__file__).resolve().parents[1]
# What initializing a shard may add beyond the shard itself: one 256 KiB generation
# block, its mask and index temporaries, the allocator's slack.
INIT_OVERHEAD = 64 * 2**20

SCRIPT = """
import json, sys
from olmo2.train.config import resolve
from olmo2.train.simulate import simulate
for case in json.loads(sys.argv[1]):
    cfg = resolve(case.get("config"), case.get("overrides"), preset=case.get("preset"))
    result = simulate(cfg, case["world"], case.get("shard_degree"), case["rank"], init=case.get("init", False))
    print("RESULT " + json.dumps(result), flush=True)
"""

CASES = [
    {"config": "configs/olmo2-32b-stage1.yaml", "world": 64, "rank": 0, "init": True},
    {"config": "configs/olmo2-32b-stage1.yaml", "world": 64, "shard_degree": 8, "rank": 13},
    {"preset": "test", "overrides": {"global_batch_tokens": 6 * 32, "micro_batch_tokens": 32},
     "world": 6, "shard_degree": 3, "rank": 5},
]


@pytest.fixture(scope="module")
def simulated():
    # A fresh process: the fake group must be the only one, and the peak RSS its own.
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(CASES)
    return results


def _tensors(preset: str) -> int:
    layers = Olmo2Config.preset(preset).num_hidden_layers
    return 11 * layers + 3  # per block: 7 linears, q/k norms, 2 block norms; embedding, final norm, LM head


def _check_against_planner(result: dict, n_tensors: int) -> None:
    assert result["param_storage_bytes"] == result["planner_param_bytes"]
    assert result["optimizer_bytes"] == result["planner_optimizer_bytes"]
    # exp_avg and exp_avg_sq over the unpadded local shard, plus one fp32 step per tensor.
    assert result["optimizer_bytes"] == 2 * result["param_bytes"] + 4 * n_tensors
    assert result["optimizer_tensors"] == ["exp_avg", "exp_avg_sq", "step"]
    assert result["checkpoint_plan_bytes"] == result["param_bytes"] + result["optimizer_bytes"]
    assert result["param_bytes"] == result["expected_param_bytes"]


@pytest.mark.slow
def test_32b_fsdp_64_ranks_rank0_initializes_one_64th(simulated):
    result = simulated[0]
    full = 4 * num_parameters(Olmo2Config.preset("olmo2-32b"))
    assert result["mesh"] == [64] and result["rank"] == 0 and result["activation_checkpointing"]
    assert result["param_bytes"] * 64 == full  # every dim 0 of 32B divides by 64
    assert result["param_storage_bytes"] == result["param_bytes"]
    _check_against_planner(result, _tensors("olmo2-32b"))
    assert result["init_elements"] * 4 == result["param_bytes"]
    peak = result["init_peak_rss_bytes"]
    assert result["param_bytes"] * 0.98 <= peak <= full / 64 + INIT_OVERHEAD, (peak, full / 64)


@pytest.mark.slow
def test_32b_hsdp_8x8_holds_one_8th(simulated):
    result = simulated[1]
    full = 4 * num_parameters(Olmo2Config.preset("olmo2-32b"))
    assert result["mesh"] == [8, 8] and result["shard_index"] == 5
    assert result["param_bytes"] * 8 == full
    _check_against_planner(result, _tensors("olmo2-32b"))


@pytest.mark.slow
def test_uneven_last_shard_is_padded_as_planned(simulated):
    result = simulated[2]
    assert result["mesh"] == [2, 3] and result["shard_index"] == 2
    assert result["param_storage_bytes"] > result["param_bytes"]  # 64 and 160 rows over 3: padded
    _check_against_planner(result, _tensors("olmo2-test"))
