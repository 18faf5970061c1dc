"""Text generation with a KV cache (the ``olmo2-generate`` command is :mod:`olmo2.cli.generate`).

:func:`generate` runs the prompt once (prefill), then one token per step,
keys and values of earlier positions coming from a preallocated
:class:`olmo2.model.KVCache`. Greedy when ``temperature`` is 0, else sampling
from the temperature-scaled distribution cut to its top-p nucleus.

Batches may be left-padded: pass ``attention_mask`` (1 for tokens, 0 for
padding); positions then count real tokens only (``cumsum(mask) - 1``, as
``transformers`` does), so a padded row continues exactly as it would alone.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .dtypes import INDEX_DTYPES
from .model import KVCache, Olmo2ForCausalLM

def _eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"generate: eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return ids


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next token per row of ``logits`` (B, V): argmax when temperature is 0."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the
        # mass; the most likely token is always kept.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: Olmo2ForCausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int | None = None,
) -> Tensor:
    """Continue ``input_ids`` (B, T) by up to ``max_new_tokens`` tokens.

    Returns (B, T + n) ids, prompt included. A row that emits an eos id is
    finished: its later positions hold ``pad_token_id`` (default: the config's,
    else the first eos id), and generation stops once every row is finished.
    ``eos_token_id`` None uses ``model.config.eos_token_id``; pass ``[]`` to
    never stop early. ``generator`` (on the model's device) makes sampling
    reproducible.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in INDEX_DTYPES or input_ids.dim() != 2:
        raise TypeError(
            "generate: input_ids must be an int64/int32 tensor of shape (batch, seq), got "
            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("generate: input_ids must hold at least one token per row")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"generate: temperature must be a number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
    config = model.config
    eos = _eos_ids(config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)

    batch, prompt_len = input_ids.shape
    device = input_ids.device
    cache = KVCache(len(model.model.layers), capacity=prompt_len + max_new_tokens)
    mask = position_ids = None
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (batch, prompt_len):
            raise ValueError(
                f"generate: attention_mask must be a tensor of the shape of input_ids {(batch, prompt_len)}, got "
                f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}"
            )
        mask = attention_mask.to(device=device, dtype=torch.int64)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    eos_tensor = torch.tensor(eos, device=device, dtype=input_ids.dtype)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    step_ids = input_ids
    new_tokens: list[Tensor] = []
    for _ in range(max_new_tokens):
        hidden, cache = model.model(step_ids, mask, position_ids, cache, use_cache=True)
        logits = model.lm_head(hidden[:, -1])
        token = sample_next(logits, float(temperature), float(top_p), generator).to(input_ids.dtype)
        if eos:
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, eos_tensor)
        new_tokens.append(token)
        if eos and bool(finished.all()):
            break
        step_ids = token[:, None]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
    if not new_tokens:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
