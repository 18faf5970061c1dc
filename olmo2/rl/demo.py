"""The RL demo on CPU (issue 15, item 5): GRPO on the SFT model of the post-training demo.

``python -m olmo2.rl.demo`` after ``python -m olmo2.demo_tasks`` (which trains
the SFT model on the generated tasks of :mod:`olmo2.demo_tasks`):

* **Data**: the same split as the SFT demo (:func:`olmo2.demo_tasks.make_splits`,
  same seed), kept to ``--tasks`` among letter counts (``Count the a's in
  abcab``), first letters (``First letter of quz``) and sums of 0-19 (``What is
  12+19?``); reversal is left out (the SFT model never samples a right one, so
  there is nothing to reinforce). Numeric answers are checked by the built-in
  ``gsm8k`` verifier, first letters by ``demo_exact_match`` (the stripped answer
  equals the reference), registered here with
  :func:`olmo2.rl.verifiers.register_verifier`. Training prompts are the SFT
  demo's training prompts of these tasks; the held-out prompts are the SFT
  demo's held-out ones, never trained on. Written as prompt JSONL
  (``prompts.jsonl``, ``test.jsonl``).
* **Run**: :func:`olmo2.rl.trainer.train_rl` with ``eval_data`` the held-out
  prompts: greedy verified accuracy before the first step (the SFT model),
  every ``eval_interval`` steps, and after the last.
* **Output**: ``results.json`` (accuracies before/after, per task, wall time),
  ``reward_curve.png`` (reward and accuracy of the samples per step, held-out
  accuracy), and the RL model as an HF folder in ``OUT/model``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ..demo_tasks import make_splits, task_of, write_jsonl

RL_TASKS = ("add", "count", "first")
# Numeric answers go to the built-in gsm8k verifier (the last number equals the reference);
# first letters to an exact match of the stripped answer, the SFT demo's scoring, registered
# here through olmo2.rl.verifiers.register_verifier as a user's own verifier would be.
VERIFIER_OF_TASK = {"add": "gsm8k", "count": "gsm8k", "first": "demo_exact_match"}


def exact_match_verifier(completion: str, reference) -> bool:
    return completion.strip() == str(reference).strip()


def register_demo_verifier() -> None:
    from .verifiers import VERIFIERS, register_verifier

    if VERIFIERS.get("demo_exact_match") is not exact_match_verifier:
        register_verifier("demo_exact_match", exact_match_verifier, replace=True)


def prompt_record(prompt: str, answer: str) -> dict:
    return {"prompt": prompt, "verifier": VERIFIER_OF_TASK[task_of(prompt)], "reference": answer}


def rl_splits(n_train: int, n_test: int, seed: int, tasks: tuple[str, ...] = RL_TASKS
              ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The SFT demo's split (same arguments give the same prompts), kept to ``tasks``."""
    bad = [t for t in tasks if t not in RL_TASKS]
    if bad:
        raise ValueError(f"--tasks must be among {RL_TASKS}, got {bad}")
    train, test = make_splits(n_train, n_test, seed)
    return [(p, a) for p, a in train if task_of(p) in tasks], [(p, a) for p, a in test if task_of(p) in tasks]


def per_task(test: list[tuple[str, str]], result: dict) -> dict:
    """Held-out accuracies overall and per task from one :func:`olmo2.rl.evaluation.evaluate_prompts` result
    (its per-prompt lists follow ``test``'s order)."""
    out = {"greedy": result["accuracy"], "sampled": result.get("sampled_accuracy"), "n": result["n"],
           "greedy_per_task": {}, "sampled_per_task": {}}
    for key, values in (("greedy_per_task", result["correct"]), ("sampled_per_task", result.get("sampled_correct"))):
        if values is None:
            continue
        hits: dict[str, list[float]] = {}
        for (p, _), v in zip(test, values):
            hits.setdefault(task_of(p), []).append(float(v))
        out[key] = {k: sum(v) / len(v) for k, v in hits.items()}
    return out


