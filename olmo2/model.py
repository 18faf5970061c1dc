"""The OLMo 2 decoder on olmo2_kernels, with Hugging Face parameter names.

Module and parameter names are those of ``transformers.Olmo2ForCausalLM``
(``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj``, ...,
``lm_head``), so state dicts load and save with no renaming. The model is a
plain ``nn.Module``: it builds on the meta device, and parallelism (FSDP,
activation checkpointing, ``torch.compile``) is applied from outside, per block
of ``model.model.layers``.

One block (reordered post-norm, no biases)::

    q, k = qk_norm_rope(q_proj(x), k_proj(x))     # RMSNorm over the whole projection, then RoPE
    h   = x + post_attention_layernorm(o_proj(attention(q, k, v_proj(x))))
    out = h + post_feedforward_layernorm(down_proj(swiglu(gate_proj(h), up_proj(h))))

With labels, the loss goes through ``olmo2_kernels.linear_cross_entropy`` on the
final hidden states and the LM head weight: the (tokens x vocab) logits are
never materialized by the model.

Attention backends (``config.attn_backend``, or :meth:`Olmo2ForCausalLM.set_attn_backend`):

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, causal without
  a mask when there is no padding, GQA without copying k/v.
* ``flash_attn``: ``flash_attn.flash_attn_func`` (CUDA, bf16/fp16); no padding
  masks (use ``sdpa`` for left-padded batches).
* ``eager``: the spec, scores and softmax in fp32.

Positions: ``position_ids`` may differ per row (e.g. left-padded generation).
``qk_norm_rope`` takes one (T, head_dim) cos/sin table for all rows; since
every step of it is per token, per-row positions are handled by flattening the
batch into the token dimension (q as (B*T, width), cos/sin as (B*T, head_dim)):
one kernel call, no per-row loop.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import olmo2_kernels
from olmo2_kernels import RMSNorm, checks

from .config import ATTN_BACKENDS, Olmo2Config
from .dtypes import INDEX_DTYPES

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- outputs and cache
@dataclass
class Olmo2Output:
    """What :meth:`Olmo2ForCausalLM.forward` returns.

    Without labels: ``logits`` (B, T, V). With labels: ``loss = ce_loss +
    z_loss`` reduced as asked (``reduction="none"``: (B, T) per position, the
    last column 0), ``num_tokens`` the number of non-ignored targets (a tensor,
    no host sync), and ``logits`` None.
    """

    logits: Tensor | None = None
    loss: Tensor | None = None
    ce_loss: Tensor | None = None
    z_loss: Tensor | None = None
    num_tokens: Tensor | None = None
    past_key_values: "KVCache | None" = None


class KVCache:
    """Keys and values of every layer for the positions processed so far.

    Stored as (B, n_kv_heads, capacity, head_dim) per layer and grown by
    doubling when a step goes past ``capacity``; give the final length as
    ``capacity`` (as :func:`olmo2.generation.generate` does) to allocate once.
    For inference: the buffers are written in place.
    """

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.num_layers = num_layers
        self.capacity = capacity
        self.length = 0
        self._keys: list[Tensor | None] = [None] * num_layers
        self._values: list[Tensor | None] = [None] * num_layers

    def get_seq_length(self) -> int:
        return self.length

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's (B, Hk, T, D) key/value for ``layer``; return all so far."""
        end = self.length + key.shape[2]
        for store in (self._keys, self._values):
            buf = store[layer]
            if buf is None or end > buf.shape[2]:
                old = 0 if buf is None else buf.shape[2]
                grown = key.new_empty(*key.shape[:2], max(end, self.capacity, 2 * old), key.shape[3])
                if buf is not None:
                    grown[:, :, : self.length] = buf[:, :, : self.length]
                store[layer] = grown
        self._keys[layer][:, :, self.length : end] = key
        self._values[layer][:, :, self.length : end] = value
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        """Mark ``steps`` more positions as stored (after every layer has updated)."""
        self.length += steps

    def select_rows(self, rows: Tensor, capacity: int = 0) -> "KVCache":
        """A new cache holding the batch rows ``rows`` of this one, in that order.

        Rows may repeat (k samples continuing one shared prefill) or be left out
        (sequences that finished); the new buffers have room for
        ``max(capacity, self.capacity, self.length)`` positions.
        """
        out = KVCache(self.num_layers, capacity=max(capacity, self.capacity, self.length))
        out.length = self.length
        for store, new in ((self._keys, out._keys), (self._values, out._values)):
            for layer, buf in enumerate(store):
                if buf is not None:
                    picked = buf.new_empty(rows.numel(), buf.shape[1], out.capacity, buf.shape[3])
                    picked[:, :, : self.length] = buf[:, :, : self.length].index_select(0, rows)
                    new[layer] = picked
        return out


