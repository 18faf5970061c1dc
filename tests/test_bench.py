"""olmo2-bench: byte/FLOP formulas against hand counts, the timing harness on a
known workload, the error columns against a deliberately wrong implementation,
and quick CPU runs of the CLI writing valid JSON."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from benchmarks import cli, harness, impls, kernels, report, specs
from olmo2_kernels import reference

CPU = torch.device("cpu")
BF16, FP32 = torch.bfloat16, torch.float32


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- byte and FLOP counts
class TestWorkCounts:
    """Each expected number is worked out by hand in the comment beside it."""

    def test_rms_norm(self):
        spec, d = specs.SPECS["rms_norm"], {"rows": 32768, "width": 2048}
        # forward: read x (32768*2048*2 B = 134,217,728) and weight (4,096), write y (134,217,728)
        assert spec.bytes(d, BF16, backward=False) == 268_439_552
        # + backward: read dy, x (2 * 134,217,728), weight (4,096); write dx (134,217,728), dweight (4,096)
        assert spec.bytes(d, BF16, backward=True) == 268_439_552 + 402_661_376
        # fp32, odd shape: (2 * 7 * 199 + 199) * 4
        assert spec.bytes({"rows": 7, "width": 199}, FP32, backward=False) == 11_940
        assert spec.flops(d, backward=True) is None

    def test_qk_norm_rope(self):
        spec = specs.SPECS["qk_norm_rope"]
        d = {"batch": 8, "seq": 4096, "q_heads": 16, "kv_heads": 16, "head_dim": 128}
        # q and k each 8*4096*2048 = 67,108,864 elements (134,217,728 B); weights 2048 each (4,096 B);
        # cos + sin fp32 tables 2 * 4096 * 128 * 4 = 4,194,304 B.
        # forward: read q, k, weights, tables; write q_out, k_out = 4 * 134,217,728 + 8,192 + 4,194,304
        assert spec.bytes(d, BF16, backward=False) == 541_073_408
        # backward: read dq_out, dk_out, q, k, weights, tables; write dq, dk, dweights
        #   = 6 * 134,217,728 + 4 * 4,096 + 4,194,304 = 809,517,056
        assert spec.bytes(d, BF16, backward=True) == 541_073_408 + 809_517_056

    def test_swiglu(self):
        spec, d = specs.SPECS["swiglu"], {"rows": 32768, "width": 8192}
        # each tensor 32768*8192*2 = 536,870,912 B; forward 3 of them, backward 5 more (exactly 4 GiB in all)
        assert spec.bytes(d, BF16, backward=False) == 3 * 536_870_912
        assert spec.bytes(d, BF16, backward=True) == 4 * 2**30

    def test_cross_entropy(self):
        spec, d = specs.SPECS["cross_entropy"], {"tokens": 8192, "vocab": 100352}
        # logits 8192*100352*2 = 1,644,167,168 B; labels 8192*8 = 65,536; ce and z 4 B each
        assert spec.bytes(d, BF16, backward=False) == 1_644_167_168 + 65_536 + 8
        # one pass: + two scalar upstream gradients (8 B) + dlogits (1,644,167,168)
        assert spec.bytes(d, BF16, backward=True) == 1_644_232_712 + 8 + 1_644_167_168

    def test_linear_cross_entropy(self):
        spec, d = specs.SPECS["linear_cross_entropy"], {"tokens": 8192, "hidden": 2048, "vocab": 100352}
        # hidden 8192*2048*2 = 33,554,432 B; weight 100352*2048*2 = 411,041,792 B; labels 65,536; losses 8
        assert spec.bytes(d, BF16, backward=False) == 444_661_768
        assert spec.bytes(d, BF16, backward=True) == 444_661_768 + 8 + 33_554_432 + 411_041_792
        # N*H*V = 8192 * 2048 * 100352 = 1,683,627,180,032
        assert spec.flops(d, backward=False) == 2 * 1_683_627_180_032
        assert spec.flops(d, backward=True) == 6 * 1_683_627_180_032

    @pytest.mark.parametrize("op", specs.OPS)
    @pytest.mark.parametrize("dtype", [FP32, BF16])
    def test_formulas_match_the_tensors_built(self, op, dtype):
        """On small odd shapes: forward bytes = inputs + outputs actually allocated;
        backward adds upstream gradients, (for row ops) the inputs again, and the gradients."""
        spec = specs.SPECS[op]
        case = spec.cases("cpu", (specs.CPU_PRESET,), quick=True)[0]
        dims = {k: (7 if k in ("rows", "tokens") else v) for k, v in case.d.items()}
        if op == "qk_norm_rope":
            dims.update(batch=2, seq=5)
        inputs = spec.make_inputs(dims, dtype, CPU, 0)
        outputs = spec.call(getattr(reference, op), inputs)
        out_bytes = sum(t.numel() * t.element_size() for k, t in outputs.items() if k != "loss")
        assert spec.bytes(dims, dtype, backward=False) == specs.input_bytes(inputs) + out_bytes
        grad_bytes = sum(inputs[n].numel() * inputs[n].element_size() for n in spec.grad_inputs)
        bwd = spec.bytes(dims, dtype, backward=True) - spec.bytes(dims, dtype, backward=False)
        if op in ("cross_entropy", "linear_cross_entropy"):
            assert bwd == 2 * specs.LOSS_BYTES + grad_bytes
        else:
            upstream = spec.make_upstream(dims, dtype, CPU, 0)
            assert bwd == specs.input_bytes(upstream) + specs.input_bytes(inputs) + grad_bytes

    def test_gpu_plan_uses_the_model_presets(self):
        from olmo2.config import Olmo2Config

        cases = {c.key for c in specs.plan("cuda")}
        d1, d7 = Olmo2Config.preset("olmo2-1b").hidden_size, Olmo2Config.preset("olmo2-7b").hidden_size
        assert f"rms_norm[olmo2-1b:32768x{d1}]" in cases and f"rms_norm[olmo2-7b:32768x{d7}]" in cases
        assert "qk_norm_rope[olmo2-7b:8x4096x32x32x128]" in cases
        assert "swiglu[olmo2-1b:32768x8192]" in cases
        assert {f"linear_cross_entropy[olmo2-7b:{n}x4096x100352]" for n in (8192, 32768, 65536)} <= cases
        with pytest.raises(ValueError, match="must be one of"):
            specs.plan("cuda", presets=("olmo2-3b",))

    def test_numerics_rows_are_capped_for_the_float64_reference(self):
        spec = specs.SPECS["cross_entropy"]
        nd = spec.numerics_dims({"tokens": 65536, "vocab": 100352})
        assert nd["vocab"] == 100352 and nd["tokens"] * 100352 <= specs.NUMERICS_MAX_ELEMENTS
        small = {"tokens": 64, "vocab": 512}
        assert spec.numerics_dims(small) == small


# --------------------------------------------------------------------------- harness
class TestHarness:
    def test_quantiles(self):
        t = harness.summarize([float(v) for v in range(10, 0, -1)], warmup=2)
        assert (t.median_ms, t.q20_ms, t.q80_ms, t.min_ms, t.mean_ms) == pytest.approx((5.5, 2.8, 8.2, 1.0, 5.5))
        assert t.repeats == 10 and t.warmup == 2

    def test_known_workload_and_untimed_prepare(self):
        """A 2 ms sleep times at about 2 ms; a 10 ms prepare hook is not counted;
        every input set is used."""
        used = []
        cfg = harness.TimingConfig(warmup_calls=2, warmup_s=0.0, budget_s=0.05, min_repeats=12, max_repeats=12)
        t = harness.time_calls(lambda s: (used.append(s), time.sleep(0.002)), ["a", "b", "c"], CPU, cfg,
                               prepare=lambda s: time.sleep(0.010))
        assert t.repeats == 12 and t.warmup == 2
        assert 2.0 <= t.median_ms < 8.0, t
        assert t.min_ms <= t.q20_ms <= t.median_ms <= t.q80_ms
        assert set(used) == {"a", "b", "c"} and len(used) == 14

    def test_repeats_follow_the_budget(self):
        cfg = harness.TimingConfig(warmup_calls=2, warmup_s=0.0, budget_s=0.02, min_repeats=3, max_repeats=1000)
        t = harness.time_calls(lambda s: time.sleep(0.005), [None], CPU, cfg)
        assert 3 <= t.repeats <= 5

    def test_cpu_peak_memory(self):
        def call():
            a = torch.ones(2 * 2**20, dtype=torch.float32)  # 8 MiB, freed before the next
            del a
            return torch.ones(2**20, dtype=torch.float32)  # 4 MiB

        peak, why = harness.peak_memory(call, CPU)
        assert why is None
        assert 8 * 2**20 <= peak < 9 * 2**20

    def test_rotation_count(self):
        assert harness.rotation_count(1024, CPU) == 16  # tiny inputs: the most copies
        assert harness.rotation_count(2**40, CPU) == 1  # larger than memory share: one set

    def test_tensor_errors(self):
        expected = torch.tensor([1.0, -2.0, 4.0, 1e-9], dtype=torch.float64)
        actual = torch.tensor([1.0, -2.0, 4.4, 0.0])
        e = harness.tensor_errors(actual, expected)
        assert e["max_abs"] == pytest.approx(0.4, rel=1e-6)
        assert e["max_rel"] == pytest.approx(0.1, rel=1e-6)  # the 1e-9 element is floored at 4e-3
        assert e["norm_rel"] == pytest.approx(0.4 / math.sqrt(21), rel=1e-6)
        assert math.isnan(harness.tensor_errors(torch.tensor([float("nan")]), torch.ones(1, dtype=torch.float64))["max_rel"])


# --------------------------------------------------------------------------- the error columns are real
class _HalfGrad(torch.autograd.Function):
    """Identity forward, half the gradient backward: right values, wrong gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 0.5 * g


