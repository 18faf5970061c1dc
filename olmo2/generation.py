"""Text generation with a KV cache (the ``olmo2-generate`` command is :mod:`olmo2.cli.generate`).

:func:`generate` runs the prompt once (prefill), then one token per step,
keys and values of earlier positions coming from a preallocated
:class:`olmo2.model.KVCache`. Greedy when ``temperature`` is 0, else sampling
from the temperature-scaled distribution cut to its top-p nucleus.

Batches may be left-padded: pass ``attention_mask`` (1 for tokens, 0 for
padding); positions then count real tokens only (``cumsum(mask) - 1``, as
``transformers`` does), so a padded row continues exactly as it would alone.

:func:`sample` is the generation RL needs: ``k`` completions per prompt from
one shared prefill, prompts of different lengths in one batch, per-row stop
on eos or stop sequences, and the log-probability of every sampled token
taken from the decoding logits themselves (no second forward). Rows that
finish drop out of the batch once half of it is done, so compute follows the
sequences still running.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

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
    return torch.multinomial(next_probs(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


def sample_next_from_uniform(logits: Tensor, temperature: float, top_p: float, u: Tensor) -> Tensor:
    """Next token per row of ``logits`` (B, V) from one uniform draw in [0, 1) per row
    (``u``, (B,)): the token whose interval of the cumulative distribution holds ``u``
    (inverse CDF; the distribution of :func:`sample_next`). A row's token depends on
    its logits and its ``u`` only, whatever else is in the batch."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = next_probs(logits, temperature, top_p)
    cdf = probs.cumsum(dim=-1)
    # The first token whose cumulative mass exceeds u * total: a token of probability 0
    # never is (its cumulative mass equals its predecessor's).
    token = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return token.clamp(max=probs.shape[-1] - 1)


