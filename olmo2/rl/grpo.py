"""GRPO: group-normalized advantages and the clipped policy-ratio loss on token log-probabilities.

What this module owns:

* :func:`group_advantages`: the k completions of one prompt form a group; each
  completion's advantage is ``(r - mean(group)) / (std(group) + eps)`` (GRPO,
  DeepSeekMath), or ``r - mean(group)`` with ``scale="none"`` (Dr. GRPO, which
  drops the std because it up-weights groups that are almost all right or all
  wrong). ``std`` is the population std (ddof 0). A group whose rewards are all
  equal gets advantages of exactly 0 (the numerator is 0.0; never NaN).
* :func:`token_logps`: log p of each completion token under the model, from the
  final hidden states and the LM head through the fused
  ``olmo2_kernels.linear_cross_entropy(reduction="none")`` (``model(...,
  labels, reduction="none")``, as :func:`olmo2.dpo.sequence_logps`): no (B, T, V)
  logits are ever allocated.
* :func:`token_weights` and :func:`grpo_loss`: the PPO-clip objective per token
  ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` with
  ``ratio = exp(logp - logp_old)`` against the sampling policy's log-probs,
  plus ``beta * KL`` to the reference policy with the k3 estimator
  ``exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased for
  KL(pi || ref) on samples from pi; ``ref - logp`` clamped to +-40 against overflow).

**Aggregation** (``loss_aggregation``): the loss of one optimizer step is
``sum over its tokens of weight * token_loss``, the weights fixed for the whole
mini-batch before its first forward, so the gradient does not depend on how the
mini-batch is split into micro-batches:

* ``"token"`` (default; open-instruct's ``grpo_fast`` masked mean, DAPO's
  token-level loss): every completion token of the mini-batch weighs
  ``1 / (its number of completion tokens)``. Long and short answers count per token.
* ``"sequence"`` (the GRPO paper): the mean over each completion's tokens, then
  the mean over completions: weight ``1 / (n_seq * len(seq))``.
* ``"fixed"`` (Dr. GRPO): token sums over a constant, ``1 / (n_seq * max_new_tokens)``,
  so no length bias at all.

**Entropy** is logged as the sample estimate ``mean(-log p)`` of the sampled
tokens under the current policy (an unbiased estimate of the per-token entropy
when sampling at temperature 1): the exact entropy would need the whole
distribution, i.e. the (B, T, V) logits this module avoids.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..chat import IGNORE_INDEX

AGGREGATIONS = ("token", "sequence", "fixed")
ADVANTAGE_SCALES = ("std", "none")
KL_CLAMP = 40.0


def group_advantages(rewards: Tensor, k: int, scale: str = "std", eps: float = 1e-6) -> Tensor:
    """Advantages (N,) of rewards (N,) laid out prompt-major, ``k`` rows per prompt.

    ``scale="std"``: ``(r - mean) / (std + eps)`` within each group (GRPO);
    ``"none"``: ``r - mean`` (Dr. GRPO). Equal rewards in a group give exactly 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"group_advantages: scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.dim() != 1 or k < 1 or rewards.numel() % k:
        raise ValueError(f"group_advantages: rewards must be 1-D with a multiple of k={k} entries, "
                         f"got shape {tuple(rewards.shape)}")
    groups = rewards.reshape(-1, k).double()
    centered = groups - groups.mean(dim=1, keepdim=True)
    # mean() of equal values can differ from them in the last bit; force exact zeros.
    equal = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    centered = torch.where(equal, torch.zeros_like(centered), centered)
    if scale == "std":
        centered = centered / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centered.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def token_logps(model, batch: dict[str, Tensor]) -> Tensor:
    """(B, T) log p of ``labels[:, t + 1]`` at position t (0 where the label is -100),
    through the fused LM head: ``-ce`` of ``model(..., reduction="none")``."""
    out = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), reduction="none")
    return -out.ce_loss


def completion_mask(labels: Tensor) -> Tensor:
    """(B, T) bool: positions whose next token is a completion token (aligned with :func:`token_logps`)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def token_weights(lengths: list[int], aggregation: str, max_new_tokens: int, n_sequences: int | None = None,
                  n_tokens: int | None = None) -> list[float]:
    """Per-sequence weight of each token of a mini-batch of completions of ``lengths`` tokens.

    ``lengths`` may be one rank's share of the mini-batch: ``n_sequences`` and
    ``n_tokens`` are then the whole mini-batch's completion and token counts (over
    all ranks; default: those of ``lengths``), so the weights are those of one process."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss_aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    n = len(lengths) if n_sequences is None else n_sequences
    if aggregation == "token":
        total = sum(lengths) if n_tokens is None else n_tokens
        return [1.0 / max(total, 1)] * len(lengths)
    if aggregation == "sequence":
        return [1.0 / (n * max(length, 1)) for length in lengths]
    return [1.0 / (n * max_new_tokens)] * len(lengths)


def grpo_loss(
    logps: Tensor, old_logps: Tensor, ref_logps: Tensor | None, advantages: Tensor, weights: Tensor, mask: Tensor,
    clip_eps: float = 0.2, beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of per-token losses of one micro-batch, and sums for the metrics.

    ``logps``, ``old_logps``, ``ref_logps`` and ``mask`` are (B, T) (the mask marks
    completion tokens; elsewhere the values are ignored), ``advantages`` and
    ``weights`` (B,) (see :func:`token_weights`). ``ref_logps`` may be None when
    ``beta`` is 0. Metric sums are over the mask's tokens: ``clipped`` (tokens whose
    clipped term was the smaller, i.e. got no gradient), ``kl``, ``ratio``,
    ``neg_logp`` (entropy estimate) and ``tokens``.
    """
    mask_f = mask.to(logps.dtype)
    log_ratio = torch.where(mask, logps - old_logps.to(logps.dtype), torch.zeros_like(logps))
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logps.dtype)[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = torch.where(mask, ref_logps.to(logps.dtype) - logps, torch.zeros_like(logps))
        # exp() of a token the policy has all but ruled out (ref - logp > 88) overflows fp32;
        # clamped at +-40 (exp(40) ~ 2e17 still dominates any sane loss and gradient).
        delta = delta.clamp(-KL_CLAMP, KL_CLAMP)
        kl = torch.exp(delta) - delta - 1.0
        if beta:
            per_token = per_token + beta * kl
    elif beta:
        raise ValueError("grpo_loss: beta > 0 needs ref_logps")
    loss = (per_token * mask_f * weights.to(logps.dtype)[:, None]).sum()
    with torch.no_grad():
        stats = {
            "clipped": ((clipped < unclipped) & mask).sum(),
            "kl": (kl * mask_f).sum(),
            "ratio": (ratio * mask_f).sum(),
            "neg_logp": (-logps * mask_f).sum(),
            "tokens": mask.sum(),
        }
    return loss, stats
