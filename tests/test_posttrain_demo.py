"""olmo2.demo_tasks: the generated tasks, their held-out split, wrong answers, exact match and the greedy evaluation."""
import json
import random

import torch

from olmo2 import Olmo2Config, Olmo2ForCausalLM
from olmo2.chat import encode_chat
from olmo2.demo_tasks import (TASKS, chat_record, evaluate, exact_match, generate_answers, make_splits, make_task,
                              preference_record, score, task_of, wrong_answer)
from olmo2.tokenizers import load_tokenizer


def test_tasks_have_the_right_answers():
    rng = random.Random(0)
    for _ in range(50):
        prompt, answer = make_task("add", rng)
        a, b = prompt[len("What is "):-1].split("+")
        assert int(answer) == int(a) + int(b)
        prompt, answer = make_task("reverse", rng)
        assert answer == prompt[len("Reverse: "):][::-1]
        prompt, answer = make_task("count", rng)
        letter, word = prompt[len("Count the "):].split("'s in ")
        assert int(answer) == word.count(letter)
        prompt, answer = make_task("first", rng)
        assert answer == prompt[len("First letter of "):][0]


def test_held_out_prompts_never_in_training_and_wrong_answers_are_wrong():
    train, test = make_splits(300, 60, seed=3)
    assert len(train) == 300 and len(test) == 60
    held_out = [p for p, _ in test]
    assert len(set(held_out)) == len(held_out) and not set(held_out) & {p for p, _ in train}
    assert [task_of(p) for p, _ in test[:4]] == list(TASKS)
    assert make_splits(300, 60, seed=3) == (train, test)
    rng = random.Random(0)
    for prompt, answer in train:
        assert wrong_answer(prompt, answer, rng) != answer
    assert wrong_answer("Reverse: aaa", "aaa", rng) != "aaa"
    pair = preference_record("What is 10+11?", "21", random.Random(1))
    assert pair["chosen"] == [{"role": "assistant", "content": "21"}] and pair["rejected"][0]["content"] != "21"
    assert json.loads(json.dumps(chat_record("Reverse: ab", "ba")))["messages"][1]["content"] == "ba"


def test_exact_match_and_score():
    assert exact_match(" 71\n", "71") and not exact_match("71.", "71") and not exact_match("", "0")
    examples = [("What is 10+11?", "21"), ("Reverse: abc", "cba"), ("Count the a's in aab", "2"),
                ("What is 12+12?", "24"), ("First letter of xyz", "x"), ("First letter of abc", "a")]
    result = score(examples, ["21", "abc", "2", "25", "x", "x"])
    assert result["accuracy"] == 0.5
    assert result["per_task"] == {"add": 0.5, "count": 1.0, "first": 0.5, "reverse": 0.0}


def test_byte_tokenizer_spells_the_chat_template_with_eos():
    tokenizer = load_tokenizer("byte")
    ids, labels = encode_chat(tokenizer, [{"role": "user", "content": "Reverse: ab"},
                                          {"role": "assistant", "content": "ba"}])
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert ids[0] == eos and ids[-1] == eos and ids.count(eos) == 2
    assert [t for t in labels if t != -100] == [ord("b"), ord("a"), eos]


def test_greedy_evaluation_of_a_tiny_model(tmp_path):
    """Batched left-padded greedy answers equal one-by-one answers; evaluate reads an HF folder."""
    from olmo2.checkpoint_hf import save_pretrained
    from olmo2.tokenizers import save_tokenizer

    cfg = Olmo2Config(vocab_size=258, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_backend="sdpa", pad_token_id=257, eos_token_id=256)
    model = Olmo2ForCausalLM.from_config(cfg, generator=torch.Generator().manual_seed(0)).eval()
    tokenizer = load_tokenizer("byte")
    prompts = ["What is 10+11?", "Reverse: abcde", "Count the a's in aab", "First letter of xyz"]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=5)
    alone = [generate_answers(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone
    save_pretrained(model, tmp_path)
    save_tokenizer("byte", tmp_path)
    result = evaluate(tmp_path, list(zip(prompts, ["21", "edcba", "2", "x"])))
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["samples"]) == 4
    assert set(result["per_task"]) == set(TASKS)


def test_on_policy_pairs_reject_the_models_own_wrong_answers(tmp_path, monkeypatch):
    """Rejected = the model's greedy answer when wrong, else a wrong sample; chosen = the reference;
    a prompt answered right every time gives no pair; duplicates give one pair."""
    import olmo2.demo_tasks as demo
    from olmo2.checkpoint_hf import save_pretrained
    from olmo2.tokenizers import save_tokenizer

    cfg = Olmo2Config(vocab_size=258, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_backend="sdpa", pad_token_id=257, eos_token_id=256)
    save_pretrained(Olmo2ForCausalLM.from_config(cfg, generator=torch.Generator().manual_seed(0)), tmp_path)
    save_tokenizer("byte", tmp_path)
    train = [("What is 1+1?", "2"), ("What is 2+2?", "4"), ("What is 3+3?", "6"), ("What is 1+1?", "2")]
    # the model's answers, scripted: greedy right/wrong/right, samples wrong only for the third prompt
    scripted = {0.0: ["2", "5", "6"], 1.0: ["2", "4", "7"]}
    monkeypatch.setattr(demo, "generate_answers", lambda m, t, prompts, temperature=0.0, seed=0: scripted[temperature])
    records, counts = demo.on_policy_pairs(tmp_path, train, samples=2)
    assert counts == {"prompts": 3, "pairs": 2, "rejected_greedy": 1, "rejected_sampled": 1}
    assert [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in records] \
        == [("What is 2+2?", "4", "5"), ("What is 3+3?", "6", "7")]
    monkeypatch.undo()
    records, counts = demo.on_policy_pairs(tmp_path, train[:2], samples=1)  # the real sampler on a random model
    assert counts["prompts"] == 2 and all(r["rejected"][0]["content"] != r["chosen"][0]["content"] for r in records)
