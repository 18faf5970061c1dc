"""olmo2.rl.demo: the RL demo's prompts (the SFT demo's split, held-out never trained on), its verifiers, its tables."""
import json

import pytest

from olmo2.demo_tasks import make_splits
from olmo2.rl.demo import per_task, prompt_record, register_demo_verifier, rl_splits
from olmo2.rl.verifiers import reward


def test_split_is_the_sft_demos_kept_to_the_tasks():
    train, test = rl_splits(400, 60, 0, ("add", "count"))
    full_train, full_test = make_splits(400, 60, 0)
    assert train == [x for x in full_train if x[0].startswith(("What is", "Count the"))]
    assert test == [x for x in full_test if x[0].startswith(("What is", "Count the"))]
    assert not {p for p, _ in test} & {p for p, _ in train}
    with pytest.raises(ValueError, match="--tasks must be among"):
        rl_splits(10, 4, 0, ("reverse",))


def test_records_verify_the_right_answer_only(monkeypatch):
    import olmo2.rl.verifiers as V

    monkeypatch.setattr(V, "VERIFIERS", dict(V.VERIFIERS))  # the demo's registration lands in a copy
    register_demo_verifier()
    register_demo_verifier()  # idempotent
    cases = [("What is 12+19?", "31", "31", "30"), ("Count the a's in abcab", "2", " 2", "1"),
             ("First letter of quz", "q", "q ", "u")]
    for prompt, answer, right, wrong in cases:
        rec = json.loads(json.dumps(prompt_record(prompt, answer)))  # as read back from prompts.jsonl
        assert reward(right, rec) == 10.0 and reward(wrong, rec) == 0.0


def test_per_task_tables():
    test = [("What is 1+1?", "2"), ("Count the a's in a", "1"), ("What is 2+2?", "4")]
    result = {"accuracy": 2 / 3, "n": 3, "correct": [True, True, False], "sampled_accuracy": 0.5,
              "sampled_correct": [0.5, 1.0, 0.0]}
    out = per_task(test, result)
    assert out["greedy_per_task"] == {"add": 0.5, "count": 1.0}
    assert out["sampled_per_task"] == {"add": 0.25, "count": 1.0}
