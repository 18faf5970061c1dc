"""The post-training demo: generated tasks with checkable answers, SFT, DPO, exact match (issue 14, item 4).

What this module owns:

* :func:`make_task` / :func:`make_splits`: prompts with one right answer, drawn
  from a seed: ``What is 12+19?`` -> ``31`` (operands 0-19), ``Reverse: faz`` ->
  ``zaf`` (3 letters), ``Count the a's in ababa`` -> ``3``, ``First letter of
  quz`` -> ``q``. The held-out prompts are distinct and never occur in training
  (checked by prompt text); training prompts may repeat (400 distinct sums).
* :func:`wrong_answer`: a plausible incorrect answer for a DPO pair (the sum or
  count off by one, the string not reversed or with two letters swapped, another
  letter of the word), so each pair differs only in the answer.
* :func:`exact_match` and :func:`evaluate`: greedy generation in the chat
  template (:func:`olmo2.chat.encode_chat`, stop at EOS) and the share of
  held-out prompts whose stripped answer equals the reference.
* :func:`main` (``python -m olmo2.demo_tasks``): data, base accuracy, SFT
  (:func:`olmo2.sft.train_sft`), accuracy, DPO on the pairs
  (:func:`olmo2.dpo.train_dpo`), accuracy; a table and ``results.json``. Both
  trainers evaluate in the loop (``eval.*``): SFT the loss on the held-out
  conversations, DPO the loss, pair accuracy and margin on held-out pairs (the
  held-out prompts with a made-up wrong answer, :func:`wrong_answer`); the curves
  go into ``results.json`` (``heldout``), from step 0 (the starting model) on.

Why the tiny pretrained model works with the OLMo 2 Instruct template: its byte
tokenizer spells ``<|user|>`` and ``<|assistant|>`` as plain bytes and has
``<|endoftext|>`` as a special token (id 256), which is the template's bos and
the model's EOS; so the template, the labels and the stop token are the same as
with dolma2, only longer in tokens.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import string
import sys
import time
from pathlib import Path

# Each task: its prompt prefix, and how to draw one (prompt, answer). Small on purpose:
# a 3.4M-parameter byte model must learn them from a few thousand examples in a few CPU minutes.
PREFIXES = {"add": "What is ", "reverse": "Reverse: ", "count": "Count the ", "first": "First letter of "}
TASKS = tuple(PREFIXES)


def task_of(prompt: str) -> str:
    """The task of ``prompt`` (its prefix), e.g. ``"add"``."""
    for kind, prefix in PREFIXES.items():
        if prompt.startswith(prefix):
            return kind
    raise ValueError(f"task_of: prompt must start with one of {list(PREFIXES.values())}, got {prompt!r}")


def _word(rng: random.Random, letters: str, low: int, high: int) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(low, high)))


def make_task(kind: str, rng: random.Random) -> tuple[str, str]:
    """One ``(prompt, answer)`` of ``kind`` (one of :data:`TASKS`)."""
    if kind == "add":
        a, b = rng.randint(0, 19), rng.randint(0, 19)
        return f"What is {a}+{b}?", str(a + b)
    if kind == "reverse":
        word = _word(rng, string.ascii_lowercase, 3, 3)
        return f"Reverse: {word}", word[::-1]
    if kind == "count":
        letter = rng.choice("ab")
        word = _word(rng, "abc", 3, 5)
        return f"Count the {letter}'s in {word}", str(word.count(letter))
    if kind == "first":
        word = _word(rng, string.ascii_lowercase, 3, 6)
        return f"First letter of {word}", word[0]
    raise ValueError(f"make_task: kind must be one of {TASKS}, got {kind!r}")


def wrong_answer(prompt: str, answer: str, rng: random.Random) -> str:
    """A plausible answer to ``prompt`` that differs from ``answer`` (the rejected side of a DPO pair)."""
    kind = task_of(prompt)
    if kind == "first":
        others = [c for c in prompt[len(PREFIXES["first"]):] if c != answer]
        return rng.choice(others) if others else ("z" if answer != "z" else "y")
    if kind == "reverse":
        word = prompt[len(PREFIXES["reverse"]):]
        letters = list(answer)
        i = rng.randrange(len(letters) - 1)
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
        swapped = "".join(letters)
        candidates = [c for c in (word, swapped) if c != answer]
        if candidates:
            return rng.choice(candidates)
        return answer + answer[-1]  # a palindrome with equal neighbours ("aaa"): one letter too many
    value = int(answer)
    deltas = (-1, 1)
    return str(max(0, value + rng.choice(deltas)) if value > 0 else value + 1)


def make_splits(n_train: int, n_test: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, test)`` lists of ``(prompt, answer)``, tasks in turn. The held-out
    prompts are distinct and none of them occurs in ``train`` (training prompts may
    repeat: the sums have only 400 distinct prompts)."""
    rng = random.Random(seed)
    test: list[tuple[str, str]] = []
    held_out: set[str] = set()
    while len(test) < n_test:
        prompt, answer = make_task(TASKS[len(test) % len(TASKS)], rng)
        if prompt not in held_out:
            held_out.add(prompt)
            test.append((prompt, answer))
    train: list[tuple[str, str]] = []
    while len(train) < n_train:
        prompt, answer = make_task(TASKS[len(train) % len(TASKS)], rng)
        if prompt not in held_out:
            train.append((prompt, answer))
    return train, test


