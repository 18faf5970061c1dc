"""Parity with ``transformers.Olmo2ForCausalLM`` (random weights, no downloads):
logits, loss and gradients with the same weights; checkpoints written by one
and read by the other; config.json conversion; checkpoint errors.

fp32 on CPU. The two implementations do the same arithmetic in a different
order (fused loss, fused QK-norm + RoPE), so logits agree to a relative error
(max |diff| / max |logit|) of 1e-5, the loss to 1e-5, and parameter gradients,
each a sum over every token, to 1e-4.
"""
import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from olmo2 import Olmo2Config, Olmo2ForCausalLM, load_pretrained, num_parameters, save_pretrained  # noqa: E402
from olmo2.checkpoint_hf import parse_size  # noqa: E402

LOGITS_RTOL = 1e-5
GRAD_RTOL = 1e-4

# Sizes that are not powers of two; MHA, GQA down to one kv head, and a q width
# (heads x head_dim) different from hidden_size.
SHAPES = {
    "mha": dict(num_attention_heads=3, num_key_value_heads=3, head_dim=24),
    "gqa-1kv": dict(num_attention_heads=3, num_key_value_heads=1, head_dim=24),
    "gqa-q-width": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=10),
}


def rel_err(actual, expected) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def hf_config(**overrides):
    base = dict(vocab_size=301, hidden_size=72, intermediate_size=200, num_hidden_layers=2, num_attention_heads=3,
                num_key_value_heads=3, head_dim=24, max_position_embeddings=128, rms_norm_eps=1e-6,
                rope_theta=500000.0, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    base.update(overrides)
    config = transformers.Olmo2Config(**base)
    config._attn_implementation = "eager"
    return config


def make_pair(seed=0, **overrides):
    """A random transformers model and ours with the same weights (strict load: same names)."""
    torch.manual_seed(seed)
    hf = transformers.Olmo2ForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # transformers initializes them to 1; move them so each norm matters
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ours = Olmo2ForCausalLM.from_config(Olmo2Config.from_hf(hf.config.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def logits_of(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits(shape):
    hf, ours = make_pair(**SHAPES[shape])
    ids = torch.randint(0, 301, (2, 13))
    expected = logits_of(hf, ids)
    assert rel_err(logits_of(ours, ids), expected) < LOGITS_RTOL
    ours.set_attn_backend("eager")
    assert rel_err(logits_of(ours, ids), expected) < LOGITS_RTOL


@pytest.mark.parametrize("shape", ["mha", "gqa-1kv"])
def test_loss_and_gradients(shape):
    hf, ours = make_pair(**SHAPES[shape])
    ids = torch.randint(0, 301, (3, 10))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[2, 6] = -100
    hf_loss = hf(ids, labels=labels).loss
    hf_loss.backward()
    out = ours(ids, labels=labels)
    out.ce_loss.backward()
    assert rel_err(out.ce_loss, hf_loss) < LOGITS_RTOL
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, hf_grads[name].grad) < GRAD_RTOL, name


def test_logits_per_row_positions_with_left_padding():
    hf, ours = make_pair(**SHAPES["gqa-1kv"])
    ids = torch.randint(0, 301, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < LOGITS_RTOL


@pytest.mark.parametrize("name", ["olmo2-1b", "olmo2-7b", "olmo2-13b", "olmo2-32b", "olmo2-tiny"])
def test_parameter_counts(name):
    # Published sizes (model cards of allenai/OLMo-2-0425-1B, -1124-7B, -1124-13B, -0325-32B).
    published = {"olmo2-1b": 1.48e9, "olmo2-7b": 7.30e9, "olmo2-13b": 13.7e9, "olmo2-32b": 32.2e9}
    config = Olmo2Config.preset(name)
    with torch.device("meta"):
        hf = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**config.to_hf()))
    hf_count = sum(p.numel() for p in hf.parameters())
    ours = Olmo2ForCausalLM.from_config(config, device="meta")
    assert ours.num_parameters() == num_parameters(config) == hf_count
    assert dict((n, tuple(p.shape)) for n, p in ours.named_parameters()) == {
        n: tuple(p.shape) for n, p in hf.named_parameters()
    }
    if name in published:
        assert abs(hf_count / published[name] - 1) < 0.005, hf_count


# --------------------------------------------------------------------------- config.json
class TestConfigJson:
    def test_round_trip_through_transformers(self):
        ours = Olmo2Config.preset("olmo2-32b")
        hf = transformers.Olmo2Config(**ours.to_hf())
        assert hf.rope_parameters["rope_theta"] == 500000.0 and hf.rms_norm_eps == 1e-6
        assert hf.num_key_value_heads == 8 and hf.head_dim == 128
        assert Olmo2Config.from_hf(hf.to_dict()) == ours

    def test_old_style_rope_theta_and_eps_default(self):
        d = Olmo2Config.preset("olmo2-test").to_hf()
        del d["rope_parameters"], d["rms_norm_eps"]
        d["rope_theta"] = 12345.0
        c = Olmo2Config.from_hf(d)
        assert c.rope_theta == 12345.0
        assert c.rms_norm_eps == 1e-5  # the transformers default when the file is silent, not ours

    def test_file_and_folder(self, tmp_path):
        d = Olmo2Config.preset("olmo2-test").to_hf()
        (tmp_path / "config.json").write_text(json.dumps(d))
        assert Olmo2Config.from_hf(tmp_path) == Olmo2Config.from_hf(tmp_path / "config.json") == Olmo2Config.preset("olmo2-test")
        with pytest.raises(FileNotFoundError, match="no config.json"):
            Olmo2Config.from_hf(tmp_path / "nothing")

    @pytest.mark.parametrize(
        "change, match",
        [
            (dict(model_type="llama"), "model_type 'llama', expected 'olmo2'"),
            (dict(attention_bias=True), "attention_bias=true"),
            (dict(hidden_act="gelu"), "hidden_act='gelu'"),
            (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}), "rope_type='yarn'"),
            (dict(tie_word_embeddings=True), "untied"),
        ],
    )
    def test_refused(self, change, match):
        d = Olmo2Config.preset("olmo2-test").to_hf()
        d.update(change)
        with pytest.raises(ValueError, match=match):
            Olmo2Config.from_hf(d)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("shard_size", [None, "60KB"])