class _WrongImpl(impls.Impl):
    baseline = True

    def __init__(self, name, runner):
        self.name, self.description, self._runner = name, "deliberately wrong", runner

    def build(self, spec, dims):
        return self._runner


def _no_weight(inputs):  # forgets the RMSNorm weight
    return {"y": reference.rms_norm(inputs["x"], torch.ones_like(inputs["weight"]), specs.EPS)}


def _half_grad(inputs):  # right forward, gradient of x halved
    return {"y": reference.rms_norm(_HalfGrad.apply(inputs["x"]), inputs["weight"], specs.EPS)}


def test_wrong_implementations_show_large_errors(one_thread):
    torch.set_num_threads(1)
    case = specs.make_case("rms_norm", specs.CPU_PRESET, rows=33, width=199)
    chosen = [impls.IMPLS["torch"], _WrongImpl("no_weight", _no_weight), _WrongImpl("half_grad", _half_grad)]
    cfg = harness.TimingConfig(warmup_calls=1, warmup_s=0.0, budget_s=0.0, min_repeats=3, max_repeats=3)
    rows = {r["impl"]: r for r in kernels.run_case(case, chosen, CPU, FP32, quick=True, seed=0, timing=cfg,
                                                   ceilings={"copy_GBps": 1.0}, log=lambda *_: None)}
    good = rows["torch"]["numerics"]
    assert good["max_rel_outputs"] < 1e-5 and good["max_rel_grads"] < 1e-4
    no_weight = rows["no_weight"]["numerics"]
    assert no_weight["max_rel_outputs"] > 0.05
    assert no_weight["grads"]["weight"].get("missing") and math.isnan(no_weight["max_rel_grads"])
    half = rows["half_grad"]["numerics"]
    assert half["max_rel_outputs"] < 1e-5
    assert half["grads"]["x"]["max_rel"] > 0.4 and half["grads"]["weight"]["max_rel"] < 1e-4
    # the speedup column compares with the torch row of the same case
    assert rows["torch"]["speedup"]["fwd"] == pytest.approx(1.0)
    assert rows["half_grad"]["speedup"]["fwdbwd"] > 0
    lines, _ = report.kernel_lines(list(rows.values()))
    assert [line[2] for line in lines] == ["torch", "no_weight", "half_grad"]
    assert lines[2][4] != "-" and float(lines[2][4]) > 0.4