def plot(run_dir: Path, out: Path, smooth: int = 5) -> None:
    """The reward per step (and its running mean), the held-out accuracy at its
    evaluations, and the entropy estimate and KL per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.run_plot import column, read_metrics

    records = read_metrics(run_dir)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.6))
    steps, reward = column(records, "reward")
    ax1.plot(steps, reward, lw=0.8, color="tab:blue", alpha=0.45, label="mean over the step's samples")
    running = [sum(reward[max(0, i - smooth + 1) : i + 1]) / len(reward[max(0, i - smooth + 1) : i + 1])
               for i in range(len(reward))]
    ax1.plot(steps, running, lw=2, color="tab:blue", label=f"running mean of {smooth} steps")
    ax1.set_xlabel("step")
    ax1.set_ylabel("reward (10 per verified answer)")
    ax1.set_title("GRPO: reward of the samples")
    ax1.legend(loc="lower right", fontsize=8)
    steps, held = column(records, "eval/accuracy")
    ax2.plot(steps, held, "o-", color="tab:red", label="greedy")
    steps, held = column(records, "eval/sampled_accuracy")
    if held:
        ax2.plot(steps, held, "s-", color="tab:orange", label="sampled (temperature 1)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("verified accuracy")
    ax2.set_title("held-out prompts")
    ax2.legend(loc="lower right", fontsize=8)
    for key, color in (("entropy", "tab:green"), ("kl", "tab:purple")):
        steps, values = column(records, key)
        if values:
            ax3.plot(steps, values, lw=1, color=color, label=key)
    ax3.set_xlabel("step")
    ax3.set_title("entropy estimate" + (" and KL" if column(records, "kl")[1] else "") + " per token")
    ax3.legend(loc="upper right", fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _log(text: str) -> None:
    print(f"olmo2-rl-demo: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m olmo2.rl.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", default="runs/posttrain-demo/sft", help="HF folder of the SFT model (python -m olmo2.demo_tasks)")
    p.add_argument("--out", default="runs/rl-demo", help="folder for data, the run and results.json (replaced)")
    p.add_argument("--n-train", type=int, default=3000, help="as the SFT demo's (the same split)")
    p.add_argument("--n-test", type=int, default=300, help="as the SFT demo's (the same split)")
    p.add_argument("--split-seed", type=int, default=0, help="the SFT demo's --seed")
    p.add_argument("--seed", type=int, default=1, help="the RL run's seed (sampling, data order)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference copy, as zero-style GRPO)")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--tasks", default="add,count", help=f"comma-separated, of {', '.join(RL_TASKS)}")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=8, help="sampled answers per held-out prompt")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.eval_samples < 1:
        p.error("--eval-samples must be >= 1")

    import torch

    from .trainer import RLConfig, train_rl

    if args.threads:
        torch.set_num_threads(args.threads)
    register_demo_verifier()
    sft = Path(args.sft)
    if not (sft / "config.json").is_file():
        raise SystemExit(f"olmo2-rl-demo: --sft {sft} holds no HF checkpoint; run `python -m olmo2.demo_tasks` "
                         "first (it writes runs/posttrain-demo/sft)")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # the demo starts over: a stale checkpoint there would be resumed
    out.mkdir(parents=True)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    train, test = rl_splits(args.n_train, args.n_test, args.split_seed, tasks)
    write_jsonl(out / "prompts.jsonl", (prompt_record(q, a) for q, a in train))
    write_jsonl(out / "test.jsonl", (prompt_record(q, a) for q, a in test))
    _log(f"{len(train)} training prompts, {len(test)} held-out ({', '.join(tasks)}), in {out}")

    clock = time.perf_counter()
    cfg = RLConfig(model=str(sft), data=str(out / "prompts.jsonl"), output=str(out / "model"), steps=args.steps,
                   prompts_per_step=args.prompts_per_step, k=args.k, max_prompt_length=128,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, lr=args.lr,
                   lr_schedule="constant", warmup_ratio=args.warmup_ratio, beta=args.beta, micro_batch_size=64,
                   seed=args.seed, device="cpu",
                   eval_data=str(out / "test.jsonl"), eval_interval=args.eval_interval,
                   eval_samples=args.eval_samples, save_interval=0)
    result = train_rl(cfg, log=_log)
    seconds = time.perf_counter() - clock
    before, after = per_task(test, result["eval"][0]), per_task(test, result["eval"][args.steps])
    results = {"args": vars(args), "sft": before, "rl": after, "seconds": round(seconds, 1),
               "eval_during_training": {str(k): {"greedy": v["accuracy"], "sampled": v.get("sampled_accuracy")}
                                        for k, v in result["eval"].items()},
               "last_step": result["history"][-1]}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(out / "model", out / "reward_curve.png")
    print(f"held-out verified accuracy ({len(test)} prompts; greedy, and sampled: {args.eval_samples} answers "
          f"per prompt at temperature {args.temperature})")
    print(f"{'model':6} {'greedy':>7} " + " ".join(f"{k:>7}" for k in tasks) + f" {'sampled':>8} "
          + " ".join(f"{k:>7}" for k in tasks))
    for name, r in (("sft", before), ("rl", after)):
        print(f"{name:6} {r['greedy']:7.3f} " + " ".join(f"{r['greedy_per_task'].get(k, 0):7.3f}" for k in tasks)
              + f" {r['sampled']:8.3f} " + " ".join(f"{r['sampled_per_task'].get(k, 0):7.3f}" for k in tasks))
    print(f"GRPO {args.steps} steps and its evaluations: {seconds:.0f} s; {out / 'results.json'}, "
          f"{out / 'reward_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