def chat_record(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def preference_record(prompt: str, answer: str, rng: random.Random) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": wrong_answer(prompt, answer, rng)}]}


def write_jsonl(path: str | Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def exact_match(prediction: str, answer: str) -> bool:
    """The prediction, stripped of surrounding whitespace, equals the answer."""
    return prediction.strip() == answer.strip()


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 12, batch_size: int = 64,
                     temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Answers to ``prompts`` as one user turn each, cut at EOS (left-padded batches):
    greedy, or sampled at ``temperature`` (reproducibly from ``seed``)."""
    import torch

    from .chat import encode_chat
    from .generation import generate

    eos = tokenizer.token_to_id("<|endoftext|>")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)[0]
                   for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[eos] * (width - len(x)) + x for x in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded], device=device)
        rows = generate(model, ids, max_new_tokens, temperature=temperature, eos_token_id=eos, attention_mask=mask,
                        pad_token_id=eos, generator=generator)
        for row in rows[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def evaluate(model_folder: str | Path, examples: list[tuple[str, str]]) -> dict:
    """Exact-match accuracy of the HF folder's greedy answers, overall and per task."""
    import torch

    from .checkpoint_hf import load_pretrained
    from .tokenizers import load_tokenizer

    torch.manual_seed(0)
    model = load_pretrained(model_folder, dtype=torch.float32, device="cpu").eval()
    tokenizer = load_tokenizer(str(model_folder))
    predictions = generate_answers(model, tokenizer, [p for p, _ in examples])
    return score(examples, predictions)


def on_policy_pairs(model_folder: str | Path, train: list[tuple[str, str]], samples: int = 4,
                    temperature: float = 1.0, seed: int = 0) -> tuple[list[dict], dict]:
    """Preference records built as Tülu 3 builds its on-policy pairs, with the demo's
    verifier as the judge: for each distinct training prompt, the SFT model's greedy
    answer and ``samples`` sampled ones; rejected = its greedy answer when that is
    wrong (the mistake the evaluation sees), else one of its wrong samples; chosen =
    the reference answer. A prompt the model always answers right gives no pair.
    Returns the records and counts (prompts, pairs, greedy-wrong, sampled-wrong)."""
    import torch

    from .checkpoint_hf import load_pretrained
    from .tokenizers import load_tokenizer

    model = load_pretrained(model_folder, dtype=torch.float32, device="cpu").eval()
    tokenizer = load_tokenizer(str(model_folder))
    answers = dict(train)  # prompt -> reference (a repeated prompt has one answer)
    prompts = list(answers)
    greedy = generate_answers(model, tokenizer, prompts)
    sampled = [generate_answers(model, tokenizer, prompts, temperature=temperature, seed=seed + i)
               for i in range(samples)]
    rng = random.Random(seed)
    records, from_greedy = [], 0
    for j, prompt in enumerate(prompts):
        reference = answers[prompt]
        wrong = [a.strip() for a in [greedy[j], *(s[j] for s in sampled)]
                 if a.strip() and not exact_match(a, reference)]
        if not wrong:
            continue
        if wrong[0] == greedy[j].strip():
            from_greedy += 1
            rejected = wrong[0]
        else:
            rejected = rng.choice(wrong)
        records.append({"prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": reference}],
                        "rejected": [{"role": "assistant", "content": rejected}]})
    return records, {"prompts": len(prompts), "pairs": len(records), "rejected_greedy": from_greedy,
                     "rejected_sampled": len(records) - from_greedy}


