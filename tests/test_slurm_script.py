"""scripts/slurm/train.sbatch: valid bash, and the torchrun command it launches,
run under stub ``scontrol``/``srun`` that record what they are asked."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train.sbatch"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_sbatch_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_sbatch_script_refuses_an_empty_node_list(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nexit 0\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "",
           "SLURM_JOB_NUM_NODES": "0", "SLURM_JOB_ID": "1"}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "train.sbatch: scontrol show hostnames gave no node for SLURM_JOB_NODELIST=''"]


def test_sbatch_script_launches_torchrun_with_a_c10d_rendezvous_on_the_head_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "srun.log"
    # 2048 node names (about 26 KB, more than a pipe holds): a `| head -n 1` reader would
    # exit first and scontrol would die of SIGPIPE, which pipefail turns into a failed job.
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nprintf "gpu-node-07\\ngpu-node-08\\n"\n'
        'for i in $(seq 1 2046); do printf "gpu-node-%05d\\n" "$i"; done\n')
    (bin_dir / "srun").write_text(
        '#!/bin/bash\n'
        'if [[ " $* " == *" hostname "* ]]; then echo "10.1.2.7 fe80::1"; exit 0; fi\n'
        f'printf "%s\\n" "$@" > {log}\n'
        'env | grep -E "^(RDZV_ENDPOINT|OMP_NUM_THREADS|TORCH_NCCL_ASYNC_ERROR_HANDLING|NCCL_DEBUG)="'
        f' | sort >> {log}\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "PYTHON": "/venv/bin/python"}
    env.pop("NCCL_DEBUG", None)
    out = subprocess.run(["bash", str(SCRIPT), "--config", "configs/olmo2-32b-stage1.yaml",
                          "--parallel.shard_degree=8"], env=env, capture_output=True, text=True, check=True)
    assert "rendezvous 10.1.2.7:29500" in out.stdout
    args = log.read_text().splitlines()
    assert args[:4] == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1", "/venv/bin/python"]
    for expected in ("--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=10.1.2.7:29500",
                     "--rdzv_id=4242", "RDZV_ENDPOINT=10.1.2.7:29500", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                     "NCCL_DEBUG=WARN", "OMP_NUM_THREADS=8"):
        assert expected in args, (expected, args)
    tail = args[args.index("-m", args.index("torch.distributed.run")):]
    assert tail[:5] == ["-m", "olmo2.train", "--config", "configs/olmo2-32b-stage1.yaml", "--parallel.shard_degree=8"]
