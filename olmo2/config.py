"""The OLMo 2 model configuration: a typed dataclass, named presets, Hugging Face
``config.json`` conversion, and the parameter and FLOP counts used for MFU.

Field names follow ``transformers.Olmo2Config`` so a ``config.json`` maps onto
this class field by field. Only the architecture OLMo 2 uses is accepted: no
biases, SiLU gating, untied embeddings, default (unscaled) RoPE; a
``config.json`` asking for anything else is refused by name rather than loaded
into a model that would compute something different.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

ATTN_BACKENDS = ("sdpa", "flash_attn", "eager")

# The published OLMo 2 sizes (see OLMO2.md) and two small ones. Every preset
# leaves the remaining fields at the dataclass defaults (vocab 100352, theta
# 500000, eps 1e-6, context 4096, dolma2 eos/pad ids) unless it says otherwise.
_DOLMA2 = dict(vocab_size=100352, eos_token_id=100257, pad_token_id=100277, bos_token_id=None)
PRESETS: dict[str, dict[str, Any]] = {
    "olmo2-1b": dict(_DOLMA2, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=16, intermediate_size=8192),
    "olmo2-7b": dict(_DOLMA2, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, intermediate_size=11008),
    "olmo2-13b": dict(_DOLMA2, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, intermediate_size=13824),
    "olmo2-32b": dict(_DOLMA2, hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                      num_key_value_heads=8, intermediate_size=27648),
    # A CPU demo run: about 3.4M parameters, a 512-entry vocabulary (room for
    # olmo2.byte_tokenizer: bytes 0..255, eos 256, pad 257).
    "olmo2-tiny": dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=688, max_position_embeddings=512,
                       eos_token_id=256, pad_token_id=257),
    # Unit tests: a few hundred thousand parameters, GQA (2 kv heads for 4 heads)
    # so that path is exercised everywhere the preset is used.
    "olmo2-test": dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=160, max_position_embeddings=128,
                       eos_token_id=256, pad_token_id=257),
}

def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Olmo2Config:
    """Architecture of an OLMo 2 model (defaults: the 7B)."""

    # Embedding rows (the tokenizer's ids, padded to a multiple of 128).
    vocab_size: int = 100352
    # Width of the residual stream.
    hidden_size: int = 4096
    # Width of the SwiGLU MLP.
    intermediate_size: int = 11008
    # Decoder blocks.
    num_hidden_layers: int = 32
    # Query heads.
    num_attention_heads: int = 32
    # Key/value heads; None: as many as query heads (no GQA).
    num_key_value_heads: int | None = None
    # Width of a head; None: hidden_size // num_attention_heads.
    head_dim: int | None = None
    # Longest sequence the checkpoint declares; <= 0 (OLMo-core writes -1): no limit.
    # RoPE is computed per position on demand, so no table is sized from it.
    max_position_embeddings: int = 4096
    # RoPE base.
    rope_theta: float = 500_000.0
    # Epsilon of every RMSNorm.
    rms_norm_eps: float = 1e-6
    # Std of the truncated-normal initialization.
    initializer_range: float = 0.02
    # Padding id (None: none).
    pad_token_id: int | None = 100277
    # End-of-sequence id (None: none).
    eos_token_id: int | None = 100257
    # Beginning-of-sequence id (OLMo 2: none).
    bos_token_id: int | None = None
    # "sdpa" (torch's scaled_dot_product_attention), "flash_attn" (the
    # flash-attn package) or "eager" (the fp32 matmul + softmax spec).
    attn_backend: str = "sdpa"
    # Always False for OLMo 2; present so a config.json saying True is refused.
    tie_word_embeddings: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"Olmo2Config: {name} must be a positive int, got {value!r}")
        if not _is_int(self.max_position_embeddings):
            raise ValueError(
                f"Olmo2Config: max_position_embeddings must be an int (<= 0: no limit), "
                f"got {self.max_position_embeddings!r}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not _is_int(self.num_key_value_heads) or self.num_key_value_heads <= 0:
            raise ValueError(f"Olmo2Config: num_key_value_heads must be a positive int, got {self.num_key_value_heads!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Olmo2Config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"Olmo2Config: hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not _is_int(self.head_dim) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"Olmo2Config: head_dim must be a positive even int (RoPE pairs halves), got {self.head_dim!r}")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Olmo2Config: {name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value < self.vocab_size):
                raise ValueError(
                    f"Olmo2Config: {name} must be None or an int in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"Olmo2Config: attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if self.tie_word_embeddings:
            raise ValueError("Olmo2Config: tie_word_embeddings must be False (OLMo 2 has an untied LM head)")

    @property
    def max_positions(self) -> int | None:
        """The longest sequence this config declares, or None when it declares no limit
        (``max_position_embeddings <= 0``, as OLMo-core's ``save_hf_model`` writes)."""
        return self.max_position_embeddings if self.max_position_embeddings > 0 else None

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Olmo2Config":
        """A named preset (see :data:`PRESETS`), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"Olmo2Config.preset: name must be one of {sorted(PRESETS)}, got {name!r}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Olmo2Config.preset: unknown field(s) {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Olmo2Config":
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Olmo2Config.from_dict: unknown field(s) {sorted(unknown)}")
        return cls(**values)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | os.PathLike, **overrides: Any) -> "Olmo2Config":
        """Read a Hugging Face ``config.json`` (a dict, the file, or its folder).

        ``rms_norm_eps`` is taken from the file (``transformers``' default is
        1e-5 where the official checkpoints say 1e-6); RoPE theta from
        ``rope_parameters`` (transformers 5) or ``rope_theta`` (earlier).
        """
        if isinstance(source, dict):
            hf = dict(source)
            where = "config"
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Olmo2Config.from_hf: no config.json at {path}")
            try:
                with open(path, encoding="utf-8") as f:
                    hf = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"Olmo2Config.from_hf: config.json is not valid JSON ({exc}) ({path})") from None
            if not isinstance(hf, dict):
                raise ValueError(f"Olmo2Config.from_hf: config.json holds a {type(hf).__name__}, not an object ({path})")
            where = path
        model_type = hf.get("model_type", "olmo2")
        if model_type != "olmo2":
            raise ValueError(f"Olmo2Config.from_hf: {where} has model_type {model_type!r}, expected 'olmo2'")
        if hf.get("attention_bias", False):
            raise ValueError(f"Olmo2Config.from_hf: {where} sets attention_bias=true; OLMo 2 has no biases")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Olmo2Config.from_hf: {where} sets hidden_act={hf['hidden_act']!r}; OLMo 2 uses 'silu'")
        theta = _rope_theta(hf, where)

        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {"rope_theta": theta}
        # The transformers default (1e-5), not ours, when the file omits it.
        values["rms_norm_eps"] = hf.get("rms_norm_eps", 1e-5)
        # Keys that are not fields (bookkeeping, generation defaults, the
        # already-checked attention_bias/hidden_act/rope keys) change nothing
        # this model computes.
        for key, value in hf.items():
            if key in names and key not in values:
                values[key] = value
        eos = values.get("eos_token_id")
        if isinstance(eos, list):
            values["eos_token_id"] = eos[0] if eos else None
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            # transformers writes ids outside the vocabulary for some small configs; drop them.
            tok = values.get(key)
            vocab = values.get("vocab_size", cls.vocab_size)
            if _is_int(tok) and not 0 <= tok < vocab:
                values[key] = None
        values.setdefault("pad_token_id", None)
        values.setdefault("eos_token_id", None)
        values.setdefault("bos_token_id", None)
        values.setdefault("max_position_embeddings", 2048)  # the transformers default
        values.update(overrides)
        return cls(**values)

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """The ``config.json`` dict that ``transformers.Olmo2ForCausalLM`` loads.

        RoPE theta is written both as ``rope_parameters`` (transformers 5) and
        ``rope_theta`` (earlier versions).
        """
        out: dict[str, Any] = {
            "architectures": ["Olmo2ForCausalLM"],
            "model_type": "olmo2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "use_cache": True,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
        }
        if dtype is not None:
            out["dtype"] = dtype
            out["torch_dtype"] = dtype
        return out


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"Olmo2Config.from_hf: {where} has rope_parameters.rope_type={rope_type!r}; only 'default' is supported"
            )
        if "rope_theta" in params:
            return params["rope_theta"]
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"Olmo2Config.from_hf: {where} sets rope_scaling={scaling!r}; only unscaled RoPE is supported")
    # The transformers default when the file names no theta.
    return hf.get("rope_theta", 10_000.0)


# ---------------------------------------------------------------------- counts
def num_parameters(config: Olmo2Config, include_embedding: bool = True) -> int:
    """Parameters of :class:`olmo2.Olmo2ForCausalLM` for ``config``.

    ``include_embedding=False`` leaves out the input embedding table (a lookup,
    no FLOPs) but keeps the LM head, which is a matmul.
    """
    d, L = config.hidden_size, config.num_hidden_layers
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    attn = d * q_width + 2 * d * kv_width + q_width * d + q_width + kv_width  # projections + q/k norms
    mlp = 3 * d * config.intermediate_size
    block = attn + mlp + 2 * d  # + post-attention and post-feedforward norms
    embedding = config.vocab_size * d
    total = L * block + d + config.vocab_size * d  # + final norm + LM head
    return total + embedding if include_embedding else total


# How flops_per_token counts, for logs and JSON that report MFU.
FLOPS_CONVENTION = "6N + causal attention 12*L*H*D*(T+1)/2 (OLMo-core 3.0)"


def flops_per_token(config: Olmo2Config, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

    ``6 * N`` for the N non-embedding parameters (LM head included, the
    embedding lookup not) plus the attention scores and their weighted sum
    over the (query, key) pairs a causal mask keeps, ``T (T + 1) / 2`` per
    sequence: ``12 * n_heads * head_dim * (T (T + 1) // 2) // T`` per layer
    and token, as OLMo-core 3.0 counts it (``_causal_attention_positions``),
    so MFU is comparable with its logs. PaLM, nanoGPT and OLMo-core before 3.0
    counted the full T x T matrix (about 7% more at 7B, T = 4096). Norms,
    RoPE and the softmax are not counted (the dense term includes the norm
    weights, 2 * hidden_size per block, which OLMo-core leaves out: < 0.001%).
    See :data:`FLOPS_CONVENTION`.
    """
    if not _is_int(seq_len) or seq_len <= 0:
        raise ValueError(f"flops_per_token: seq_len must be a positive int, got {seq_len!r}")
    dense = 6 * num_parameters(config, include_embedding=False)
    causal_pairs = seq_len * (seq_len + 1) // 2
    per_layer = 12 * config.num_attention_heads * config.head_dim * causal_pairs // seq_len
    return dense + config.num_hidden_layers * per_layer
