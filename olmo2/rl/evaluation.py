"""Verified-answer evaluation on held-out prompts: greedy (and optionally sampled)
completions scored by each record's verifier (:mod:`olmo2.rl.verifiers`).

What this module owns: :func:`greedy_completions`, :func:`evaluate_prompts` (one
process) and :func:`evaluate_ranks` (the prompts split over the ranks of a
``torchrun`` launch, the weights gathered under FSDP2, the results merged on every
rank). Used by ``olmo2-rl`` (``eval_data``) and by ``olmo2-sft``/``olmo2-dpo``
(``eval.prompts``, :class:`olmo2.sft.InLoopEvaluation`); it imports neither trainer,
so both can import it.
"""
from __future__ import annotations

import contextlib

import torch

from .data import Prompt


def greedy_completions(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                       batch_size: int = 64) -> list[str]:
    """Greedy completions of ``prompt_ids`` (stopped at EOS), decoded without it."""
    from ..generation import sample

    eos = tokenizer.token_to_id("<|endoftext|>")
    was_training = model.training
    model.eval()
    samples = sample(model, prompt_ids, k=1, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos,
                     batch_size=batch_size)
    model.train(was_training)
    return [tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True) for tokens in samples.tokens]


def evaluate_prompts(model, tokenizer, prompts: list[Prompt], max_new_tokens: int, samples: int = 0,
                     temperature: float = 1.0, seed: int = 0) -> dict:
    """Greedy verified accuracy (share with reward > 0) and mean reward on ``prompts``; with
    ``samples`` > 0 also ``sampled_accuracy``, the verified share of ``samples`` answers per
    prompt drawn at ``temperature`` (pass@1 estimated by sampling, the quantity RL raises),
    from a generator seeded with ``seed`` (the training sampler's state is not touched)."""
    from ..generation import sample
    from .verifiers import reward as verify

    texts = greedy_completions(model, tokenizer, [p.ids for p in prompts], max_new_tokens)
    rewards = [float(verify(t, p.record)) for t, p in zip(texts, prompts)]
    result = {"accuracy": sum(r > 0 for r in rewards) / max(1, len(rewards)),
              "reward": sum(rewards) / max(1, len(rewards)), "n": len(rewards),
              "correct": [r > 0 for r in rewards],
              "samples": [{"prompt": p.record.get("prompt") or p.record.get("messages"),
                           "reference": p.record["reference"], "completion": t}
                          for p, t in list(zip(prompts, texts))[:4]]}
    if samples:
        eos = tokenizer.token_to_id("<|endoftext|>")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        drawn = sample(model, [p.ids for p in prompts], k=samples, max_new_tokens=max_new_tokens,
                       temperature=temperature, eos_token_id=eos,
                       generator=torch.Generator(device=device).manual_seed(seed))
        model.train(was_training)
        hits = [verify(tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True),
                       prompts[drawn.prompt_index[i]].record) > 0 for i, tokens in enumerate(drawn.tokens)]
        result["sampled_accuracy"] = sum(hits) / max(1, len(hits))
        result["sampled_correct"] = [sum(hits[i * samples : (i + 1) * samples]) / samples
                                     for i in range(len(prompts))]
    return result


def evaluate_ranks(model, base, tokenizer, prompts: list[Prompt], max_new_tokens: int, samples: int,
                   temperature: float, seed: int, autocast=contextlib.nullcontext) -> dict:
    """:func:`evaluate_prompts` over the ranks of a ``torchrun`` launch: each rank scores
    prompts ``rank, rank + world, ...`` with the weights gathered (:func:`olmo2.train.parallel.gathered_weights`),
    the results are merged on every rank (in the prompts' order). The sampled accuracy
    draws from a generator seeded ``seed + rank``: with one rank, :func:`evaluate_prompts` itself.
    ``autocast``: the run's precision."""
    import torch.distributed as dist

    from ..train.parallel import gathered_weights

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    with gathered_weights(model), autocast():
        mine = prompts[rank::world]
        part = (evaluate_prompts(base, tokenizer, mine, max_new_tokens, samples, temperature, seed=seed + rank)
                if mine else None)
    if world == 1:
        return part
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    parts = [p for p in parts if p is not None]

    def merged(key: str) -> list:  # per-prompt lists back in the prompts' order
        return [p[key][j] for j in range(len(parts[0][key])) for p in parts if j < len(p[key])]

    n = len(prompts)
    result = {"correct": merged("correct"), "n": n, "samples": merged("samples")[:4],
              "reward": sum(p["reward"] * p["n"] for p in parts) / n}
    result["accuracy"] = sum(result["correct"]) / n
    if samples:
        result["sampled_accuracy"] = sum(p["sampled_accuracy"] * p["n"] for p in parts) / n
        result["sampled_correct"] = merged("sampled_correct")
    return result
