"""TrainConfig: presets as published, YAML + --key=value overrides merged by OmegaConf, errors, round trip, --help."""
from pathlib import Path

import pytest

from olmo2.cli.train import main, parse_args
from olmo2.train.config import PRESETS, ConfigError, TrainConfig, parse_overrides, resolve

# Pretraining configs (the post-training ones, sft-*.yaml and dpo-*.yaml, are checked by tests/test_sft.py).
CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")
                 if not p.name.startswith(("sft-", "dpo-")))


def test_default_is_the_tiny_preset():
    cfg = resolve()
    assert cfg.preset == "tiny" and cfg.model.vocab_size == 512 and cfg.model.eos_token_id == 256
    assert cfg.data.sources == []  # the built-in corpus
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.eps == 1e-8 and cfg.optim.weight_decay == 0.1
    assert cfg.optim.z_loss_coef == 1e-5 and cfg.optim.max_grad_norm == 1.0
    assert cfg.spike.window == 128 and cfg.spike.min_history == 64 and cfg.spike.sigma == 6.0


@pytest.mark.parametrize("name,lr,batch,warmup,stop_tokens", [
    ("olmo2-1b", 4e-4, 512, 4000, 4.0e12),
    ("olmo2-7b", 3e-4, 1024, 2000, 3.9e12),
    ("olmo2-13b", 9e-4, 2048, 1000, 5.0e12),
])
def test_published_presets(name, lr, batch, warmup, stop_tokens):
    cfg = resolve(preset=name)
    assert cfg.optim.lr == lr
    assert cfg.data.seq_len == 4096 and cfg.global_batch_instances == batch
    assert cfg.schedule.name == "cosine" and cfg.schedule.final_lr_ratio == 0.1
    assert cfg.schedule.warmup_steps == warmup  # 8.39B tokens
    assert cfg.schedule.decay_steps * cfg.global_batch_tokens == pytest.approx(5e12, rel=1e-6)
    assert cfg.max_steps * cfg.global_batch_tokens == pytest.approx(stop_tokens, rel=1e-6)
    assert cfg.model.hidden_size == {"olmo2-1b": 2048, "olmo2-7b": 4096, "olmo2-13b": 5120}[name]


def test_stage2_preset():
    cfg = resolve(preset="olmo2-7b-stage2", overrides=["--init_from=runs/x"])
    assert cfg.optim.lr is None and cfg.schedule.name == "linear" and cfg.schedule.final_lr_ratio == 0.0
    assert cfg.schedule.warmup_steps == 0
    assert cfg.max_steps * cfg.global_batch_tokens == pytest.approx(50e9, rel=1e-4)


