"""`benchmarks/run_gpu.sh quick` and its parts: the script's argument handling,
the correctness verdict (benchmarks/gpu_verdict.py), the environment report
(benchmarks/gpu_env.py) and the olmo2-bench options the quick step uses
(``kernels --tokens``, ``model --attn-backend``).

The whole ``bash benchmarks/run_gpu.sh quick --dry-run`` takes one to two
minutes on 2 CPU cores, too long for the suite: CI runs it as its own step
(.ci/run).
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import olmo2_kernels
from benchmarks import cli, harness, specs
from olmo2_kernels import reference

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


verdict = _load("gpu_verdict")
gpu_env = _load("gpu_env")


def _bash(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})


class TestScript:
    def test_syntax(self):
        subprocess.run(["bash", "-n", str(SCRIPT)], check=True)

    def test_help_lists_quick_and_dry_run(self):
        out = _bash("--help")
        assert out.returncode == 0
        assert "quick" in out.stdout and "--dry-run" in out.stdout

    def test_unknown_step_fails_before_running_anything(self):
        out = _bash("env", "kernel")
        assert out.returncode == 2
        assert "unknown step 'kernel'" in out.stderr
        assert "+ " not in out.stdout  # env did not run

    def test_dry_run_goes_with_quick_alone(self):
        out = _bash("env", "--dry-run")
        assert out.returncode == 2 and "quick" in out.stderr


class TestVerdict:
    def test_tiny_run_passes_and_writes_json(self, tmp_path, capsys):
        path = tmp_path / "v.json"
        code = verdict.main(["--device", "cpu", "--backends", "triton,torch", "--ops", "rms_norm",
                             "--dtypes", "fp32", "--json", str(path)])
        out = capsys.readouterr().out
        assert code == 0, out
        doc = json.loads(path.read_text())
        n_shapes = len(verdict.cases("rms_norm", "tiny"))
        assert len(doc["cases"]) == 2 * n_shapes
        assert {c["status"] for c in doc["cases"]} == {"PASS"}
        assert any(c["strided"] for c in doc["cases"])
        assert set(doc["cases"][0]["tensors"]) == {"y", "dx", "dweight"}
        assert "VERDICT: PASS" in out
        assert out.count("\nPASS  rms_norm") == 2 * n_shapes

    def test_a_wrong_kernel_fails(self, monkeypatch, capsys):
        def off_by_a_percent(x, weight, eps=1e-6):
            return reference.rms_norm(x, weight, eps) * 1.01

        monkeypatch.setattr(olmo2_kernels, "rms_norm", off_by_a_percent)
        code = verdict.main(["--device", "cpu", "--backends", "torch", "--ops", "rms_norm", "--dtypes", "fp32"])
        out = capsys.readouterr().out
        assert code == 1
        assert "\nFAIL  rms_norm" in out and "VERDICT: FAIL" in out

    def test_a_read_past_the_row_fails(self, monkeypatch, capsys):
        """Strided inputs sit in NaN-filled buffers: reading the padding shows."""
        def reads_padding(x, weight, eps=1e-6):
            if x.stride(-2) != x.shape[-1]:
                x = x.as_strided(x.shape, x.stride(), x.storage_offset() + 1)
            return reference.rms_norm(x, weight, eps)

        monkeypatch.setattr(olmo2_kernels, "rms_norm", reads_padding)
        code = verdict.main(["--device", "cpu", "--backends", "torch", "--ops", "rms_norm", "--dtypes", "fp32"])
        out = capsys.readouterr().out
        assert code == 1
        failed = [line for line in out.splitlines() if line.startswith(("FAIL", "ERROR"))]
        assert failed and all(line.startswith("FAIL") and "strided" in line for line in failed), out

    def test_nothing_ran_is_an_error(self, capsys):
        code = verdict.main(["--device", "cpu", "--backends", "cuda", "--ops", "swiglu"])
        assert code == 2
        assert "NOTHING RAN" in capsys.readouterr().out

    def test_deadline_reports_incomplete(self, capsys):
        code = verdict.main(["--device", "cpu", "--backends", "torch", "--ops", "swiglu", "--deadline", "0"])
        out = capsys.readouterr().out
        assert code == 3 and "INCOMPLETE" in out and "swiglu" in out

    def test_workers_share_the_ops(self, tmp_path, capsys):
        path = tmp_path / "v.json"
        code = verdict.main(["--device", "cpu", "--backends", "torch", "--ops", "swiglu,cross_entropy",
                             "--dtypes", "fp32", "--jobs", "2", "--json", str(path)])
        assert code == 0, capsys.readouterr().out
        ops = [c["op"] for c in json.loads(path.read_text())["cases"]]
        assert ops == sorted(ops, key=verdict.OPS.index) and set(ops) == {"swiglu", "cross_entropy"}

    def test_compare(self):
        tol = {"atol": 1e-3, "rtol": 1e-2}
        e = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
        got = verdict.compare(torch.tensor([1.011, -2.0, 0.0]), e, tol)
        assert got["ratio"] == pytest.approx(0.011 / 0.011, rel=1e-3)
        assert verdict.compare(torch.tensor([1.0, float("nan"), 0.0]), e, tol)["ratio"] == math.inf
        assert verdict.compare(torch.ones(2), e, tol)["ratio"] == math.inf

    @pytest.mark.parametrize("op", verdict.OPS)
    def test_gpu_shapes_fit_the_benchmark_specs(self, op):
        spec = specs.SPECS[op]
        expected_dims = set(specs.plan("cuda", ops=(op,))[0].d)
        shapes = verdict.cases(op, "gpu")
        assert any(label.startswith("olmo2-") for label, _, _ in shapes)
        assert any(strided for _, _, strided in shapes)
        for _, dims, _ in shapes + verdict.cases(op, "tiny"):
            assert set(dims) == expected_dims
        # the reduction rules name tensors the op really has
        dims = verdict.cases(op, "tiny")[0][1]
        ref = harness.reference_results(spec, dims, torch.float32, torch.device("cpu"), 0)
        names = set(ref["outputs"]) | {"d" + n for n in ref["grads"]}
        reduced = {n for n in names if verdict.tolerance_rule(op, n, dims, torch.float32)[1] != 1}
        for name in ("dweight", "dq_weight", "dk_weight", "dlogits", "dhidden", "ce", "z", "loss"):
            if verdict.tolerance_rule(op, name, dims, torch.float32)[1] != 1:
                assert name in reduced, f"{op}: a tolerance rule for {name!r}, which the op does not have"


def test_gpu_env_report(tmp_path, capsys):
    assert gpu_env.main(["--json", str(tmp_path / "env.json")]) == 0
    doc = json.loads((tmp_path / "env.json").read_text())
    assert doc["torch"] == torch.__version__ and "backends" in doc["backend_info"]
    assert "backend triton" in capsys.readouterr().out


class TestBenchOptions:
    def test_tokens_gives_one_shape_per_op_and_preset(self):
        cases = specs.plan("cuda", tokens=16384)
        assert [c.key for c in cases] == [
            "rms_norm[olmo2-1b:16384x2048]", "rms_norm[olmo2-7b:16384x4096]",
            "qk_norm_rope[olmo2-1b:4x4096x16x16x128]", "qk_norm_rope[olmo2-7b:4x4096x32x32x128]",
            "swiglu[olmo2-1b:16384x8192]", "cross_entropy[olmo2-1b:16384x100352]",
            "linear_cross_entropy[olmo2-1b:16384x2048x100352]", "linear_cross_entropy[olmo2-7b:16384x4096x100352]",
        ]
        assert specs.plan("cpu", ops=("qk_norm_rope",), tokens=100)[0].d["seq"] == 100
        assert len(specs.plan("cuda")) == 14  # without --tokens: the presets' counts
        with pytest.raises(ValueError, match="tokens must be a positive int"):
            specs.plan("cuda", tokens=0)

    def test_model_attn_backend_sdpa_flash(self, tmp_path):
        code = cli.main(["model", "--quick", "--threads", "1", "--no-plots", "--out", str(tmp_path),
                         "--impls", "eager", "--steps", "1", "--attn-backend", "sdpa-flash"])
        assert code == 0
        doc = json.loads((tmp_path / "model.json").read_text())
        assert doc["config"]["attn_backend"] == "sdpa-flash"
        assert doc["rows"][0]["status"] == "ok" and doc["rows"][0]["attn_backend"] == "sdpa-flash"

    def test_model_flash_attn_rows_skip_without_the_package(self, tmp_path):
        if importlib.util.find_spec("flash_attn") is not None:
            pytest.skip("flash_attn is installed: its rows would run")
        code = cli.main(["model", "--quick", "--threads", "1", "--no-plots", "--out", str(tmp_path),
                         "--impls", "kernels,transformers", "--attn-backend", "flash_attn"])
        assert code == 0
        rows = json.loads((tmp_path / "model.json").read_text())["rows"]
        assert [r["status"] for r in rows] == ["skipped", "skipped"]
        assert all("flash_attn not importable" in r["reason"] for r in rows)
