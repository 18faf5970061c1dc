"""AdamW groups, learning-rate schedules, clipping and the spike detector, by hand computation."""
import math

import pytest
import torch

from olmo2 import Olmo2Config, Olmo2ForCausalLM
from olmo2.hardware import peak_flops, peak_flops_for_name
from olmo2.train.metrics import mfu
from olmo2.train.optim import LRSchedule, build_adamw, clip_grad_norm_, split_params
from olmo2.train.stability import SpikeDetector


# ---------------------------------------------------------------------- schedules
def test_warmup_then_cosine_to_a_tenth():
    s = LRSchedule(peak_lr=1e-3, name="cosine", warmup_steps=10, decay_steps=110, final_lr_ratio=0.1)
    assert s(1) == pytest.approx(1e-4)          # 1/10 of peak: the first update is not wasted
    assert s(5) == pytest.approx(5e-4)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way: (1 + cos(pi/2)) / 2 = 0.5
    assert s(35) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == pytest.approx(1e-4)
    assert s(500) == pytest.approx(1e-4)        # held at the floor past the horizon


def test_truncated_cosine_stops_above_the_floor():
    # Stage 1: a 5T-token horizon, stopped at 4T (the 1B): the last LR is still above 0.1 x peak.
    s = LRSchedule(peak_lr=4e-4, name="cosine", warmup_steps=4000, decay_steps=2_384_186, final_lr_ratio=0.1)
    last = s(1_907_349)
    p = (1_907_349 - 4000) / (2_384_186 - 4000)
    assert last == pytest.approx(4e-5 + 3.6e-4 * 0.5 * (1 + math.cos(math.pi * p)))
    assert 4e-5 < last < 1e-4


def test_linear_decay_to_zero_without_warmup():
    s = LRSchedule(peak_lr=6e-5, name="linear", warmup_steps=0, decay_steps=100, final_lr_ratio=0.0)
    assert s(1) == pytest.approx(6e-5 * 0.99)
    assert s(50) == pytest.approx(3e-5)
    assert s(100) == 0.0


def test_constant_and_bad_schedules():
    assert LRSchedule(peak_lr=0.1, name="constant", warmup_steps=2)(1) == pytest.approx(0.05)
    assert LRSchedule(peak_lr=0.1, name="constant", warmup_steps=2)(99) == 0.1
    with pytest.raises(ValueError, match="name must be one of"):
        LRSchedule(peak_lr=0.1, name="step")
    with pytest.raises(ValueError, match=r"decay_steps \(5\) must exceed warmup_steps \(5\)"):
        LRSchedule(peak_lr=0.1, warmup_steps=5, decay_steps=5)


# ---------------------------------------------------------------------- parameter groups
def test_no_weight_decay_on_embedding_only():
    model = Olmo2ForCausalLM.from_config(Olmo2Config.preset("olmo2-test"))
    decay, no_decay = split_params(model)
    assert list(no_decay) == ["model.embed_tokens.weight"]
    assert "lm_head.weight" in decay and "model.norm.weight" in decay
    assert "model.layers.0.self_attn.q_norm.weight" in decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    _, no_decay = split_params(model, norm_weight_decay=False)
    assert "model.norm.weight" in no_decay and "model.layers.1.post_feedforward_layernorm.weight" in no_decay

    opt = build_adamw(model, lr=1e-3)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["betas"] == (0.9, 0.95) and groups["decay"]["eps"] == 1e-8


# ---------------------------------------------------------------------- clipping
def test_clip_to_global_norm():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    norm = clip_grad_norm_([a, b], max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)  # the norm before clipping
    total = torch.cat([a.grad, b.grad]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.0, 0.0]), rtol=1e-5, atol=1e-6)


def test_clip_leaves_small_gradients_and_reports_nonfinite():
    a = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([0.3, 0.4])
    assert clip_grad_norm_([a], 1.0).item() == pytest.approx(0.5)
    torch.testing.assert_close(a.grad, torch.tensor([0.3, 0.4]))
    a.grad = torch.tensor([float("nan"), 1.0])
    assert not torch.isfinite(clip_grad_norm_([a], 1.0))


