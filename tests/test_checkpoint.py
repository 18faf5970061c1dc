"""Trainer checkpoints: bitwise resume, atomic saves, keep-last-K, loading weights."""
import json

import pytest
import torch

from olmo2.train import ConfigError, Trainer
from olmo2.train import checkpoint as ckpt
from test_train_utils import make_config, params


def resume_config(tmp_path, max_steps, **extra):
    # A fixed decay horizon (not max_steps) so both runs follow one schedule, and
    # a short spike window so the detector's state is part of what must resume.
    return make_config(tmp_path, max_steps=max_steps, **{"schedule.decay_steps": 8, "spike.window": 4,
                                                         "spike.min_history": 2, **extra})


def optimizer_tensors(opt):
    return {(k, name): t.clone() for k, state in opt.state_dict()["state"].items() for name, t in state.items()}


def test_resume_is_bitwise_exact(tmp_path):
    straight = Trainer(resume_config(tmp_path / "a", 6))
    straight.fit()

    first = Trainer(resume_config(tmp_path / "b", 3))
    first.fit()
    assert ckpt.latest_checkpoint(first.ckpt_dir).name == "step00000003"
    second = Trainer(resume_config(tmp_path / "b", 6))
    assert second.step == 3 and second.train_data.next_step == 3
    assert second.resumed_from.endswith("step00000003")
    second.fit()

    assert [h["loss"] for h in second.history] == [h["loss"] for h in straight.history[3:]]
    assert second.spikes.state_dict() == straight.spikes.state_dict()
    for name, value in params(straight.model).items():
        assert torch.equal(second.model.state_dict()[name], value), name
    a, b = optimizer_tensors(straight.optimizer), optimizer_tensors(second.optimizer)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert second.tokens_seen == straight.tokens_seen == 6 * straight.cfg.global_batch_tokens
    # metrics.jsonl reads as one run of 6 steps.
    lines = (tmp_path / "b" / "runs" / "olmo2-test" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(resume_config(tmp_path, max_steps=2))
    trainer.fit()
    root = trainer.ckpt_dir
    assert (root / "latest").read_text().strip() == "step00000002"

    trainer.step = 4  # pretend two more steps ran
    real_write_json = ckpt.write_json

    def crash(path, obj):
        if path.name == ckpt.TRAINER_FILE:
            raise OSError("disk full (simulated)")
        real_write_json(path, obj)

    monkeypatch.setattr(ckpt, "write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        trainer.save()
    assert not (root / ".tmp-step00000004").exists()  # the failed save cleaned up after itself
    assert not (root / "step00000004").exists()
    assert (root / "latest").read_text().strip() == "step00000002"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]

    monkeypatch.setattr(ckpt, "write_json", real_write_json)
    (root / ".tmp-step00000004" / "state").mkdir(parents=True)  # as a SIGKILL mid-save leaves it
    resumed = Trainer(resume_config(tmp_path, max_steps=4))
    assert resumed.step == 2
    resumed.fit()
    assert (root / "latest").read_text().strip() == "step00000004"
    assert not (root / ".tmp-step00000004").exists()


def test_keep_last_k(tmp_path):
    trainer = Trainer(make_config(tmp_path, max_steps=5, **{"checkpoint.interval": 1, "checkpoint.keep_last": 2}))
    trainer.fit()
    assert [s for s, _ in ckpt.list_checkpoints(trainer.ckpt_dir)] == [4, 5]
    assert ckpt.latest_checkpoint(trainer.ckpt_dir).name == "step00000005"
    state = ckpt.read_trainer_state(trainer.ckpt_dir / "step00000005")
    assert state["step"] == 5 and state["data"]["next_step"] == 5 and state["world_size"] == 1


def test_resume_refusals(tmp_path):
    Trainer(make_config(tmp_path, max_steps=2)).fit()
    with pytest.raises(ConfigError, match="resume=never but .* already holds checkpoints"):
        Trainer(make_config(tmp_path, max_steps=4, resume="never"))
    with pytest.raises(ValueError, match="the checkpoint's data differs"):
        Trainer(make_config(tmp_path, max_steps=4, **{"data.seed": 1}))


def test_resume_from_an_explicit_folder_and_load_weights(tmp_path):
    trainer = Trainer(make_config(tmp_path, max_steps=3, **{"checkpoint.interval": 1, "checkpoint.keep_last": 0}))
    trainer.fit()
    step2 = trainer.ckpt_dir / "step00000002"
    other = Trainer(make_config(tmp_path / "other", max_steps=3, resume=str(step2)))
    assert other.step == 2
    loaded = ckpt.load_model_from_checkpoint(tmp_path / "runs" / "olmo2-test")  # a run folder: its latest
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    cfg = ckpt.checkpoint_config(step2)
    assert cfg == trainer.cfg
    with pytest.raises(FileNotFoundError, match="is not a trainer checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)


def test_rng_states_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_resume_skips_the_initial_values_and_refuses_a_checkpoint_that_cannot_fill_the_model(tmp_path, monkeypatch):
    """A resumed run allocates the model without drawing initial values (the load fills
    every parameter; the resumed run's bitwise equality is test_resume_is_bitwise_exact);
    a checkpoint that lacks a parameter is refused in one line before training starts."""
    import pickle

    import olmo2.train.init as init

    calls = []
    real = init.init_parameters_
    monkeypatch.setattr(init, "init_parameters_",
                        lambda model, seed, spec=None: calls.append(seed) or real(model, seed, spec))
    first = Trainer(resume_config(tmp_path, 2))
    assert len(calls) == 1  # a fresh run draws them
    first.fit()
    resumed = Trainer(resume_config(tmp_path, 4))
    assert len(calls) == 1 and resumed.step == 2  # the resume does not
    for name, value in params(first.model).items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    resumed.close()

    path = ckpt.latest_checkpoint(first.ckpt_dir)  # the same checkpoint, without one parameter
    meta_file = path / ckpt.STATE_DIR / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())
    del meta.state_dict_metadata["model.model.layers.0.mlp.up_proj.weight"]
    meta_file.write_bytes(pickle.dumps(meta))
    ckpt.write_manifest(path)  # a checkpoint that verifies: only its contents are short
    with pytest.raises(ckpt.CheckpointError) as refused:
        Trainer(resume_config(tmp_path, 4))
    assert "lacks model parameter model.layers.0.mlp.up_proj.weight" in str(refused.value)
    assert "\n" not in str(refused.value) and len(calls) == 1