def score(examples: list[tuple[str, str]], predictions: list[str]) -> dict:
    """``{"accuracy", "per_task": {kind: accuracy}, "samples": [...]}`` of ``predictions``."""
    hits: dict[str, list[bool]] = {}
    for (prompt, answer), pred in zip(examples, predictions):
        kind = task_of(prompt)
        hits.setdefault(kind, []).append(exact_match(pred, answer))
    every = [h for v in hits.values() for h in v]
    return {"accuracy": sum(every) / max(1, len(every)),
            "per_task": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
            "samples": [{"prompt": p, "answer": a, "prediction": pred}
                        for (p, a), pred in list(zip(examples, predictions))[:6]]}


def _log(text: str) -> None:
    print(f"olmo2-demo: {text}", file=sys.stderr, flush=True)


def read_heldout_curve(folder: Path) -> list[dict]:
    """The in-loop evaluations a trainer logged in ``folder/metrics.jsonl`` (its ``eval/*`` lines)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in x.items() if k == "step" or k.startswith("eval/")} for x in lines if "eval/seconds" in x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m olmo2.demo_tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/olmo2-tiny/hf", help="HF folder of the base model (olmo2-train's export)")
    p.add_argument("--out", default="runs/posttrain-demo",
                   help="folder for data, models and results.json (its sft/ and dpo/ are replaced)")
    p.add_argument("--n-train", type=int, default=3000, help="SFT conversations (also the DPO prompts)")
    p.add_argument("--n-test", type=int, default=300, help="held-out prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-epochs", type=int, default=4)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--sft-rows", type=int, default=4, help="packed rows of 256 tokens per SFT step")
    p.add_argument("--dpo-epochs", type=int, default=1)
    p.add_argument("--dpo-lr", type=float, default=1e-4)
    p.add_argument("--dpo-beta", type=float, default=5.0)
    p.add_argument("--dpo-pairs", choices=("on_policy", "synthetic"), default="on_policy",
                   help="rejected answers: the SFT model's own wrong ones (greedy, else sampled), or made-up ones")
    p.add_argument("--dpo-samples", type=int, default=4, help="sampled answers per prompt for on-policy pairs")
    p.add_argument("--reuse-sft", action="store_true",
                   help="keep an SFT model already in OUT/sft (same data and seed) and start at DPO")
    p.add_argument("--sft-eval-interval", type=int, default=50,
                   help="SFT steps between held-out evaluations (and one after the last step); 0: none")
    p.add_argument("--dpo-eval-interval", type=int, default=20,
                   help="DPO steps between held-out evaluations (and one after the last step); 0: none")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    import torch

    from .dpo import DPOConfig, train_dpo
    from .sft import PostTrainEvalConfig, SFTConfig, train_sft

    if args.threads:
        torch.set_num_threads(args.threads)
    base = Path(args.base)
    if not (base / "config.json").is_file():
        raise SystemExit(f"olmo2-demo: --base {base} holds no HF checkpoint; run `olmo2-train` first "
                         "(its default run writes runs/olmo2-tiny/hf)")
    out = Path(args.out)
    reuse = args.reuse_sft and (out / "sft" / "config.json").is_file()
    for stage in ("dpo",) if reuse else ("sft", "dpo"):  # starts over: a stale checkpoint there would be resumed
        shutil.rmtree(out / stage, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_splits(args.n_train, args.n_test, args.seed)
    write_jsonl(out / "sft.jsonl", (chat_record(p_, a) for p_, a in train))
    write_jsonl(out / "test.jsonl", (chat_record(p_, a) for p_, a in test))
    held_rng = random.Random(args.seed + 2)
    write_jsonl(out / "test_prefs.jsonl", (preference_record(p_, a, held_rng) for p_, a in test))
    _log(f"{len(train)} training prompts, {len(test)} held-out, in {out}")

    results: dict = {"args": vars(args), "stages": {}, "heldout": {}}

    def heldout_curve(interval: int, data: Path) -> PostTrainEvalConfig:
        """A stage's eval.* keys; its curve is read back from OUT/<stage>/metrics.jsonl (:func:`read_heldout_curve`)."""
        if not interval:
            return PostTrainEvalConfig()
        return PostTrainEvalConfig(data=str(data), interval=interval, at_start=True)
    clock = time.perf_counter()

    def record(stage: str, folder: Path, train_seconds: float) -> None:
        t0 = time.perf_counter()
        acc = evaluate(folder, test)
        acc["train_seconds"] = round(train_seconds, 1)
        acc["eval_seconds"] = round(time.perf_counter() - t0, 1)
        results["stages"][stage] = acc
        _log(f"{stage}: exact match {acc['accuracy']:.3f} {acc['per_task']} "
             f"(train {acc['train_seconds']} s, eval {acc['eval_seconds']} s)")

    record("base", base, 0.0)
    t0 = time.perf_counter()
    if reuse:
        _log(f"reusing the SFT model in {out / 'sft'}")
    else:
        train_sft(SFTConfig(model=str(base), data=str(out / "sft.jsonl"), output=str(out / "sft"), max_length=256,
                            micro_batch_size=args.sft_rows, grad_accum=1, lr=args.sft_lr, warmup_ratio=0.05,
                            epochs=args.sft_epochs, seed=args.seed, device="cpu", save_interval=0,
                            eval=heldout_curve(args.sft_eval_interval, out / "test.jsonl")))
    results["heldout"]["sft"] = read_heldout_curve(out / "sft")
    record("sft", out / "sft", time.perf_counter() - t0)
    t0 = time.perf_counter()
    if args.dpo_pairs == "on_policy":
        prefs, counts = on_policy_pairs(out / "sft", train, args.dpo_samples, seed=args.seed + 1)
        results["on_policy_pairs"] = counts
        _log(f"on-policy pairs: {counts} ({time.perf_counter() - t0:.1f} s of sampling)")
    else:
        rng = random.Random(args.seed + 1)
        prefs = [preference_record(p_, a, rng) for p_, a in train]
    write_jsonl(out / "prefs.jsonl", prefs)
    train_dpo(DPOConfig(model=str(out / "sft"), data=str(out / "prefs.jsonl"), output=str(out / "dpo"),
                        max_length=128, micro_batch_size=32, grad_accum=1, lr=args.dpo_lr, beta=args.dpo_beta,
                        warmup_ratio=0.1, epochs=args.dpo_epochs, seed=args.seed, device="cpu", save_interval=0,
                        eval=heldout_curve(args.dpo_eval_interval, out / "test_prefs.jsonl")))
    results["heldout"]["dpo"] = read_heldout_curve(out / "dpo")
    record("dpo", out / "dpo", time.perf_counter() - t0)
    results["total_seconds"] = round(time.perf_counter() - clock, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"{'model':6} {'exact match':>11} " + " ".join(f"{k:>8}" for k in TASKS) + f" {'train s':>8}")
    for stage, r in results["stages"].items():
        print(f"{stage:6} {r['accuracy']:11.3f} " + " ".join(f"{r['per_task'].get(k, 0):8.3f}" for k in TASKS)
              + f" {r['train_seconds']:8.1f}")
    for stage, curve in results["heldout"].items():
        if curve:
            keys = ("eval/loss", "eval/accuracy", "eval/margin") if stage == "dpo" else ("eval/loss",)
            print(f"{stage} held-out " + "; ".join(
                f"step {c['step']}: " + " ".join(f"{k[5:]} {c[k]:.3f}" for k in keys) for c in curve))
    print(f"total {results['total_seconds']} s; {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