def next_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """(B, V) fp32 distribution of the next token: softmax at ``temperature``, cut to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the
        # mass; the most likely token is always kept.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


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


# --------------------------------------------------------------------------- sampling for RL
STOP_REASONS = ("eos", "stop", "length")


@dataclass
class Samples:
    """What :func:`sample` returns: one entry per row, rows = prompts x k, prompt-major.

    ``prompt_index[r]``: the prompt row ``r`` continues. ``tokens[r]``: the
    completion's ids (no prompt, no padding), ending with the eos id or the
    matched stop sequence when the row stopped on one (they are what the policy
    sampled, so a trainer scores them too; strip them for display).
    ``logprobs[r]``: log p of each of those tokens under the model's raw
    distribution, i.e. ``log_softmax`` of the logits in fp32 at temperature 1
    and without top-p, whatever temperature/top-p the draw used (the policy that
    GRPO trains). ``stop_reason[r]``: ``"eos"``, ``"stop"`` or ``"length"``.
    """

    prompt_index: list[int]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    stop_reason: list[str]

    def __len__(self) -> int:
        return len(self.tokens)


def _check_positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"sample: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _token_lists(name: str, seqs: object, vocab_size: int) -> list[list[int]]:
    """``seqs`` as a list of non-empty lists of ids in [0, vocab_size)."""
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, (Sequence, Tensor)):
        raise TypeError(f"sample: {name} must be a list of token-id lists, got {type(seqs).__name__}")
    out = []
    for i, seq in enumerate(seqs):
        if isinstance(seq, Tensor):
            if seq.dim() != 1 or seq.dtype not in INDEX_DTYPES:
                raise TypeError(f"sample: {name}[{i}] must be a 1-D int tensor or a list of ints, "
                                f"got {seq.dtype} {tuple(seq.shape)}")
            seq = seq.tolist()
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(f"sample: {name}[{i}] must be a list of token ids, got {type(seq).__name__}")
        if len(seq) == 0:
            raise ValueError(f"sample: {name}[{i}] is empty; it needs at least one token id")
        for j, t in enumerate(seq):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"sample: {name}[{i}][{j}] = {t!r} is not a token id in [0, vocab_size={vocab_size})")
        out.append(list(seq))
    return out


@torch.inference_mode()
def sample(
    model: Olmo2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    k: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    batch_size: int | None = None,
    stop_strings: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> Samples:
    """``k`` completions of up to ``max_new_tokens`` tokens for each prompt (lists of ids).

    Rows are prompt-major (prompt 0's k samples first) and run ``batch_size``
    rows at a time (default: all at once); within a batch each distinct prompt
    is prefilled once and its keys/values copied to its k rows. Prompts of
    different lengths are left-padded with positions counting real tokens
    only, so every row continues exactly as it would alone. A row stops at the
    first eos id (``eos_token_id`` None: the config's; ``[]``: never) or once
    its completion ends with one of ``stop_sequences`` (token-id lists, matched
    inside the completion only, kept in ``tokens``) or once its decoded text
    contains one of ``stop_strings`` (checked on ``decode(ids)`` of the last
    tokens each step, so a string is found however the tokenizer split it; the
    row ends with the token that completed it), else after ``max_new_tokens``.
    ``temperature`` 0 is greedy; otherwise the draw is from the
    temperature-scaled distribution cut to its top-p nucleus. The returned
    log-probs are always those of the unmodified policy (see
    :class:`Samples`). Same ``generator`` seed and arguments: same samples
    (the generator lives on the model's device).

    ``generator`` may also be a list, one per prompt: every decode step each
    prompt draws k uniforms from its own generator and its rows take their
    tokens by inverse CDF (:func:`sample_next_from_uniform`), so a prompt's
    samples do not depend on the other prompts in the batch nor on when rows
    finish (up to float rounding of batched matmuls); batches then hold whole
    prompts (``batch_size // k`` of them, at least one). RL across ranks uses it.
    """
    config = model.config
    prompts = _token_lists("prompts", prompts, config.vocab_size)
    if not prompts:
        raise ValueError("sample: prompts is empty; give at least one prompt")
    _check_positive_int("k", k, 1)
    _check_positive_int("max_new_tokens", max_new_tokens, 0)
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size, 1)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"sample: temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p!r}")
    stops = _token_lists("stop_sequences", stop_sequences or [], config.vocab_size)
    texts = _stop_texts(stop_strings, decode)
    device = next(model.parameters()).device
    per_prompt = generator is not None and not isinstance(generator, torch.Generator)
    if per_prompt:
        generator = list(generator)
        if len(generator) != len(prompts):
            raise ValueError(f"sample: {len(generator)} generators for {len(prompts)} prompts; give one per prompt")
    for g in generator if per_prompt else [generator]:
        if g is not None and g.device.type != device.type:
            raise ValueError(f"sample: generator is on {g.device} but the model on {device}; "
                             f"make it with torch.Generator(device={str(device)!r})")
    eos = _eos_ids(config.eos_token_id if eos_token_id is None else eos_token_id)

    rows = [p for p in range(len(prompts)) for _ in range(k)]
    per_batch = len(rows) if batch_size is None else batch_size
    if per_prompt:  # whole prompts per batch
        per_batch = max(1, per_batch // k) * k
    out = Samples(prompt_index=rows, tokens=[], logprobs=[], stop_reason=[])
    for start in range(0, len(rows), per_batch):
        chunk = rows[start : start + per_batch]
        distinct = sorted(set(chunk))
        tokens, logps, reasons = _sample_rows(
            model, [prompts[p] for p in distinct], [chunk.count(p) for p in distinct], max_new_tokens,
            float(temperature), float(top_p), eos, stops,
            [generator[p] for p in distinct] if per_prompt else generator, texts,
        )
        out.tokens += tokens
        out.logprobs += logps
        out.stop_reason += reasons
    return out


def _stop_texts(stop_strings: object, decode: object) -> tuple[list[str], Callable[[list[int]], str], int] | None:
    """``(strings, decode, window)``: a stop string lies within the last ``window`` tokens when it ends at the
    newest one (a token decodes to at least one character, byte pieces of one character aside)."""
    if not stop_strings:
        return None
    if isinstance(stop_strings, str) or not isinstance(stop_strings, Sequence):
        raise TypeError(f"sample: stop_strings must be a list of strings, got {type(stop_strings).__name__}")
    for i, text in enumerate(stop_strings):
        if not isinstance(text, str) or not text:
            raise ValueError(f"sample: stop_strings[{i}] must be a non-empty string, got {text!r}")
    if not callable(decode):
        raise ValueError("sample: stop_strings needs decode, a function from token ids to text (e.g. tokenizer.decode)")
    return list(stop_strings), decode, 4 * max(len(t) for t in stop_strings) + 4


def _sample_rows(
    model: Olmo2ForCausalLM,
    prompts: list[list[int]],
    repeats: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos: list[int],
    stops: list[list[int]],
    generator: torch.Generator | list[torch.Generator] | None,
    texts: tuple[list[str], Callable[[list[int]], str], int] | None = None,
) -> tuple[list[list[int]], list[list[float]], list[str]]:
    """One batch of :func:`sample`: prompt i continued ``repeats[i]`` times (``generator``:
    one for the batch, or one per prompt)."""
    device = next(model.parameters()).device
    n_rows = sum(repeats)
    if max_new_tokens == 0:
        return [[] for _ in range(n_rows)], [[] for _ in range(n_rows)], ["length"] * n_rows
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
    padded = any(len(p) != width for p in prompts)
    mask = position_ids = None
    if padded:
        mask = (torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]).to(torch.int64)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

    total = width + max_new_tokens
    shared = n_rows != len(prompts)
    cache = KVCache(len(model.model.layers), capacity=width if shared else total)
    hidden, cache = model.model(ids, mask, position_ids, cache, use_cache=True)
    logits = model.lm_head(hidden[:, -1])
    if shared:  # k rows per prompt continue one prefill
        expand = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(repeats, device=device))
        cache = cache.select_rows(expand, capacity=total)
        logits, lengths = logits[expand], lengths[expand]
    full_mask = None
    if padded:  # the prompt's mask, then ones for every generated position
        full_mask = torch.ones(n_rows, total, dtype=torch.int64, device=device)
        full_mask[:, :width] = mask[expand] if shared else mask

    # Slot s of the running batch holds row slot_row[s]; rows that finished keep
    # decoding (their tokens are ignored) until half the batch is done, then the
    # batch is compacted to the running rows.
    slot_row = torch.arange(n_rows, device=device)
    running = torch.ones(n_rows, dtype=torch.bool, device=device)
    out_tokens = torch.zeros(n_rows, max_new_tokens, dtype=torch.int64, device=device)
    out_logps = torch.zeros(n_rows, max_new_tokens, dtype=torch.float32, device=device)
    end = torch.full((n_rows,), max_new_tokens, dtype=torch.int64, device=device)
    reason = torch.full((n_rows,), STOP_REASONS.index("length"), dtype=torch.int64, device=device)
    eos_ids = torch.tensor(eos, dtype=torch.int64, device=device)
    stop_ids = [torch.tensor(s, dtype=torch.int64, device=device) for s in stops]
    for step in range(max_new_tokens):
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        if isinstance(generator, list):  # every prompt draws for all its rows, running or not
            u = torch.cat([torch.rand(r, generator=g, device=device) for g, r in zip(generator, repeats)])
            token = sample_next_from_uniform(logits, temperature, top_p, u[slot_row])
        else:
            token = sample_next(logits, temperature, top_p, generator)
        out_tokens[slot_row, step] = token
        out_logps[slot_row, step] = logp_all.gather(1, token[:, None]).squeeze(1)
        hit_eos = torch.isin(token, eos_ids) if eos else torch.zeros_like(running)
        hit_stop = torch.zeros_like(running)
        for s in stop_ids:
            if step + 1 >= len(s):
                hit_stop |= (out_tokens[slot_row, step + 1 - len(s) : step + 1] == s).all(dim=1)
        if texts is not None:
            strings, decode, window = texts
            tails = out_tokens[slot_row, max(0, step + 1 - window) : step + 1].tolist()
            found = [alive and any(t in decode(tail) for t in strings) for alive, tail in zip(running.tolist(), tails)]
            hit_stop |= torch.tensor(found, dtype=torch.bool, device=device)
        done = running & (hit_eos | hit_stop)
        end[slot_row[done]] = step + 1
        reason[slot_row[done & hit_eos]] = STOP_REASONS.index("eos")
        reason[slot_row[done & ~hit_eos]] = STOP_REASONS.index("stop")
        running &= ~done
        n_running = int(running.sum())  # the one host sync per step: is anyone left?
        if n_running == 0 or step + 1 == max_new_tokens:
            break
        if n_running <= running.numel() // 2:
            keep = running.nonzero().squeeze(1)
            cache = cache.select_rows(keep, capacity=total)
            slot_row, token, lengths, running = slot_row[keep], token[keep], lengths[keep], running[keep]
            if full_mask is not None:
                full_mask = full_mask[keep]
        past = width + step + 1  # positions in the cache after this token is fed
        step_mask = step_pos = None
        if full_mask is not None:
            step_mask = full_mask[:, :past]
            step_pos = (lengths + step)[:, None]
        hidden, cache = model.model(token[:, None], step_mask, step_pos, cache, use_cache=True)
        logits = model.lm_head(hidden[:, -1])

    ends = end.tolist()
    tokens = [row[:n] for row, n in zip(out_tokens.tolist(), ends)]
    logps = [row[:n] for row, n in zip(out_logps.tolist(), ends)]
    return tokens, logps, [STOP_REASONS[r] for r in reason.tolist()]