# --------------------------------------------------------------------------- the CLI
def _strict_json(path):
    def no_constants(name):
        raise ValueError(f"{path}: non-JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def test_kernels_quick_cpu_run(tmp_path, one_thread, capsys):
    code = cli.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--budget", "0.01"])
    assert code == 0
    doc = _strict_json(tmp_path / "kernels.json")
    assert doc["schema"] == report.SCHEMA_VERSION and doc["kind"] == "kernels"
    env = doc["env"]
    for key in ("device", "torch", "triton", "date", "git", "python"):
        assert key in env
    assert env["device"].startswith("CPU") and env["torch"] == torch.__version__
    assert set(env["git"]) >= {"commit", "dirty"}
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["ceilings"]["matmul_TFLOPs"] > 0

    rows = doc["rows"]
    assert {r["op"] for r in rows} == set(specs.OPS)
    measured = [r for r in rows if r["status"] == "ok"]
    assert {r["op"] for r in measured if r["impl"] == "torch"} == set(specs.OPS)
    for r in measured:
        num = r["numerics"]
        # The eager spec in fp32 is within fp32 rounding; other backends' accuracy is their own tests' business.
        limit = 1e-3 if r["impl"] == "torch" else 1e-1
        assert num["max_rel_outputs"] < limit and num["max_rel_grads"] < limit, (r["op"], r["impl"], num)
        assert num["grads"].keys() == set(specs.SPECS[r["op"]].grad_inputs)
        for p in ("fwd", "fwdbwd"):
            t = r[p]
            assert t["status"] == "ok" and 0 < t["q20_ms"] <= t["median_ms"] <= t["q80_ms"]
            assert t["repeats"] >= 5
            assert t["peak_mem_bytes"] is not None and t["peak_mem_bytes"] >= 0
            assert r["speedup"][p] > 0 and r["GBps"][p] > 0 and r["frac_of_ceiling"][p] > 0
        assert r["bytes"]["fwdbwd"] > r["bytes"]["fwd"] > 0
    lce = [r for r in measured if r["op"] == "linear_cross_entropy"]
    assert all(r["TFLOPs"]["fwdbwd"] > 0 for r in lce)
    # Triton is never benchmarked on CPU, even with the interpreter on (as in this test process).
    triton_rows = [r for r in rows if r["impl"] == "triton"]
    assert triton_rows and all(r["status"] == "skipped" and "interpreter" in r["reason"] for r in triton_rows)
    assert all(r["status"] == "skipped" and r["reason"] for r in rows if r["impl"] == "liger")
    out = capsys.readouterr().out
    assert "err out" in out and "x eager" in out and "notes" in out

    # report re-reads the file and prints the same table
    assert cli.main(["report", str(tmp_path / "kernels.json"), "--no-plots"]) == 0
    assert "rms_norm" in capsys.readouterr().out


def test_plots_or_a_reason(tmp_path, one_thread, capsys):
    doc = {"schema": 1, "kind": "kernels", "rows": [], "ceilings": {}, "config": {"dtype": "float32"},
           "env": {"device": "cpu", "torch": "x", "git": {"commit": None}, "date": "2026-01-01"}}
    from benchmarks import plots

    written, why = plots.plot(doc, tmp_path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert written == [] and "matplotlib" in why
        return
    assert why is None and written == []


def test_model_quick_cpu_run(tmp_path, one_thread):
    pytest.importorskip("transformers", reason="the model benchmark compares with transformers' Olmo2ForCausalLM")
    code = cli.main(["model", "--quick", "--threads", "1", "--out", str(tmp_path), "--no-plots",
                     "--impls", "kernels,eager,compile,transformers"])
    assert code == 0
    doc = _strict_json(tmp_path / "model.json")
    rows = {r["impl"]: r for r in doc["rows"]}
    assert rows["compile"]["status"] == "skipped" and "--quick" in rows["compile"]["reason"]
    for name in ("kernels", "eager", "transformers"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["step"]["repeats"] == 3
    # Same weights, same tokens: the three agree on the cross-entropy.
    ce = [rows[n]["ce_loss"] for n in ("kernels", "eager", "transformers")]
    assert max(ce) - min(ce) < 1e-4 * max(ce)
    assert doc["flops_per_token"] > 0 and doc["env"]["device"].startswith("CPU")


def test_model_mfu_uses_the_trainers_peak_table(monkeypatch):
    """One peak-FLOPs table (olmo2.hardware): a GPU's MFU in olmo2-bench model and in training agree."""
    from benchmarks import model
    from olmo2 import hardware

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    gpu = torch.device("cuda")
    value, source = model.peak_flops(gpu, BF16, measured_tflops=500.0)
    assert value == hardware.peak_flops(gpu, BF16) == 756e12 and "H100 PCIe" in source
    # fp32 has no datasheet entry: the matmul rate measured in the run
    assert model.peak_flops(gpu, FP32, measured_tflops=50.0) == (50e12, "measured matmul rate 50 TFLOP/s "
                                                                     "(no datasheet peak for this device/dtype)")
    assert model.peak_flops(CPU, FP32, measured_tflops=None) == (None, "n/a")


def test_dpo_step_quick_cpu_run(tmp_path, one_thread, capsys):
    """olmo2-bench dpo at a tiny size: both implementations run on the same weights and tokens (same loss), the
    harness's quantiles are reported, and the materialized step peaks more than one copy of the logits above the
    fused one."""
    code = cli.main(["dpo", "--quick", "--threads", "1", "--out", str(tmp_path), "--no-plots",
                     "--seq-len", "128", "--pairs", "2", "--vocab-size", "8192"])
    assert code == 0
    doc = _strict_json(tmp_path / "dpo.json")
    assert doc["kind"] == "dpo" and doc["config"]["rows"] == 4 and doc["model_config"]["vocab_size"] == 8192
    rows = {r["impl"]: r for r in doc["rows"]}
    for r in rows.values():
        assert r["status"] == "ok", r
        t = r["step"]
        assert t["repeats"] == 3 and t["q20_ms"] <= t["median_ms"] <= t["q80_ms"] and r["tokens_per_s"] > 0
        assert r["peak_mem_bytes"] > 0
    assert abs(rows["fused"]["loss"] - rows["materialized"]["loss"]) < 1e-4
    assert abs(rows["fused"]["logp_chosen_sum"] - rows["materialized"]["logp_chosen_sum"]) < 1e-3 * abs(
        rows["materialized"]["logp_chosen_sum"])
    logits = doc["logits_bytes"]
    assert logits == 4 * 128 * 8192 * 4
    # 4 rows x 128 tokens x 8192 vocab fp32 = 16 MiB of logits. The peak is measured above weights and (allocated)
    # gradients; both hold the body's activations, and the materialized step the logits, their fp32 log-softmax
    # and its gradient on top (measured: 85 MiB against 48 MiB), so it peaks more than one logits copy higher.
    assert rows["materialized"]["peak_mem_bytes"] - rows["fused"]["peak_mem_bytes"] > logits
    assert "fused" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path / "dpo.json"), "--no-plots"]) == 0
