"""What each benchmarked op computes, on which shapes, and the least work it must do.

Owns, per op: the shapes to run (from the OLMo 2 model presets of
:data:`olmo2.config.PRESETS`, never from scattered literals), how to build its
inputs and upstream gradients, how to call an implementation that has the
spec's signature, and the byte and FLOP counts that turn a time into a
fraction of the device's speed of light.

Byte counts are the minimum traffic to device memory: every input read once,
every output written once, nothing else (no saved statistics, no
intermediates). For forward+backward the count is the sum of the two passes,
each at its own minimum: the backward reads the upstream gradients and the
forward inputs and writes one gradient per differentiable input. The two
cross-entropy ops are the exception: with ``reduction="mean"`` their upstream
gradient is a scalar, so forward and backward can be one pass over the logits
(read once, gradient written once), and that is their minimum.

FLOPs are counted only for the matmul-bound ``linear_cross_entropy``:
``2*N*H*V`` forward; ``6*N*H*V`` forward+backward (the logits product and
the two gradient products), the minimum any implementation does. A chunked
implementation that recomputes the logits in its backward does ``8*N*H*V``
and gets no credit for the extra product.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from olmo2.config import Olmo2Config

EPS = 1e-6  # OLMo 2's RMSNorm eps (official checkpoints)
Z_LOSS = 1e-5  # OLMo 2's z-loss coefficient
IGNORE_INDEX = -100
IGNORED_FRACTION = 0.05  # share of label positions set to IGNORE_INDEX, so every run covers that path
LABEL_BYTES = 8  # labels are int64
LOSS_BYTES = 4  # each fp32 scalar loss (ce and z) and each scalar upstream gradient

# The float64 reference must fit on the device and finish in seconds: when a
# case is larger, its numerics are measured on its first rows only (recorded in
# the result as ``numerics.dims``). Limits: elements of the largest float64
# tensor, and float64 FLOPs of the reference's forward+backward matmuls.
NUMERICS_MAX_ELEMENTS = 2**28
NUMERICS_MAX_FLOPS = 2**44


@dataclass(frozen=True)
class ModelLayout:
    """The sizes of an OLMo 2 model that set the kernels' shapes."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    vocab: int


GPU_PRESETS = ("olmo2-1b", "olmo2-7b")
CPU_PRESET = "olmo2-tiny"  # the same structure, small enough for a CPU run in seconds


def canonical_preset(name: str) -> str:
    """``1b`` -> ``olmo2-1b``; full names pass through."""
    return name if name.startswith("olmo2-") else f"olmo2-{name}"


def layout(preset: str) -> ModelLayout:
    """The layout of a model preset of :data:`olmo2.config.PRESETS`, the one
    registry of OLMo 2 sizes."""
    cfg = Olmo2Config.preset(canonical_preset(preset))
    return ModelLayout(
        name=canonical_preset(preset),
        d_model=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        mlp_hidden=cfg.intermediate_size,
        vocab=cfg.vocab_size,
    )


@dataclass(frozen=True)
class Case:
    """One shape of one op."""

    op: str
    preset: str
    dims: tuple  # ((name, value), ...) in the op's order

    @property
    def d(self) -> dict:
        return dict(self.dims)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims)

    @property
    def key(self) -> str:
        return f"{self.op}[{self.preset}:{'x'.join(str(v) for _, v in self.dims)}]"


def make_case(op: str, preset: str, **dims: int) -> Case:
    return Case(op, preset, tuple(dims.items()))


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, dtype, device, g, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    t = torch.randn(shape, dtype=torch.float32, device=device, generator=g)
    if scale != 1.0:
        t.mul_(scale)
    if shift != 0.0:
        t.add_(shift)
    return t.to(dtype)


def _labels(n: int, vocab: int, device, g) -> Tensor:
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)
    ignored = torch.rand(n, device=device, generator=g) < IGNORED_FRACTION
    return labels.masked_fill(ignored, IGNORE_INDEX)


