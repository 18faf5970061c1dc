"""Generation: greedy tokens identical to ``transformers``' ``generate``, the KV
cache against full forwards, left padding, sampling, eos, and the
``olmo2-generate`` command on a tiny checkpoint with a tokenizer built here."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from olmo2 import Olmo2Config, Olmo2ForCausalLM, generate, save_pretrained  # noqa: E402
from olmo2.cli.generate import main  # noqa: E402
from olmo2.generation import sample_next  # noqa: E402
from test_hf_parity import SHAPES, make_pair  # noqa: E402


def hf_greedy(hf, ids, new_tokens, **kwargs):
    out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=0, **kwargs)
    return out


@pytest.mark.parametrize("shape", ["mha", "gqa-1kv"])
def test_greedy_matches_transformers(shape):
    hf, ours = make_pair(**SHAPES[shape])
    ids = torch.randint(0, 301, (2, 6))
    expected = hf_greedy(hf, ids, 20, eos_token_id=None, pad_token_id=0)
    got = generate(ours, ids, 20, eos_token_id=[])
    assert got.shape == (2, 26)
    assert torch.equal(got, expected)


def test_greedy_left_padded_matches_transformers_and_single_rows():
    hf, ours = make_pair(**SHAPES["gqa-1kv"])
    short, long = torch.randint(0, 301, (1, 4)), torch.randint(0, 301, (1, 7))
    ids = torch.cat([torch.cat([torch.full((1, 3), 5), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    got = generate(ours, ids, 12, attention_mask=mask, eos_token_id=[])
    expected = hf_greedy(hf, ids, 12, attention_mask=mask, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, expected)
    assert torch.equal(got[0, 3:], generate(ours, short, 12, eos_token_id=[])[0])
    assert torch.equal(got[1], generate(ours, long, 12, eos_token_id=[])[0])


def test_cached_logits_match_full_forward():
    """Each decoding step's logits equal a fresh full forward over the sequence so far."""
    _, ours = make_pair(**SHAPES["gqa-q-width"])
    ids = torch.randint(0, 301, (2, 5))
    seq = generate(ours, ids, 8, eos_token_id=[])
    with torch.no_grad():
        full = ours(seq).logits
    assert torch.equal(full[:, 4:-1].argmax(-1), seq[:, 5:])


def test_eos_stops_and_pads():
    _, ours = make_pair()
    ids = torch.randint(0, 301, (2, 5))
    free = generate(ours, ids, 10, eos_token_id=[])
    eos = int(free[0, 7])  # row 0's third new token
    out = generate(ours, ids, 10, eos_token_id=eos, pad_token_id=300)
    row0 = out[0].tolist()
    first = row0.index(eos, 5)
    assert first <= 7 and all(t == 300 for t in row0[first + 1 :])
    if eos not in free[1, 5:].tolist():
        assert torch.equal(out[1], free[1, : out.shape[1]])
    everyone = generate(ours, ids[:1], 10, eos_token_id=int(free[0, 5]))
    assert everyone.shape == (1, 6)  # stops as soon as every row is done


def test_sampling_reproducible_and_top_p():
    _, ours = make_pair()
    ids = torch.randint(0, 301, (3, 4))
    a = generate(ours, ids, 8, temperature=1.0, generator=torch.Generator().manual_seed(1), eos_token_id=[])
    b = generate(ours, ids, 8, temperature=1.0, generator=torch.Generator().manual_seed(1), eos_token_id=[])
    c = generate(ours, ids, 8, temperature=1.0, generator=torch.Generator().manual_seed(2), eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(ours, ids, 8, eos_token_id=[])
    tiny_nucleus = generate(ours, ids, 8, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(1), eos_token_id=[])
    assert torch.equal(tiny_nucleus, greedy)


def test_sample_next_top_p_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, 0.7, g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7: the nucleus is the first two
    draws = torch.stack([sample_next(logits, 1.0, 0.9, g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}


def test_bad_arguments():
    _, ours = make_pair()
    ids = torch.randint(0, 301, (1, 4))
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative int"):
        generate(ours, ids, -1)
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        generate(ours, ids, 2, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(ours, ids, 2, top_p=0.0)
    with pytest.raises(TypeError, match="input_ids must be an int64/int32 tensor"):
        generate(ours, ids.float(), 2)
    with pytest.raises(ValueError, match="attention_mask must be a tensor of the shape of input_ids"):
        generate(ours, ids, 2, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = 301"):
        generate(ours, torch.tensor([[1, 301]]), 2)
    assert torch.equal(generate(ours, ids, 0), ids)


# --------------------------------------------------------------------------- CLI
CORPUS = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song", "cats and dogs play"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint folder with a WordLevel tokenizer trained on CORPUS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    folder = tmp_path_factory.mktemp("cli")
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<eos>"]))
    vocab = tokenizer.get_vocab_size()
    config = Olmo2Config(vocab_size=vocab + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, head_dim=16, max_position_embeddings=64,
                         eos_token_id=tokenizer.token_to_id("<eos>"), pad_token_id=None)
    model = Olmo2ForCausalLM.from_config(config, generator=torch.Generator().manual_seed(0))
    save_pretrained(model, folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder, tokenizer, model


def expected_text(checkpoint_, prompt, new_tokens):
    folder, tokenizer, model = checkpoint_
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    out = generate(model, ids, new_tokens)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


def test_cli_greedy(checkpoint, capsys):
    folder = checkpoint[0]
    assert main(["--model", str(folder), "--prompt", "the cat sat", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    text = expected_text(checkpoint, "the cat sat", 6)
    assert printed == text + "\n"
    assert text.strip() and all(w in checkpoint[1].get_vocab() for w in text.split())


def test_cli_sampling_options(checkpoint, capsys):
    folder = str(checkpoint[0])
    args = ["--model", folder, "--prompt", "a dog", "--max-new-tokens", "5", "--temperature", "0.8",
            "--top-p", "0.9", "--seed", "3", "--dtype", "float32", "--device", "cpu", "--backend", "torch",
            "--attn-backend", "eager"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_cli_errors(checkpoint, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "absent"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("olmo2-generate: --model") and "is not a folder" in err and err.count("\n") == 1
    assert main(["--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "holds no model" in capsys.readouterr().err
    shutil.copy(checkpoint[0] / "config.json", tmp_path / "config.json")
    assert main(["--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    (tmp_path / "tokenizer.json").write_bytes((checkpoint[0] / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text('{"model_type": "olmo2",')  # cut short
    assert main(["--model", str(tmp_path), "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "config.json is not valid JSON" in err and str(tmp_path / "config.json") in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["--model", str(checkpoint[0]), "--prompt", "x", "--top-p", "1.5"])
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err


def test_console_script(checkpoint):
    """The installed entry point, as a user runs it (python -m when the script is not on PATH)."""
    exe = shutil.which("olmo2-generate", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "olmo2.cli.generate"]
    result = subprocess.run(
        cmd + ["--model", str(checkpoint[0]), "--prompt", "the bird", "--max-new-tokens", "4", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(checkpoint, "the bird", 4) + "\n"