def test_overrides_types_and_sections(tmp_path):
    cfg = resolve(overrides=["--optim.lr=1e-3", "--model.num_hidden_layers=2", "--max_steps=1_000",
                             "--data.sources=[{paths: [a.npy], weight: 0.7}, {paths: b.npy, dtype: uint16}]",
                             "--optim.betas=[0.8, 0.9]", "--parallel.compile=true", "--init_from=null"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.model.num_hidden_layers == 2 and cfg.model.hidden_size == 256
    assert cfg.max_steps == 1000 and cfg.optim.betas == (0.8, 0.9) and cfg.parallel.compile is True
    assert [s.paths for s in cfg.data.sources] == [["a.npy"], ["b.npy"]]
    assert cfg.data.sources[0].weight == 0.7 and cfg.data.sources[1].dtype == "uint16"
    assert resolve(overrides=["--model.preset=olmo2-test"]).model.hidden_size == 64


def test_precedence_preset_file_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: test\nmax_steps: 50\noptim:\n  lr: 1e-3\n")
    cfg = resolve(config_file=path, overrides=["--optim.lr=2e-3"])
    assert cfg.preset == "test" and cfg.max_steps == 50 and cfg.optim.lr == 2e-3
    assert cfg.model.hidden_size == 64  # from the preset, untouched by the file
    cfg, dry = parse_args(["--config", str(path), "--dry-run", "--preset=tiny"])
    assert dry and cfg.preset == "tiny" and cfg.max_steps == 50


def test_round_trip_through_yaml(tmp_path):
    cfg = resolve(preset="olmo2-7b", overrides=["--data.sources=[{paths: [x.npy], weight: 2}]", "--seed=3"])
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("args,message", [
    (["--optim.lr=fast"], "optim.lr: Value 'fast' of type 'str' could not be converted to Float"),
    (["--nope=1"], "nope: Key 'nope' not in 'TrainConfig'"),
    (["--optim.nope=1"], "optim.nope: Key 'nope' not in 'OptimConfig'"),
    (["--model.layers=2"], "model.layers: Key 'layers' not in 'Olmo2Config'"),
    (["--model.hidden_size=-8"], "model: Olmo2Config: hidden_size must be a positive int"),
    (["--model.preset=olmo2-huge"], "model.preset must be one of"),
    (["--max_steps=1.5"], "max_steps: Value '1.5' of type 'float' could not be converted to Integer"),
    (["--preset=huge"], "preset must be one of"),
    (["--global_batch_tokens=1000"], r"global_batch_tokens \(1000\) must be a multiple of data.seq_len \(128\)"),
    (["--micro_batch_tokens=1536"], r"must be a multiple of micro_batch_tokens \(1536\)"),
    (["--data.seq_len=1024"], r"data.seq_len \(1024\) exceeds model.max_position_embeddings \(512\)"),
    (["--parallel.strategy=zero3"], "parallel.strategy must be one of"),
    (["--schedule.name=step"], "schedule.name must be one of"),
    (["--max_steps=0"], "max_steps must be an int >= 1, got 0"),
    (["--data.sources=[{weight: 1}]"], "paths must list at least one token file"),
    (["--data.sources=[{paths: [a], dtype: int64}]"], "dtype must be 'uint32' or 'uint16'"),
    (["--parallel.compile=maybe"], "parallel.compile: Value 'maybe' is not a valid bool"),
    (["max_steps=3"], "must look like --key=value"),
    (["--kernel_backend=fast"], "kernel_backend must be one of"),
])
def test_errors_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve(overrides=args)
    assert "\n" not in str(info.value)  # one line


def test_grad_accum_for_world_size():
    cfg = resolve(overrides=["--global_batch_tokens=4096", "--micro_batch_tokens=512"])
    assert cfg.grad_accum_steps(1) == 8 and cfg.grad_accum_steps(4) == 2
    with pytest.raises(ConfigError, match=r"x world size \(16\)"):
        cfg.grad_accum_steps(16)


def test_parse_overrides_nesting():
    assert parse_overrides(["--a.b.c=1", "--a.d=x", "--e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_resolve(path):
    cfg = resolve(config_file=path)
    assert cfg.preset in PRESETS


def test_one_source_of_defaults():
    """The dataclass defaults are the default run: the tiny preset changes nothing, and
    configs/tiny.yaml only names it."""
    assert PRESETS["tiny"] == {}
    assert resolve() == TrainConfig()
    assert resolve(config_file=Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml") == TrainConfig()


def test_model_preset_fields_follow_overrides():
    """head_dim is left to the preset's sizes: overriding hidden_size recomputes it."""
    assert resolve(overrides=["--model.hidden_size=512"]).model.head_dim == 128
    cfg = resolve(overrides=["--model.preset=olmo2-test", "--model.num_hidden_layers=3"])
    assert (cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.num_key_value_heads) == (64, 3, 2)


def test_help_lists_every_key_with_default_and_doc(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: olmo2-train")
    assert "--optim.lr=0.003" in out and "Peak learning rate." in out
    assert "--model.hidden_size=256" in out and "Width of the residual stream." in out
    assert "--data.sources[].weight=1.0" in out and "--dry-run" in out
    for line in out.splitlines():
        if line.startswith("  --") and "=" in line.split()[0]:
            assert len(line.split(None, 1)) == 2, f"undocumented key: {line}"
    assert main(["--preset=olmo2-7b", "-h"]) == 0
    assert "--model.hidden_size=4096" in capsys.readouterr().out


def test_cli_errors_are_one_line(capsys):
    assert main(["--optim.nope=1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == "olmo2-train: optim.nope: Key 'nope' not in 'OptimConfig'\n"


def test_model_without_position_limit():
    """max_position_embeddings <= 0 (OLMo-core's -1) sets no limit on data.seq_len."""
    cfg = resolve(overrides=["--model.max_position_embeddings=-1", "--data.seq_len=1024",
                             "--global_batch_tokens=2048", "--micro_batch_tokens=2048"])
    assert cfg.model.max_positions is None and cfg.data.seq_len == 1024