class OpSpec:
    """Base: one op's shapes, inputs, call convention and work counts.

    ``call(fn, inputs)`` runs ``fn`` (any function with the spec's signature:
    the public op, the reference, a compiled reference) and returns the named
    outputs. ``grad_inputs`` are the inputs that receive gradients;
    ``grad_outputs`` the outputs that the backward starts from, with the
    upstream gradients of :meth:`make_upstream`.
    """

    name: str = ""
    metric: str = "bandwidth"  # or "flops"
    grad_inputs: tuple = ()
    grad_outputs: tuple = ()
    rows_dim: str = ""  # the token/row dim that numerics may shorten

    def cases(self, device_type: str, presets: tuple, quick: bool) -> list[Case]:
        raise NotImplementedError

    def make_inputs(self, dims: dict, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
        raise NotImplementedError

    def make_upstream(self, dims: dict, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
        raise NotImplementedError

    def call(self, fn: Callable, inputs: dict) -> dict:
        raise NotImplementedError

    def bytes(self, dims: dict, dtype: torch.dtype, backward: bool) -> int:
        raise NotImplementedError

    def flops(self, dims: dict, backward: bool) -> int | None:
        return None

    def size(self, dims: dict) -> int:
        """The x-axis of plots: elements of the main input."""
        return math.prod(dims.values())

    def with_tokens(self, dims: dict, tokens: int) -> dict:
        """``dims`` with ``tokens`` rows (tokens) in place of the preset's count."""
        return {**dims, self.rows_dim: tokens} if self.rows_dim else dict(dims)

    def numerics_dims(self, dims: dict) -> dict:
        """``dims`` with the row dim shortened until the float64 reference fits."""
        if not self.rows_dim:
            return dict(dims)
        rows = dims[self.rows_dim]
        cap = NUMERICS_MAX_ELEMENTS // max(1, self.size(dims) // rows)
        return {**dims, self.rows_dim: max(1, min(rows, cap))}


class RMSNormSpec(OpSpec):
    name = "rms_norm"
    grad_inputs = ("x", "weight")
    grad_outputs = ("y",)
    rows_dim = "rows"

    def cases(self, device_type, presets, quick):
        if device_type == "cuda":
            return [make_case(self.name, p, rows=32768, width=layout(p).d_model) for p in presets]
        return [make_case(self.name, CPU_PRESET, rows=256 if quick else 4096, width=layout(CPU_PRESET).d_model)]

    def make_inputs(self, dims, dtype, device, seed):
        g = _gen(device, seed)
        return {
            "x": _randn((dims["rows"], dims["width"]), dtype, device, g, scale=2.0, shift=0.25),
            "weight": _randn((dims["width"],), dtype, device, g, scale=0.1, shift=1.0),
        }

    def make_upstream(self, dims, dtype, device, seed):
        return {"y": _randn((dims["rows"], dims["width"]), dtype, device, _gen(device, seed + 7919))}

    def call(self, fn, inputs):
        return {"y": fn(inputs["x"], inputs["weight"], EPS)}

    def bytes(self, dims, dtype, backward):
        s, r, w = _elem(dtype), dims["rows"], dims["width"]
        fwd = (r * w + w + r * w) * s  # read x, weight; write y
        if not backward:
            return fwd
        bwd = (r * w + r * w + w + r * w + w) * s  # read dy, x, weight; write dx, dweight
        return fwd + bwd


class QKNormRopeSpec(OpSpec):
    name = "qk_norm_rope"
    grad_inputs = ("q", "k", "q_weight", "k_weight")
    grad_outputs = ("q_out", "k_out")
    rows_dim = "batch"

    def cases(self, device_type, presets, quick):
        if device_type == "cuda":
            batch, seq, names = 8, 4096, presets
        else:
            (batch, seq), names = ((1, 256) if quick else (4, 512)), (CPU_PRESET,)
        return [
            make_case(self.name, p, batch=batch, seq=seq, q_heads=layout(p).n_heads,
                      kv_heads=layout(p).n_kv_heads, head_dim=layout(p).head_dim)
            for p in names
        ]

    def size(self, dims):
        return dims["batch"] * dims["seq"] * (dims["q_heads"] + dims["kv_heads"]) * dims["head_dim"]

    def with_tokens(self, dims, tokens):
        # whole sequences of the preset's length; fewer tokens make one shorter sequence
        seq = min(dims["seq"], tokens)
        return {**dims, "batch": max(1, tokens // seq), "seq": seq}

    def make_inputs(self, dims, dtype, device, seed):
        from olmo2_kernels import rope_cos_sin

        g = _gen(device, seed)
        b, t, d = dims["batch"], dims["seq"], dims["head_dim"]
        wq, wk = dims["q_heads"] * d, dims["kv_heads"] * d
        cos, sin = rope_cos_sin(t, d, device=device)  # fp32 tables, as the model passes them
        return {
            "q": _randn((b, t, wq), dtype, device, g, scale=2.0),
            "k": _randn((b, t, wk), dtype, device, g, scale=2.0),
            "q_weight": _randn((wq,), dtype, device, g, scale=0.1, shift=1.0),
            "k_weight": _randn((wk,), dtype, device, g, scale=0.1, shift=1.0),
            "cos": cos,
            "sin": sin,
        }

    def make_upstream(self, dims, dtype, device, seed):
        g = _gen(device, seed + 7919)
        b, t, d = dims["batch"], dims["seq"], dims["head_dim"]
        return {
            "q_out": _randn((b, t, dims["q_heads"] * d), dtype, device, g),
            "k_out": _randn((b, t, dims["kv_heads"] * d), dtype, device, g),
        }

    def call(self, fn, inputs):
        head_dim = inputs["cos"].shape[-1]
        q, k = fn(inputs["q"], inputs["k"], inputs["q_weight"], inputs["k_weight"],
                  inputs["cos"], inputs["sin"], head_dim, EPS)
        return {"q_out": q, "k_out": k}

    def bytes(self, dims, dtype, backward):
        s = _elem(dtype)
        bt, d = dims["batch"] * dims["seq"], dims["head_dim"]
        eq, ek = bt * dims["q_heads"] * d, bt * dims["kv_heads"] * d
        wq, wk = dims["q_heads"] * d, dims["kv_heads"] * d
        tables = 2 * dims["seq"] * d * 4  # cos and sin, fp32
        fwd = (eq + ek + wq + wk + eq + ek) * s + tables  # read q, k, weights, tables; write q_out, k_out
        if not backward:
            return fwd
        # read dq_out, dk_out, q, k, weights, tables; write dq, dk, dq_weight, dk_weight
        bwd = (eq + ek + eq + ek + wq + wk + eq + ek + wq + wk) * s + tables
        return fwd + bwd


class SwiGLUSpec(OpSpec):
    name = "swiglu"
    grad_inputs = ("gate", "up")
    grad_outputs = ("y",)
    rows_dim = "rows"

    def cases(self, device_type, presets, quick):
        if device_type == "cuda":
            # The 1B MLP only: the op is elementwise, so the 7B's wider MLP
            # changes nothing but the size.
            p = "olmo2-1b" if "olmo2-1b" in presets else presets[0]
            return [make_case(self.name, p, rows=32768, width=layout(p).mlp_hidden)]
        return [make_case(self.name, CPU_PRESET, rows=256 if quick else 4096, width=layout(CPU_PRESET).mlp_hidden)]

    def make_inputs(self, dims, dtype, device, seed):
        g = _gen(device, seed)
        shape = (dims["rows"], dims["width"])
        return {"gate": _randn(shape, dtype, device, g, scale=2.0), "up": _randn(shape, dtype, device, g)}

    def make_upstream(self, dims, dtype, device, seed):
        return {"y": _randn((dims["rows"], dims["width"]), dtype, device, _gen(device, seed + 7919))}

    def call(self, fn, inputs):
        return {"y": fn(inputs["gate"], inputs["up"])}

    def bytes(self, dims, dtype, backward):
        e = dims["rows"] * dims["width"] * _elem(dtype)
        fwd = 3 * e  # read gate, up; write y
        return fwd + (5 * e if backward else 0)  # read dy, gate, up; write dgate, dup


def _loss_outputs(result) -> dict:
    ce, z = result
    return {"ce": ce, "z": z, "loss": ce + z}


class CrossEntropySpec(OpSpec):
    name = "cross_entropy"
    grad_inputs = ("logits",)
    grad_outputs = ("loss",)  # ce + z: the training loss (Liger returns only this sum)
    rows_dim = "tokens"

    def cases(self, device_type, presets, quick):
        # Every OLMo 2 size has the same vocabulary: one preset's shapes cover them.
        if device_type == "cuda":
            p = presets[0]
            return [make_case(self.name, p, tokens=n, vocab=layout(p).vocab) for n in (8192, 32768, 65536)]
        vocab = layout(CPU_PRESET).vocab
        return [make_case(self.name, CPU_PRESET, tokens=n, vocab=vocab) for n in ((512,) if quick else (1024, 8192))]

    def make_inputs(self, dims, dtype, device, seed):
        g = _gen(device, seed)
        n, v = dims["tokens"], dims["vocab"]
        return {"logits": _randn((n, v), dtype, device, g, scale=2.0), "labels": _labels(n, v, device, g)}

    def make_upstream(self, dims, dtype, device, seed):
        g = _gen(device, seed + 7919)
        # A scalar away from 1, so a gradient not scaled by the upstream one shows as an error.
        value = 0.5 + torch.rand((), device=device, generator=g)
        return {"loss": value.to(dtype).to(torch.float32)}

    def call(self, fn, inputs):
        return _loss_outputs(fn(inputs["logits"], inputs["labels"], IGNORE_INDEX, Z_LOSS, "mean"))

    def size(self, dims):
        return dims["tokens"] * dims["vocab"]

    def numerics_dims(self, dims):
        # The float64 logits (tokens x vocab) set the limit.
        return {**dims, "tokens": max(1, min(dims["tokens"], NUMERICS_MAX_ELEMENTS // dims["vocab"]))}

    def bytes(self, dims, dtype, backward):
        n, v, s = dims["tokens"], dims["vocab"], _elem(dtype)
        fwd = n * v * s + n * LABEL_BYTES + 2 * LOSS_BYTES  # read logits, labels; write ce, z
        if not backward:
            return fwd
        # One pass: also read the two scalar upstream gradients and write dlogits.
        return fwd + 2 * LOSS_BYTES + n * v * s


class LinearCrossEntropySpec(OpSpec):
    name = "linear_cross_entropy"
    metric = "flops"
    grad_inputs = ("hidden", "weight")
    grad_outputs = ("loss",)
    rows_dim = "tokens"

    def cases(self, device_type, presets, quick):
        if device_type == "cuda":
            return [
                make_case(self.name, p, tokens=n, hidden=layout(p).d_model, vocab=layout(p).vocab)
                for p in presets for n in (8192, 32768, 65536)
            ]
        lay = layout(CPU_PRESET)
        return [make_case(self.name, CPU_PRESET, tokens=n, hidden=lay.d_model, vocab=lay.vocab)
                for n in ((512,) if quick else (1024, 4096))]

    def make_inputs(self, dims, dtype, device, seed):
        g = _gen(device, seed)
        n, h, v = dims["tokens"], dims["hidden"], dims["vocab"]
        return {
            "hidden": _randn((n, h), dtype, device, g),  # the final norm's output: unit RMS
            "weight": _randn((v, h), dtype, device, g, scale=0.02),  # OLMo 2's init std
            "labels": _labels(n, v, device, g),
        }

    make_upstream = CrossEntropySpec.make_upstream

    def call(self, fn, inputs):
        return _loss_outputs(fn(inputs["hidden"], inputs["weight"], inputs["labels"], IGNORE_INDEX, Z_LOSS, "mean"))

    def size(self, dims):
        return dims["tokens"] * dims["hidden"] * dims["vocab"]

    def bytes(self, dims, dtype, backward):
        n, h, v, s = dims["tokens"], dims["hidden"], dims["vocab"], _elem(dtype)
        fwd = (n * h + v * h) * s + n * LABEL_BYTES + 2 * LOSS_BYTES
        if not backward:
            return fwd
        return fwd + 2 * LOSS_BYTES + (n * h + v * h) * s  # read upstream; write dhidden, dweight

    def flops(self, dims, backward):
        nhv = dims["tokens"] * dims["hidden"] * dims["vocab"]
        return 6 * nhv if backward else 2 * nhv

    def numerics_dims(self, dims):
        # The float64 logits (tokens x vocab) and the float64 matmuls set the limit.
        n, h, v = dims["tokens"], dims["hidden"], dims["vocab"]
        cap = min(NUMERICS_MAX_ELEMENTS // v, NUMERICS_MAX_FLOPS // (6 * h * v))
        return {**dims, "tokens": max(1, min(n, cap))}


SPECS: dict[str, OpSpec] = {
    s.name: s
    for s in (RMSNormSpec(), QKNormRopeSpec(), SwiGLUSpec(), CrossEntropySpec(), LinearCrossEntropySpec())
}
OPS = tuple(SPECS)


def plan(device_type: str, ops=OPS, presets=GPU_PRESETS, quick: bool = False, tokens: int | None = None) -> list[Case]:
    """The cases to run, in order: every op of ``ops`` on its shapes.

    On GPU the shapes are the training shapes of the model ``presets``; on CPU
    the small :data:`CPU_PRESET` layout with few tokens (fewer with ``quick``).
    ``tokens`` replaces every case's token (row) count with one number, so a
    run has one shape per op and preset (a time-bounded run).
    """
    if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    presets = tuple(canonical_preset(p) for p in presets)
    for p in presets:
        layout(p)  # an unknown preset fails here, by name
    cases: list[Case] = []
    for op in ops:
        if op not in SPECS:
            raise ValueError(f"ops must be among {OPS}, got {op!r}")
        op_cases = SPECS[op].cases(device_type, tuple(presets), quick)
        if tokens is not None:
            op_cases = [Case(c.op, c.preset, tuple(SPECS[op].with_tokens(c.d, tokens).items())) for c in op_cases]
            op_cases = list(dict.fromkeys(op_cases))  # several token counts became one
        cases.extend(op_cases)
    return cases


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, Tensor))