# --------------------------------------------------------------------------- attention backends
def _flash_attn_func():
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except Exception as exc:  # noqa: BLE001
        raise ImportError(
            "attn_backend='flash_attn' needs the flash-attn package (pip install flash-attn), "
            f"which is not importable: {type(exc).__name__}: {exc}"
        ) from exc


def _eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    """The spec: fp32 scores and softmax. q (B, Hq, T, D), k/v (B, Hk, S, D)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is None and causal:
        t, s = q.shape[2], k.shape[2]
        mask = _causal_mask(t, s, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v.float()).to(q.dtype)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    extra = {"enable_gqa": True} if gqa else {}
    if mask is None and causal and q.shape[2] != k.shape[2]:
        # sdpa's is_causal aligns the mask top-left; queries after a cache need bottom-right.
        mask = _causal_mask(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, **extra
    )


def _flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    flash_attn_func = _flash_attn_func()
    if mask is not None:
        raise ValueError(
            "attn_backend='flash_attn' takes no attention_mask (padding); use attn_backend='sdpa' "
            "for padded batches"
        )
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(
            f"attn_backend='flash_attn' needs CUDA bf16/fp16 tensors, got {q.dtype} on {q.device}; "
            "use attn_backend='sdpa' or 'eager'"
        )
    # flash-attn takes (B, T, H, D) and aligns the causal mask bottom-right,
    # which is what queries following a KV cache need.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal)
    return out.transpose(1, 2)


_ATTENTION = {"sdpa": _sdpa_attention, "eager": _eager_attention, "flash_attn": _flash_attention}


def _causal_mask(t: int, s: int, device: torch.device) -> Tensor:
    """(T, S) boolean, True where query i (at position S - T + i) may see key j."""
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    return torch.arange(s, device=device)[None, :] <= q_pos


def _check_attn_backend(name: str) -> str:
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {name!r}")
    if name == "flash_attn":
        _flash_attn_func()
    return name


# --------------------------------------------------------------------------- modules
class Olmo2Attention(nn.Module):
    def __init__(self, config: Olmo2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.eps = config.rms_norm_eps
        self.attn_backend = config.attn_backend
        d, q_width, kv_width = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, q_width, bias=False)
        self.k_proj = nn.Linear(d, kv_width, bias=False)
        self.v_proj = nn.Linear(d, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, d, bias=False)
        # Only their weights are used: qk_norm_rope fuses the norms with RoPE.
        self.q_norm = RMSNorm(q_width, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(kv_width, eps=config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        causal: bool = True,
        cache: KVCache | None = None,
    ) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cos.shape[0] != seq:  # per-row positions: (B*T, D) tables, tokens flattened
            q, k = q.flatten(0, 1), k.flatten(0, 1)
        q, k = olmo2_kernels.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.head_dim, self.eps)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = _ATTENTION[self.attn_backend](q, k, v, mask, causal, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class Olmo2MLP(nn.Module):
    def __init__(self, config: Olmo2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(olmo2_kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Olmo2DecoderLayer(nn.Module):
    """One block; the unit that FSDP and activation checkpointing wrap."""

    def __init__(self, config: Olmo2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_idx)
        self.mlp = Olmo2MLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        causal: bool = True,
        cache: KVCache | None = None,
    ) -> Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, causal, cache))
        return h + self.post_feedforward_layernorm(self.mlp(h))


class Olmo2Model(nn.Module):
    """Embedding, blocks and final norm: input ids to final hidden states."""

    def __init__(self, config: Olmo2Config) -> None:
        super().__init__()
        self.config = config
        # No padding_idx: OLMo 2 trains every row (transformers passes pad_token_id,
        # which only zeroes that row's gradient; it makes no difference to outputs).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Olmo2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, KVCache | None]:
        """Final hidden states (B, T, hidden_size) and the cache (None unless used)."""
        _check_input_ids(input_ids, self.config.vocab_size)
        batch, seq = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(len(self.layers))
        past = 0 if cache is None else cache.length
        device = input_ids.device

        cos, sin = self._rope(position_ids, batch, seq, past, device)
        mask, causal = _attention_mask(attention_mask, batch, seq, past, device)

        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, causal, cache)
        if cache is not None:
            cache.advance(seq)
        return self.norm(x), cache

    def _rope(self, position_ids: Tensor | None, batch: int, seq: int, past: int, device) -> tuple[Tensor, Tensor]:
        cfg = self.config
        if position_ids is None:
            positions = torch.arange(past, past + seq, device=device)
        else:
            if not isinstance(position_ids, Tensor) or position_ids.dtype not in INDEX_DTYPES:
                raise TypeError(
                    f"Olmo2ForCausalLM.forward: position_ids must be an int64/int32 tensor, got "
                    f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}"
                )
            if tuple(position_ids.shape) in ((seq,), (1, seq)):
                positions = position_ids.reshape(seq)
            elif tuple(position_ids.shape) == (batch, seq):
                positions = position_ids.reshape(batch * seq)
            else:
                raise ValueError(
                    f"Olmo2ForCausalLM.forward: position_ids must have shape ({batch}, {seq}), (1, {seq}) or "
                    f"({seq},) to match input_ids, got {tuple(position_ids.shape)}"
                )
            positions = positions.to(device)
        return olmo2_kernels.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, device=device)


class Olmo2ForCausalLM(nn.Module):
    """OLMo 2 with its LM head; parameter names match ``transformers.Olmo2ForCausalLM``."""

    def __init__(self, config: Olmo2Config) -> None:
        super().__init__()
        if not isinstance(config, Olmo2Config):
            raise TypeError(f"Olmo2ForCausalLM: config must be an Olmo2Config, got {type(config).__name__}")
        self.config = config
        self.model = Olmo2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()

    # ------------------------------------------------------------------ construction
    def parameter_init(self) -> dict[str, tuple[str, float]]:
        """How OLMo 2 initializes each parameter, by name (as ``named_parameters``
        spells it for this module tree): ``("trunc_normal", std)``, a normal with std
        ``initializer_range`` (0.02) truncated at +-3 std, for every linear and the
        embedding (no depth scaling); ``("ones", 0.0)`` for the norm weights.

        The one description that :meth:`init_weights` (sequential, one generator)
        and the sharded initialization (``olmo2.train.init``: keyed by name and
        row, the same for any number of ranks) both follow.
        """
        std = self.config.initializer_range
        spec: dict[str, tuple[str, float]] = {}
        for prefix, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                spec[f"{prefix}.weight"] = ("trunc_normal", std)
            elif isinstance(module, RMSNorm):
                spec[f"{prefix}.weight"] = ("ones", 0.0)
        return spec

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialize as :meth:`parameter_init` says, drawing from one generator.

        Values are drawn in fp32 whatever the parameter dtype, in parameter order,
        so a seed (or ``generator``) gives the same model in any dtype. Meta
        parameters are skipped. (The trainer initializes with the sharded scheme
        of ``olmo2.train.init`` instead, whose values do not depend on the ranks.)
        """
        spec = self.parameter_init()
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            kind, std = spec[name]
            if kind == "ones":
                param.fill_(1.0)
                continue
            values = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            nn.init.trunc_normal_(values, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
            param.copy_(values)

    @classmethod
    def from_config(
        cls,
        config: Olmo2Config,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> "Olmo2ForCausalLM":
        """Build on the meta device, then allocate on ``device`` (default CPU)
        in ``dtype`` and initialize there; ``device="meta"`` leaves it unallocated."""
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            model.to(dtype=dtype)
        device = torch.device("cpu" if device is None else device)
        if device.type == "meta":
            return model
        model.to_empty(device=device)
        model.init_weights(generator)
        return model

    def set_attn_backend(self, name: str) -> None:
        """Switch every layer to attention backend ``name`` (and record it in the config)."""
        _check_attn_backend(name)
        for module in self.modules():
            if isinstance(module, Olmo2Attention):
                module.attn_backend = name
        self.config.attn_backend = name

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        z_loss_coef: float = 0.0,
        reduction: str = "mean",
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> Olmo2Output:
        """Logits, or with ``labels`` the loss without materializing logits.

        ``labels`` (B, T) follow the Hugging Face convention: aligned with
        ``input_ids``, shifted inside (position t predicts labels[t + 1]),
        ``-100`` ignored. ``reduction="mean"`` divides by the number of
        non-ignored targets in this batch; ``"sum"`` lets a trainer divide by a
        global count (``num_tokens`` summed over micro-batches and ranks).
        ``attention_mask`` (B, past + T): 1 for tokens, 0 for padding; or a
        boolean (B, 1, T, past + T) mask, True where a query may attend (e.g.
        :func:`document_mask` for packed conversations).
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"Olmo2ForCausalLM.forward: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        if labels is None:
            return Olmo2Output(logits=self.lm_head(hidden), past_key_values=cache)

        _check_labels(labels, input_ids, self.config.vocab_size)
        batch, seq = input_ids.shape
        # Shift by padding the labels, not by slicing the hidden states: no copy
        # of (B, T-1, H), and the last position's target is simply ignored.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(torch.int64)
        flat_targets = targets.reshape(-1)
        head_weight = self.lm_head.weight
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # Custom ops are not autocast: run the LM head in the autocast dtype,
            # as nn.Linear would (the fp32 residual stream would otherwise make
            # the head's matmuls fp32). Gradients flow back through the casts.
            amp_dtype = torch.get_autocast_dtype(device_type)
            hidden, head_weight = hidden.to(amp_dtype), head_weight.to(amp_dtype)
        ce, z = olmo2_kernels.linear_cross_entropy(
            hidden.reshape(batch * seq, -1),
            head_weight,
            flat_targets,
            ignore_index=IGNORE_INDEX,
            z_loss_coef=z_loss_coef,
            reduction=reduction,
        )
        if reduction == "none":
            ce, z = ce.view(batch, seq), z.view(batch, seq)
        return Olmo2Output(
            loss=ce + z,
            ce_loss=ce,
            z_loss=z,
            num_tokens=(flat_targets != IGNORE_INDEX).sum(),
            past_key_values=cache,
        )


# --------------------------------------------------------------------------- input checks

def _check_input_ids(input_ids: object, vocab_size: int) -> None:
    op = "Olmo2ForCausalLM.forward"
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{op}: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"{op}: input_ids must have shape (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}")
    if checks.range_checks_enabled(input_ids) and input_ids.numel():
        bad = (input_ids < 0) | (input_ids >= vocab_size)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{op}: input_ids must be in [0, vocab_size={vocab_size}); input_ids[{b}, {t}] = {int(input_ids[b, t])}"
            )


def _check_labels(labels: object, input_ids: Tensor, vocab_size: int) -> None:
    op = "Olmo2ForCausalLM.forward"
    if not isinstance(labels, Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"{op}: labels must have the shape of input_ids {tuple(input_ids.shape)} (they are shifted inside), "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != input_ids.device:
        raise ValueError(f"{op}: labels is on {labels.device} but input_ids is on {input_ids.device}")
    if checks.range_checks_enabled(labels) and labels.numel():
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{op}: labels must be in [0, vocab_size={vocab_size}) or {IGNORE_INDEX}; "
                f"labels[{b}, {t}] = {int(labels[b, t])}"
            )


def document_mask(document_ids: Tensor) -> Tensor:
    """The (B, 1, T, T) boolean mask of packed sequences: causal, and each token
    sees only the tokens of its own document (equal ``document_ids`` (B, T)).
    Pass it as ``attention_mask`` with ``position_ids`` restarting at 0 per
    document; then each document gets exactly the outputs it gets alone."""
    t = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return (same & _causal_mask(t, t, document_ids.device))[:, None]


def _attention_mask(
    attention_mask: Tensor | None, batch: int, seq: int, past: int, device: torch.device
) -> tuple[Tensor | None, bool]:
    """The boolean (B, 1, T, S) mask (True: attend) and whether attention is causal.

    Without padding there is no mask: the backends apply causality themselves
    (a single query after a cache needs none). With padding, each query also
    always sees its own key, so that rows made only of padding stay finite
    (their outputs are never used); real tokens always see themselves anyway.
    """
    total = past + seq
    if attention_mask is None:
        return None, seq > 1
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"Olmo2ForCausalLM.forward: attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 4:  # a full boolean mask, e.g. document_mask() for packed sequences
        if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (batch, 1, seq, total):
            raise ValueError(
                f"Olmo2ForCausalLM.forward: a 4-D attention_mask must be boolean of shape (batch, 1, seq, past + seq) "
                f"= ({batch}, 1, {seq}, {total}), got {attention_mask.dtype} {tuple(attention_mask.shape)}"
            )
        return attention_mask.to(device), True
    if tuple(attention_mask.shape) != (batch, total):
        raise ValueError(
            f"Olmo2ForCausalLM.forward: attention_mask must have shape (batch, past + seq) = ({batch}, {total}), "
            f"got {tuple(attention_mask.shape)}"
        )
    keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
    causal = _causal_mask(seq, total, device)  # (T, S)
    own = torch.arange(total, device=device)[None, :] == torch.arange(past, total, device=device)[:, None]
    return (keys & causal) | own, True
