"""The training loop on CPU: the loss falls, the first step matches a hand computation,
gradient accumulation, skipped steps, stage 2, the CLI."""
import copy
import json
import math

import pytest
import torch

from olmo2 import load_pretrained
from olmo2.cli.train import main
from olmo2.train import ConfigError, Trainer
from olmo2.train.optim import LRSchedule
from olmo2.train.stability import NonFiniteLossError
from test_train_utils import make_config, params, synthetic_tokens


def test_short_run_lowers_the_loss(tmp_path):
    cfg = make_config(tmp_path, max_steps=30, **{"checkpoint.save_final": False})
    trainer = Trainer(cfg)
    summary = trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    assert summary["step"] == 30 and len(losses) == 30
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    lines = [json.loads(x) for x in (tmp_path / "runs" / "olmo2-test" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    for key in ("loss", "ce_loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "tokens_seen", "mem/max_rss_gib"):
        assert key in lines[-1]
    assert lines[-1]["tokens_seen"] == 30 * cfg.global_batch_tokens


def test_first_step_by_hand(tmp_path):
    """Losses, z-loss, grad norm, clipping, learning rate and the AdamW update of step 1,
    recomputed with plain PyTorch from the logits."""
    cfg = make_config(tmp_path, max_steps=1, **{"optim.lr": 0.05, "optim.max_grad_norm": 0.5,
                                                "optim.z_loss_coef": 1e-2, "schedule.warmup_steps": 4, "schedule.decay_steps": 10,
                                                "checkpoint.save_final": False, "optim.eps": 1e-5})
    trainer = Trainer(cfg)
    start = copy.deepcopy(trainer.model)
    start_weights = start.lm_head.weight.detach().clone()
    batch = trainer.train_data.batch(0)
    trainer.fit()
    got = trainer.history[0]

    logits = start(batch).logits.float()[:, :-1]
    targets = batch[:, 1:]
    lse = torch.logsumexp(logits, dim=-1)
    ce = (lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).mean()
    z = 1e-2 * (lse**2).mean()
    assert got["ce_loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert got["z_loss"] == pytest.approx(z.item(), rel=1e-5)
    assert got["loss"] == pytest.approx((ce + z).item(), rel=1e-5)
    assert got["target_tokens"] == targets.numel()

    (ce + z).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in start.parameters())).item()
    assert got["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert norm > 0.5  # so clipping is exercised
    lr = 0.05 * 1 / 4  # warmup step 1 of 4
    assert got["lr"] == pytest.approx(lr)

    for p in start.parameters():
        p.grad.mul_(0.5 / (norm + 1e-6))
    decay = [p for n, p in start.named_parameters() if n != "model.embed_tokens.weight"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": [start.model.embed_tokens.weight], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-5)
    opt.step()
    for (name, expected), actual in zip(start.state_dict().items(), trainer.model.state_dict().values()):
        # Adam's first update is lr * g / (|g| + eps): where |g| is near eps the rounding
        # differences of two summation orders (about 1e-10 here) are amplified by lr / eps;
        # eps 1e-5 keeps that far below the tolerance, and every |g| >> eps still moves by lr.
        torch.testing.assert_close(actual, expected, rtol=0, atol=5e-3 * lr, msg=lambda m, name=name: f"{name}: {m}")
    moved = (trainer.model.lm_head.weight - start_weights).abs().max().item()
    assert moved == pytest.approx(lr, rel=0.05)  # so the comparison above is not vacuous


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    results = []
    for micro in (32, 4 * 32):  # 4 micro-batches of one instance, or one of four
        # eps 1e-4: Adam's g / (|g| + eps) is then smooth in g, so the rounding of two
        # summation orders stays at rounding level in the weights.
        cfg = make_config(tmp_path / str(micro), max_steps=3, micro_batch_tokens=micro,
                          **{"checkpoint.save_final": False, "optim.eps": 1e-4})
        trainer = Trainer(cfg)
        assert trainer.grad_accum == 4 * 32 // micro
        trainer.fit()
        results.append((params(trainer.model), [h["loss"] for h in trainer.history]))
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    for name, value in results[0][0].items():
        torch.testing.assert_close(value, results[1][0][name], rtol=1e-4, atol=1e-6, msg=name)


def _nan_once(trainer, at_call):
    """Make the final norm output NaN on forward call number ``at_call`` (0-based)."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] - 1 in at_call:
            return output * float("nan")
        return output

    return trainer.model.model.norm.register_forward_hook(hook)


def test_nonfinite_step_is_skipped(tmp_path):
    cfg = make_config(tmp_path, max_steps=3, micro_batch_tokens=4 * 32, **{"checkpoint.save_final": False})
    trainer = Trainer(cfg)
    _nan_once(trainer, at_call={1})  # step 2
    snapshots = []
    original = trainer.train_step

    def recording_step(batch):
        out = original(batch)
        snapshots.append(params(trainer.model))
        return out

    trainer.train_step = recording_step
    trainer.fit()
    assert [h["skipped"] for h in trainer.history] == [0, 1, 0]
    assert math.isnan(trainer.history[1]["loss"])
    assert trainer.guard.nonfinite_skips == 1 and trainer.step == 3
    for name, value in snapshots[0].items():
        assert torch.equal(value, snapshots[1][name]), name  # the skipped step changed nothing
    assert any(not torch.equal(v, snapshots[2][k]) for k, v in snapshots[1].items())


def test_training_stops_when_loss_stays_nonfinite(tmp_path):
    cfg = make_config(tmp_path, max_steps=20, micro_batch_tokens=4 * 32, **{"checkpoint.save_final": False})
    trainer = Trainer(cfg)
    _nan_once(trainer, at_call=set(range(100)))
    with pytest.raises(NonFiniteLossError, match="non-finite for 10 consecutive steps"):
        trainer.fit()


def test_loss_spike_skips_the_step(tmp_path):
    cfg = make_config(tmp_path, max_steps=6, micro_batch_tokens=4 * 32,
                      **{"spike.window": 8, "spike.min_history": 4, "optim.lr": 1e-4,
                         "checkpoint.save_final": False})
    trainer = Trainer(cfg)
    _nan_once(trainer, at_call=set())
    calls = {"n": 0}

    def spike(module, args, output):
        calls["n"] += 1
        return output * 30.0 if calls["n"] == 5 else output  # step 5: logits x30

    trainer.model.model.norm.register_forward_hook(spike)
    trainer.fit()
    assert [h["skipped"] for h in trainer.history] == [0, 0, 0, 0, 1, 0]
    assert trainer.spikes.skipped == 1


def test_stage2_anneals_linearly_to_zero_from_stage1(tmp_path):
    stage1 = make_config(tmp_path, max_steps=4, run_name="stage1")
    t1 = Trainer(stage1)
    t1.fit()
    final_lr = t1.history[-1]["lr"]
    assert final_lr == pytest.approx(LRSchedule(1e-2, "cosine", 1, 4, 0.1)(4))
    weights1 = params(t1.model)
    moments1 = {k: v["exp_avg"].clone() for k, v in t1.optimizer.state_dict()["state"].items()}

    other = synthetic_tokens(tmp_path / "mix2.npy", seed=7)
    stage2 = make_config(tmp_path, data=other, max_steps=4, run_name="stage2",
                         init_from=str(tmp_path / "runs" / "stage1"),
                         optim={"lr": None}, schedule={"name": "linear", "warmup_steps": 0, "final_lr_ratio": 0.0})
    t2 = Trainer(stage2)
    assert t2.step == 0 and t2.init_from.endswith("step00000004")
    for name, value in weights1.items():
        assert torch.equal(t2.model.state_dict()[name], value), name
    for k, v in t2.optimizer.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], moments1[k])
    t2.fit()
    assert [h["lr"] for h in t2.history] == pytest.approx([final_lr * (1 - k / 4) for k in range(1, 5)])


def test_stage2_loads_without_drawing_initial_values(tmp_path, monkeypatch):
    """A stage-2 start (init_from) allocates the model without drawing the initial values the
    load overwrites: the weights are stage 1's bitwise, the initializer is not called, and a
    stage-1 checkpoint that lacks one parameter is refused in one line naming it."""
    import pickle

    import olmo2.train.checkpoint as ckpt
    import olmo2.train.init as init

    calls = []
    real = init.init_parameters_
    monkeypatch.setattr(init, "init_parameters_",
                        lambda model, seed, spec=None: calls.append(seed) or real(model, seed, spec))
    t1 = Trainer(make_config(tmp_path, max_steps=2, run_name="stage1"))
    t1.fit()
    assert len(calls) == 1
    stage2 = dict(run_name="stage2", init_from=str(tmp_path / "runs" / "stage1"), optim={"lr": None},
                  schedule={"name": "linear", "warmup_steps": 0, "final_lr_ratio": 0.0})
    t2 = Trainer(make_config(tmp_path, max_steps=2, **stage2))
    assert len(calls) == 1 and t2.init_from.endswith("step00000002")
    for name, value in params(t1.model).items():
        assert torch.equal(t2.model.state_dict()[name], value), name
    t2.close()

    path = ckpt.latest_checkpoint(t1.ckpt_dir)  # the same checkpoint without the final norm's weight
    meta_file = path / ckpt.STATE_DIR / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())
    del meta.state_dict_metadata["model.model.norm.weight"]
    meta_file.write_bytes(pickle.dumps(meta))
    ckpt.write_manifest(path)  # it verifies: only its contents are short
    with pytest.raises(ckpt.CheckpointError) as refused:
        Trainer(make_config(tmp_path, max_steps=2, **{**stage2, "run_name": "stage2b"}))
    assert "lacks model parameter model.norm.weight" in str(refused.value)
    assert "\n" not in str(refused.value) and len(calls) == 1


def test_stage2_needs_init_from(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr is null"):
        make_config(tmp_path, optim={"lr": None})


def test_hf_export_matches_trained_weights(tmp_path):
    cfg = make_config(tmp_path, max_steps=2, **{"checkpoint.export_hf": True})
    trainer = Trainer(cfg)
    summary = trainer.fit()
    exported = load_pretrained(summary["hf"])
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name


def test_cli_dry_run_prints_resolved_config(tmp_path, capsys):
    assert main(["--preset=olmo2-7b", "--dry-run", f"--out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "hidden_size: 4096" in out and "lr: 0.0003" in out
    assert "global batch: 1024 instances x 4096 = 4,194,304 tokens" in out
    assert "warmup 2000 steps" in out
    assert not any(tmp_path.iterdir())  # nothing written
    assert main(["--optim.lr=oops", "--dry-run"]) == 2
    assert "optim.lr: Value 'oops' of type 'str' could not be converted to Float" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_cli_config_file_and_overrides(tmp_path, capsys):
    data = synthetic_tokens(tmp_path / "syn.npy")
    (tmp_path / "c.yaml").write_text(
        "preset: test\n"
        f"out_dir: {tmp_path / 'runs'}\n"
        "max_steps: 2\n"
        f"data:\n  sources:\n    - paths: [{data}]\n"
        "optim:\n  lr: 1e-3\n"
    )
    assert main(["--config", str(tmp_path / "c.yaml"), "--optim.lr=2e-3", "--run_name=cli"]) == 0
    saved = (tmp_path / "runs" / "cli" / "config.yaml").read_text()
    assert "lr: 0.002" in saved and "max_steps: 2" in saved
    assert (tmp_path / "runs" / "cli" / "checkpoints" / "step00000002" / "config.yaml").read_text() == saved


def test_default_run_on_the_builtin_corpus(tmp_path):
    """The no-argument default, shrunk: the standard library corpus, byte tokens, eval split."""
    assert main([f"--out_dir={tmp_path}", "--max_steps=2", "--schedule.warmup_steps=1",
                 "--model.num_hidden_layers=1", "--data.seq_len=32", "--global_batch_tokens=64",
                 "--micro_batch_tokens=64", "--eval_interval=2", "--eval_batches=1", "--progress=false",
                 "--tensorboard=false"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "olmo2-tiny" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/ce_loss" in lines[-1] and math.isfinite(lines[-1]["eval/ce_loss"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "olmo2-tiny" / "hf" / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == 256


def test_activation_checkpointing_and_compile_change_nothing(tmp_path):
    """Per-block checkpointing and torch.compile give the plain run's losses; their
    checkpoints carry clean names and resume without either wrapper."""
    horizon = {"schedule.decay_steps": 3}
    plain = Trainer(make_config(tmp_path / "plain", max_steps=3, **horizon))
    plain.fit()
    cfg = make_config(tmp_path / "wrapped", max_steps=2, **horizon, **{"parallel.activation_checkpointing": True,
                                                                       "parallel.compile": True})
    wrapped = Trainer(cfg)
    assert type(wrapped.model.model.layers[0]).__name__ == "OptimizedModule"
    wrapped.fit()
    resumed = Trainer(make_config(tmp_path / "wrapped", max_steps=3, **horizon))
    assert resumed.step == 2
    resumed.fit()
    losses = [h["loss"] for h in wrapped.history + resumed.history]
    assert losses == pytest.approx([h["loss"] for h in plain.history], rel=1e-5)
    assert "_orig_mod" not in "".join(ckpt_keys(tmp_path / "wrapped"))


def ckpt_keys(root):
    from torch.distributed.checkpoint import FileSystemReader

    from olmo2.train import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(root / "runs" / "olmo2-test") / "state"
    return list(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