# ---------------------------------------------------------------------- spikes
def olmo_core_skips(losses, grad_norms, window=128, sigma=6.0):
    """OLMo-core 3.0's SkipStepOptimizer rule, restated: the current value is appended to a
    list of at most window + 1, judged once the list holds max(2, window // 2) values, against
    the mean and (unbiased) std of the values before it."""
    kept_l, kept_g, skipped = [], [], []
    for loss, norm in zip(losses, grad_norms):
        kept_l = (kept_l + [loss])[-(window + 1):]
        kept_g = (kept_g + [norm])[-(window + 1):]
        if len(kept_l) < max(2, window // 2):
            skipped.append(False)
            continue
        ok = all((v[-1] - torch.tensor(v[:-1]).mean().item()) <= sigma * torch.tensor(v[:-1]).std().item()
                 for v in (kept_l, kept_g))
        skipped.append(not ok)
    return skipped


def test_spike_detector_first_judged_step_is_olmo_cores():
    """A step is judged once 64 values exist counting its own: the 64th step, not the 65th."""
    calm = [2.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(62)]
    for history in (62, 63):
        det = SpikeDetector(window=128, min_history=64, sigma=6.0)
        for v in calm + [2.0] * (history - 62):
            assert det.check(v, 1.0) is None
        judged = det.check(100.0, 1.0) is not None  # step history + 1
        assert judged == (history == 63)
        losses = calm + [2.0] * (history - 62) + [100.0]
        assert olmo_core_skips(losses, [1.0] * len(losses))[-1] == judged


def test_spike_detector_matches_olmo_core_on_a_noisy_run():
    gen = torch.Generator().manual_seed(0)
    losses = (3.0 - torch.linspace(0, 1, 300) + 0.05 * torch.randn(300, generator=gen)).tolist()
    norms = (1.0 + 0.1 * torch.randn(300, generator=gen).abs()).tolist()
    for i in (70, 90, 200, 201, 250):  # spikes, two in a row
        losses[i] += 3.0
    norms[150] *= 20
    det = SpikeDetector(window=128, min_history=64, sigma=6.0)
    ours = [det.check(a, b) is not None for a, b in zip(losses, norms)]
    assert ours == olmo_core_skips(losses, norms)
    assert sum(ours) >= 4


def test_spike_detector_rule():
    values = [2.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(63)]
    det = SpikeDetector(window=128, min_history=64, sigma=6.0)
    for v in values + [2.0]:
        det.check(v, 1.0 + 0.001 * (v - 2.0))
    n, hist = 64, list(det.history["loss"])
    mean = sum(hist) / n
    std = math.sqrt(sum((h - mean) ** 2 for h in hist) / (n - 1))

    def probe(loss, grad_norm=1.0):
        copy = SpikeDetector(window=128, min_history=64, sigma=6.0)
        copy.load_state_dict(det.state_dict())
        return copy.check(loss, grad_norm)

    assert probe(mean + 5.9 * std) is None
    assert probe(mean + 6.1 * std).startswith("loss spike")
    assert probe(2.0, 50.0).startswith("grad_norm spike")
    assert probe(float("nan")) is None  # non-finite: caught by the trainer, kept out of the history
    det.check(float("nan"), 1.0)
    assert len(det.history["loss"]) == 64
    # A spike still enters the history (OLMo-core), and is counted.
    assert det.check(100.0, 1.0) is not None
    assert det.history["loss"][-1] == 100.0 and det.skipped == 1


def test_spike_detector_window_and_state():
    det = SpikeDetector(window=4, min_history=2, sigma=6.0)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):
        det.check(v, 0.5)
    assert list(det.history["loss"]) == [2.0, 3.0, 4.0, 5.0]
    other = SpikeDetector(window=4, min_history=2, sigma=6.0)
    other.load_state_dict(det.state_dict())
    assert other.state_dict() == det.state_dict()
    with pytest.raises(ValueError, match="min_history <= window"):
        SpikeDetector(window=4, min_history=8)


def test_mfu():
    assert peak_flops(torch.device("cpu")) is None
    assert mfu(1000.0, 6e9, None) is None
    assert mfu(55_000.0, 7.2e9, 989.5e12) == pytest.approx(55_000 * 7.2e9 / 989.5e12)


def test_metrics_record_says_how_flops_are_counted():
    from olmo2 import FLOPS_CONVENTION
    from olmo2.train.metrics import StepResult, TrainMetrics

    metrics = TrainMetrics(global_batch_tokens=4096, world_size=1, flops_per_token=1e9, peak_flops=1e15,
                           device=torch.device("cpu"), log_interval=1, max_steps=1)
    record = metrics.record(1, StepResult(2.0, 1.9, 0.1, 1.0, 1e-3, 4000.0), tokens_seen=4096)
    assert record["flops_convention"] == FLOPS_CONVENTION and "causal" in FLOPS_CONVENTION
    assert record["flops_per_token"] == 1e9 and record["mfu"] > 0


def test_peak_flops_table_is_longest_match():
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989.5e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA GH200 480GB") == 989.5e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA A10") == 125e12
    assert peak_flops_for_name("NVIDIA L40S") == 362.05e12
    assert peak_flops_for_name("Some CPU") is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_norm_parameters_found_by_type_not_by_name():
    """A module merely named like a norm is decayed; the kernels' RMSNorm and torch's norms are norms."""
    import olmo2_kernels
    from olmo2.train.optim import split_params

    class NormalizerHead(torch.nn.Module):  # "norm" in the name, not a normalization
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

    model = torch.nn.ModuleDict({
        "head": NormalizerHead(), "rms": olmo2_kernels.RMSNorm(3), "ln": torch.nn.LayerNorm(3),
    })
    decay, no_decay = split_params(model, norm_weight_decay=False)
    assert set(decay) == {"head.weight"}
    assert set(no_decay) == {"rms.weight", "ln.weight", "ln.bias"}