def test_load_transformers_checkpoint(tmp_path, shard_size):
    hf, _ = make_pair(**SHAPES["gqa-1kv"])
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    hf.save_pretrained(tmp_path, **kwargs)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (shard_size is not None)
    ours = load_pretrained(tmp_path)
    ids = torch.randint(0, 301, (2, 11))
    assert rel_err(logits_of(ours, ids), logits_of(hf, ids)) < LOGITS_RTOL


@pytest.mark.parametrize("shard_size", ["5GB", 40_000])
def test_transformers_loads_our_checkpoint(tmp_path, shard_size):
    _, ours = make_pair(**SHAPES["gqa-q-width"])
    save_pretrained(ours, tmp_path / "ckpt", max_shard_size=shard_size)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    if shard_size == 40_000:
        index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
        by_file = {}
        for name, file in index["weight_map"].items():
            by_file.setdefault(file, []).append(name)
        assert len(by_file) > 2 and sorted(by_file) == [f for f in files if f.startswith("model-")]
        params = dict(ours.named_parameters())
        for file, names in by_file.items():
            nbytes = sum(params[n].numel() * params[n].element_size() for n in names)
            assert nbytes <= 40_000 or len(names) == 1, file  # a tensor over the limit sits alone
    else:
        assert files == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    hf = transformers.Olmo2ForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
    ids = torch.randint(0, 301, (2, 11))
    assert rel_err(logits_of(hf, ids), logits_of(ours, ids)) < LOGITS_RTOL
    back = load_pretrained(tmp_path / "ckpt")
    assert back.config == ours.config
    for (name, a), b in zip(ours.named_parameters(), back.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("shard_size", ["5GB", 40_000])
def test_generation_config_written_as_transformers_reads_it(tmp_path, shard_size):
    """OLMo-core's load_hf_model requires generation_config.json (transformers writes one)."""
    _, ours = make_pair(**SHAPES["gqa-q-width"], eos_token_id=7, pad_token_id=9)
    save_pretrained(ours, tmp_path, max_shard_size=shard_size)
    written = json.loads((tmp_path / "generation_config.json").read_text())
    assert written == {"_from_model_config": True, "eos_token_id": 7, "pad_token_id": 9}  # bos: None, left out
    gen = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (gen.eos_token_id, gen.pad_token_id, gen.bos_token_id) == (7, 9, None)
    hf = transformers.Olmo2ForCausalLM.from_pretrained(tmp_path)
    assert hf.generation_config.eos_token_id == 7


def test_max_position_embeddings_minus_one(tmp_path):
    """OLMo-core's save_hf_model writes max_position_embeddings: -1 (no limit); transformers loads it,
    and so do we: RoPE is computed per position, so any length runs."""
    hf, _ = make_pair(**SHAPES["gqa-1kv"], max_position_embeddings=-1)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == -1
    ours = load_pretrained(tmp_path)
    assert ours.config.max_position_embeddings == -1 and ours.config.max_positions is None
    assert ours.config.to_hf()["max_position_embeddings"] == -1  # round-trips as written
    ids = torch.randint(0, 301, (1, 300))  # longer than the 128 the other tests declare
    assert rel_err(logits_of(ours, ids), logits_of(hf, ids)) < LOGITS_RTOL
    assert Olmo2Config.preset("olmo2-test", max_position_embeddings=0).max_positions is None
    with pytest.raises(ValueError, match="max_position_embeddings must be an int"):
        Olmo2Config.preset("olmo2-test", max_position_embeddings=1.5)


def test_load_dtype_and_device(tmp_path):
    _, ours = make_pair()
    save_pretrained(ours, tmp_path)
    bf16 = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu", attn_backend="eager")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.config.attn_backend == "eager"
    assert all(a.to(torch.bfloat16).equal(b) for a, b in zip(ours.parameters(), bf16.parameters()))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "olmo2" and config["dtype"] == "float32"


def test_save_over_existing_folder_keeps_other_files(tmp_path):
    _, ours = make_pair()
    target = tmp_path / "ckpt"
    save_pretrained(ours, target, max_shard_size=30_000)
    (target / "tokenizer.json").write_text("{}")
    (target / "extra").mkdir()
    (target / "extra" / "notes.txt").write_text("kept")
    with torch.no_grad():
        ours.lm_head.weight.mul_(2)
    save_pretrained(ours, target)  # now one file: the old shards and index must go
    assert sorted(os.listdir(target)) == ["config.json", "extra", "generation_config.json", "model.safetensors",
                                          "tokenizer.json"]
    assert (target / "extra" / "notes.txt").read_text() == "kept"
    assert torch.equal(load_pretrained(target).lm_head.weight, ours.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_leaves_old_checkpoint(tmp_path, monkeypatch):
    _, ours = make_pair()
    target = tmp_path / "ckpt"
    save_pretrained(ours, target)
    before = (target / "model.safetensors").read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(ours, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7
    for bad in ("5 parsecs", 0, -3, "0KB", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


class TestCheckpointErrors:
    @pytest.fixture
    def folder(self, tmp_path):
        _, ours = make_pair()
        save_pretrained(ours, tmp_path, max_shard_size=60_000)
        return tmp_path

    def _edit_shard(self, folder: Path, edit):
        from safetensors.torch import load_file, save_file

        index = json.loads((folder / "model.safetensors.index.json").read_text())
        file = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
        tensors = load_file(folder / file)
        edit(tensors, index, file)
        save_file(tensors, folder / file, metadata={"format": "pt"})
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    def test_missing_tensor(self, folder):
        def edit(tensors, index, file):
            del tensors["model.layers.1.mlp.up_proj.weight"]
            del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]

        self._edit_shard(folder, edit)
        with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
            load_pretrained(folder)

    def test_unexpected_tensor(self, folder):
        def edit(tensors, index, file):
            tensors["model.layers.1.mlp.bias"] = torch.zeros(3)
            index["weight_map"]["model.layers.1.mlp.bias"] = file

        self._edit_shard(folder, edit)
        with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.1\.mlp\.bias"):
            load_pretrained(folder)

    def test_wrong_shape_names_config_field(self, folder):
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] = 208
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=(
            r"model\.layers\.0\.mlp\.gate_proj\.weight: checkpoint shape \(200, 72\), config expects \(208, 72\) "
            r"\(dim 0 is intermediate_size = 208 in config.json, 200 in the weights\)"
        )):
            load_pretrained(folder)

    def test_layer_count(self, folder):
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = 1
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"unexpected tensors: .*layers 1\.\.1; config.json says num_hidden_layers = 1"):
            load_pretrained(folder)

    def test_index_names_missing_shard(self, folder):
        os.remove(next(folder.glob("model-00002-of-*.safetensors")))
        with pytest.raises(FileNotFoundError, match=r"names shard model-00002-of-\d+\.safetensors, which is missing"):
            load_pretrained(folder)

    def test_no_weights(self, tmp_path):
        (tmp_path / "config.json").write_text(json.dumps(Olmo2Config.preset("olmo2-test").to_hf()))
        (tmp_path / "pytorch_model.bin").write_bytes(b"")
        with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor .*pytorch_model\.bin"):
            load_pretrained(tmp_path)
        with pytest.raises(FileNotFoundError, match="is not a folder"):
            load_pretrained(tmp_path / "absent")
