"""olmo2-soup: the average of checkpoints is the mean of their tensors."""
import pytest
import torch

from olmo2 import Olmo2Config, Olmo2ForCausalLM, load_pretrained, save_pretrained
from olmo2.cli.soup import main
from olmo2.soup import soup
from olmo2.train import checkpoint as ckpt
from test_train_utils import make_config


def trainer_checkpoint(tmp_path, seed):
    """A trainer checkpoint of a freshly initialized olmo2-test model (with optimizer state)."""
    cfg = make_config(tmp_path / f"cfg{seed}", seed=seed)
    torch.manual_seed(seed)
    model = Olmo2ForCausalLM.from_config(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    root = tmp_path / f"run{seed}" / "checkpoints"
    path = ckpt.save_checkpoint(root, 1, model, opt, {"tokens_seen": 0}, config_yaml=cfg.to_yaml())
    return path, model


def test_soup_is_the_mean_of_the_tensors(tmp_path):
    (a, model_a), (b, model_b) = trainer_checkpoint(tmp_path, 1), trainer_checkpoint(tmp_path, 2)
    out = soup([a, b], tmp_path / "soup")
    souped = load_pretrained(str(out))
    for name, value in souped.state_dict().items():
        expected = (model_a.state_dict()[name] + model_b.state_dict()[name]) / 2
        assert value.dtype == torch.float32
        assert torch.equal(value, expected), name
    assert not torch.equal(model_a.lm_head.weight, model_b.lm_head.weight)


def test_soup_of_hf_checkpoints_cli_and_dtype(tmp_path, capsys):
    models = []
    for seed in (3, 4, 5):
        torch.manual_seed(seed)
        model = Olmo2ForCausalLM.from_config(Olmo2Config.preset("olmo2-test"))
        save_pretrained(model, str(tmp_path / f"hf{seed}"))
        models.append(model)
    (tmp_path / "hf3" / "tokenizer.json").write_text("{}")
    args = [str(tmp_path / f"hf{s}") for s in (3, 4, 5)] + ["--out", str(tmp_path / "soup"), "--dtype", "bfloat16"]
    assert main(args) == 0
    souped = load_pretrained(str(tmp_path / "soup"))
    for name, value in souped.state_dict().items():
        mean = sum(m.state_dict()[name].float() for m in models) / 3
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value, mean.to(torch.bfloat16), rtol=0, atol=0)
    assert (tmp_path / "soup" / "tokenizer.json").read_text() == "{}"
    assert "averaged 3 checkpoints" in capsys.readouterr().out


def test_soup_refuses_mismatched_architectures(tmp_path, capsys):
    a, _ = trainer_checkpoint(tmp_path, 1)
    other = Olmo2ForCausalLM.from_config(Olmo2Config.preset("olmo2-test", num_hidden_layers=1))
    save_pretrained(other, str(tmp_path / "small"))
    with pytest.raises(ValueError, match="small has architecture"):
        soup([a, tmp_path / "small"], tmp_path / "out")
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_soup_refuses_out_over_an_input_and_warns_on_one_input(tmp_path, capsys):
    model = Olmo2ForCausalLM.from_config(Olmo2Config.preset("olmo2-test"))
    save_pretrained(model, str(tmp_path / "a"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    for out in (tmp_path / "a", tmp_path / "a" / "inside", tmp_path):
        assert main([str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"olmo2-soup: --out {out} ") and "would overwrite that input" in err
        assert err.count("olmo2-soup:") == 1 and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert main([str(tmp_path / "a"), "--out", str(tmp_path / "copy")]) == 0
    captured = capsys.readouterr()
    assert "olmo2-soup: warning: only one checkpoint given" in captured.err
    assert main([str(tmp_path / "missing"), str(tmp_path / "a"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"olmo2-soup: checkpoint {tmp_path / 'missing'} does not exist ({tmp_path / 'missing'})\n"
