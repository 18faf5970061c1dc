"""The chat format (olmo2.chat): transformers parity of the exported template, labels, bad records."""
import json

import pytest
import torch

from olmo2 import Olmo2Config, Olmo2ForCausalLM
from olmo2.chat import CHAT_TEMPLATE, IGNORE_INDEX, encode_chat, read_chat_jsonl, read_preference_jsonl, render
from olmo2.checkpoint_hf import save_pretrained
from olmo2.tokenizers import load_tokenizer, save_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Reverse abc"},
        {"role": "assistant", "content": " cba "},
    ],
    [{"role": "user", "content": "Only a question"}],
]


@pytest.fixture(scope="module")
def dolma2():
    return load_tokenizer("dolma2")


def test_render_matches_template_string():
    text, spans = render(CONVERSATIONS[1])
    assert text == (
        "<|endoftext|><|system|>\nYou are terse.\n<|user|>\nHi\nthere\n<|assistant|>\nHello!<|endoftext|>\n"
        "<|user|>\nReverse abc\n<|assistant|>\n cba <|endoftext|>"
    )
    assert [text[s:e] for s, e in spans] == ["Hello!<|endoftext|>", " cba <|endoftext|>"]
    prompt, _ = render(CONVERSATIONS[2], add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nOnly a question\n<|assistant|>\n")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny dolma2-vocabulary model exported with tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("chat") / "hf"
    cfg = Olmo2Config(vocab_size=100352, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = Olmo2ForCausalLM.from_config(cfg, generator=torch.Generator().manual_seed(0))
    save_pretrained(model, folder, chat_template=CHAT_TEMPLATE)
    save_tokenizer("dolma2", folder)
    return folder, model


def test_apply_chat_template_gives_our_ids(exported, dolma2):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(exported[0]))
    for messages in CONVERSATIONS:
        for gen in (False, True):
            ours, _ = encode_chat(dolma2, messages, add_generation_prompt=gen)
            theirs = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert theirs == render(messages, gen)[0]
            assert tok(theirs, add_special_tokens=False)["input_ids"] == ours


def test_labels_only_assistant_turns_each_ending_with_eos(dolma2):
    ids, labels = encode_chat(dolma2, CONVERSATIONS[1])
    eos = dolma2.token_to_id("<|endoftext|>")
    trained = [(i, t) for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert all(ids[i] == t for i, t in trained)
    text = dolma2.decode([t for _, t in trained], skip_special_tokens=False)
    assert text == "Hello!<|endoftext|> cba <|endoftext|>"
    assert labels[0] == IGNORE_INDEX and ids[0] == eos  # the bos is never a target
    assert sum(1 for i, t in trained if t == eos) == 2


def test_bad_records_are_counted_with_line_numbers(tmp_path, dolma2):
    path = tmp_path / "chat.jsonl"
    lines = [
        json.dumps({"messages": CONVERSATIONS[0]}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
        json.dumps({"messages": [{"role": "robot", "content": "q"}]}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": CONVERSATIONS[1]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    records, report = read_chat_jsonl(path, dolma2, max_length=64)
    assert len(records) == 2 and report.total == 7
    assert [n for n, _ in report.bad] == [2, 3, 4, 5, 7]
    summary = report.summary()
    assert "\n" not in summary and "2 of 7 records kept" in summary and "line 7:" in summary


def test_preference_records(tmp_path, dolma2):
    path = tmp_path / "pref.jsonl"
    prompt = [{"role": "user", "content": "2+2?"}]
    good = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": prompt + [{"role": "assistant", "content": "5"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": prompt, "chosen": []}) + "\n")
    records, report = read_preference_jsonl(path, dolma2, max_length=64)
    assert len(records) == 1 and [n for n, _ in report.bad] == [2]
    ids_c, lab_c = records[0]["chosen"]
    assert ids_c == encode_chat(dolma2, prompt + good["chosen"])[0]
    assert dolma2.decode([t for t in lab_c if t != IGNORE_INDEX], skip_special_tokens=False) == "4<|endoftext|>"


def test_generate_cli_chat_uses_the_template(exported, dolma2, capsys):
    from olmo2.cli.generate import main
    from olmo2.generation import generate

    folder, model = exported
    assert main(["--model", str(folder), "--prompt", "Hi", "--chat", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    ids, _ = encode_chat(dolma2, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    out = generate(model.eval(), torch.tensor([ids]), 4)[0, len(ids):].tolist()
    eos = dolma2.token_to_id("<|endoftext|>")
    out = out[: out.index(eos)] if eos in out else out
    assert capsys.readouterr().out == dolma2.decode(out, skip_special_tokens=True) + "\n"
