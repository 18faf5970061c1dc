#!/usr/bin/env python
"""Ahead-of-time compile check of every Triton kernel at the configurations
OLMo 2 runs on a GPU, on a machine without one.

For OLMo 2 1B, 7B, 13B and 32B (``olmo2.config`` presets) at 8192 and 16384
tokens per batch, every dtype case, and each GPU (H100 SXM and H200: sm_90 with
132 SMs; A100: sm_80 with 108 SMs), the bodies of the ``torch.library`` ops run
on ``meta`` tensors inside ``_triton.assume_sm_count(n)``. They call the real
launchers, which size and launch the kernels as on the GPU, but every
``@triton.jit`` kernel of the op modules is swapped for a recorder first.
(The op bodies, not the launchers alone: the launchers then see the row views
and dtypes that training gives them. linear_cross_entropy is told it runs on a
GPU, where bf16 inputs get fp32 chunk logits.) RMSNorm also runs at rows of
16384 and 32768, wider than OLMo 2's, so that its wide-row paths compile too.
Each recorded launch is then

1. bound with Triton's own binder, so the specialization is the one a real
   launch gets: pointer dtypes, constexprs, ints equal to 1 (turned into
   constexprs) and divisibility by 16 of ints and pointers. Meta tensors have
   no address; a tensor argument is handed to the binder as an address a real
   allocation would have (the caching allocator's blocks are 512-byte aligned,
   so a view is 16-byte aligned exactly when its storage offset in bytes is);
2. compiled for sm_90 / sm_80 with the ptxas bundled with Triton (``triton.compile``,
   no driver needed), once per distinct bound configuration;
3. checked: registers, stack and spill bytes (ptxas -v), shared memory
   (metadata) against the per-block limit, the register file, theoretical
   occupancy and the grid in waves of resident blocks.

It prints one table and exits non-zero on a compile error, any stack frame or
spill, shared memory over the per-block limit, a block needing more registers
than an SM has, or a launcher that fails on meta tensors.

    python scripts/aot_check.py                     # everything (about a minute)
    python scripts/aot_check.py --quick             # 1B, 8192 tokens, one dtype case per op
    python scripts/aot_check.py --models 7b,32b --archs 90 --json build/aot.json

Kernels are found generically (every ``JITFunction`` attribute of the op
modules), so a kernel added later is recorded when a launcher launches it. A
kernel that no scenario launches is listed after the table. A launcher or op
whose signature changed fails its scenario with the error, it is not skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import itertools
import io
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    import olmo2_kernels  # noqa: E402,F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import olmo2_kernels  # noqa: E402,F401

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature  # noqa: E402

from olmo2.config import Olmo2Config  # noqa: E402
from olmo2_kernels import _triton  # noqa: E402

# --------------------------------------------------------------------------- what is checked
OP_MODULES = ("rms_norm", "qk_norm_rope", "swiglu", "cross_entropy", "linear_cross_entropy")
MODELS = ("olmo2-1b", "olmo2-7b", "olmo2-13b", "olmo2-32b")
TOKENS = (8192, 16384)
# The dolma2 tokenizer's vocabulary before the presets pad it to a multiple of 128.
UNPADDED_VOCAB = 100278
# GPU -> (compute capability, SMs).
GPUS = {"H100": (90, 132), "H200": (90, 132), "A100": (80, 108)}
EPS = 1e-6
IGNORE_INDEX = -100
Z_LOSS_COEF = 1e-4

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (x, weight) of the norms: pure bf16, bf16 activations with fp32 weights
# (autocast over fp32 parameters), pure fp32.
NORM_CASES = (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32"))
ACT_CASES = ("bf16", "fp32")
# RMSNorm rows wider than any OLMo 2 model's, so that the wide-row paths (the
# largest register-resident tiles, the streaming kernels) are compiled too.
WIDE_RMS_NORM_ROWS = (16384, 32768)
LOGITS_CASES = ("fp32", "bf16")


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM resources of a compute capability (CUDA programming guide, table
    of technical specifications), as the occupancy calculator uses them."""

    smem_per_block: int  # opt-in maximum of dynamic shared memory per block
    smem_per_sm: int
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of this
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    # The runtime reserves 1 KiB of shared memory per resident block (sm_80+).
    reserved_smem_per_block: int = 1024


ARCHS = {90: ArchLimits(227 * 1024, 228 * 1024), 80: ArchLimits(163 * 1024, 164 * 1024)}
# Grid limits of every CUDA GPU: x up to 2^31 - 1, y and z up to 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)
# Where allocations are assumed to start (any multiple of 512 would do).
ALLOCATION_BASE = 1 << 21


class CheckError(RuntimeError):
    """The check itself cannot go on (the code it inspects changed shape)."""


# --------------------------------------------------------------------------- kernels and recording
@dataclass
class Kernel:
    name: str  # "<op module>.<function>"
    fn: JITFunction
    homes: list[tuple[Any, str]]  # (module, attribute) that refer to it


@dataclass
class Launch:
    kernel: str
    fn: JITFunction
    grid: Any
    args: tuple
    kwargs: dict


def op_modules() -> list[Any]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise CheckError(
            "TRITON_INTERPRET=1 is set; unset it (@triton.jit then gives interpreted functions, "
            "which have nothing to compile)"
        )
    return [importlib.import_module(f"olmo2_kernels.{name}") for name in OP_MODULES]


def discover_kernels(modules: list[Any]) -> dict[str, Kernel]:
    """Every ``@triton.jit`` function that the op modules hold, by name.

    Anything else that launches like a kernel (an autotuner, heuristics, the
    interpreter's functions) is refused: it cannot be recorded and bound the
    same way, and skipping it would hide a kernel.
    """
    kernels: dict[int, Kernel] = {}
    for module in modules:
        for attr, obj in vars(module).items():
            if isinstance(obj, JITFunction):
                home = obj.fn.__module__.rsplit(".", 1)[-1]
                kernel = kernels.setdefault(id(obj), Kernel(f"{home}.{obj.fn.__name__}", obj, []))
                kernel.homes.append((module, attr))
            elif isinstance(obj, KernelInterface) or type(obj).__name__ == "InterpretedFunction":
                raise CheckError(
                    f"{module.__name__}.{attr} is a {type(obj).__name__}, not a plain @triton.jit kernel; "
                    "scripts/aot_check.py records and binds plain kernels only: teach it this kind"
                )
    if not kernels:
        raise CheckError(f"no @triton.jit kernels found in {', '.join(m.__name__ for m in modules)}")
    return {k.name: k for k in kernels.values()}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel: Kernel, sink: list[Launch]) -> None:
        self._kernel = kernel
        self._sink = sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self._sink.append(Launch(self._kernel.name, self._kernel.fn, grid, args, kwargs))

        return launch

    def __getattr__(self, attr: str):
        raise CheckError(
            f"a launcher used {self._kernel.name}.{attr}; scripts/aot_check.py records only "
            "kernel[grid](*args, **kwargs) launches: teach it this use"
        )


@contextlib.contextmanager
def recording(kernels: dict[str, Kernel]) -> Iterator[list[Launch]]:
    """Swap every kernel for a recorder in all modules that hold it; restore on exit."""
    sink: list[Launch] = []
    swapped = []
    try:
        for kernel in kernels.values():
            recorder = _Recorder(kernel, sink)
            for module, attr in kernel.homes:
                swapped.append((module, attr, getattr(module, attr)))
                setattr(module, attr, recorder)
        yield sink
    finally:
        for module, attr, original in reversed(swapped):
            setattr(module, attr, original)


@contextlib.contextmanager
def patched(module: Any, attr: str, value: Any) -> Iterator[None]:
    if not hasattr(module, attr):
        raise CheckError(
            f"{module.__name__}.{attr} no longer exists; scripts/aot_check.py replaces it to run the "
            "launchers as on a GPU: update the check"
        )
    original = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, original)


def op_body(op: Any) -> Callable:
    """The Python body of a ``torch.library`` custom op: what runs for real
    tensors (called on meta tensors the op would run its fake instead)."""
    body = getattr(op, "_init_fn", None)
    if not callable(body):
        raise CheckError(
            f"{op!r} has no _init_fn (torch's custom-op internals changed?): scripts/aot_check.py needs "
            "the op's Python body to run its launchers on meta tensors"
        )
    return body


# --------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    op: str
    model: str  # preset name without "olmo2-", or "all" where the shapes do not depend on it
    tokens: int
    dtypes: str
    run: Callable[[], None] = field(compare=False, repr=False)


def _meta(shape, dtype: str | torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=DTYPES.get(dtype, dtype), device="meta")


def op_fn(module: str, name: str) -> Callable:
    """The Python body of ``olmo2_kernels.<module>.<name>``, a custom op."""
    return op_body(getattr(importlib.import_module(f"olmo2_kernels.{module}"), name))


def _cuda_fp32_out(device: torch.device, dtype: torch.dtype) -> bool:
    # On a GPU, torch.mm(..., out_dtype=torch.float32) exists for bf16/fp16
    # inputs (torch >= 2.8), so linear_cross_entropy keeps fp32 chunk logits.
    return dtype in (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Shapes:
    """The kernels' shapes for one model at one batch size (B sequences of T tokens)."""

    batch: int
    seq: int
    hidden: int
    intermediate: int
    head_dim: int
    q_width: int
    k_width: int

    @classmethod
    def of(cls, cfg: Olmo2Config, tokens: int) -> "Shapes":
        seq = min(cfg.max_position_embeddings, tokens)
        if tokens % seq:
            raise SystemExit(f"aot_check: tokens per batch ({tokens}) must be a multiple of the context ({seq})")
        return cls(tokens // seq, seq, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim,
                   cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim)


def run_rms_norm(s: Shapes, x_dt: str, w_dt: str) -> None:
    x, w = _meta((s.batch, s.seq, s.hidden), x_dt), _meta((s.hidden,), w_dt)
    _y, rstd = op_fn("rms_norm", "rms_norm_fwd")(x=x, weight=w, eps=EPS, backend="triton")
    op_fn("rms_norm", "rms_norm_bwd")(dy=torch.empty_like(x), x=x, weight=w, rstd=rstd, backend="triton")


def run_qk_norm_rope(s: Shapes, x_dt: str, w_dt: str) -> None:
    q, k = _meta((s.batch, s.seq, s.q_width), x_dt), _meta((s.batch, s.seq, s.k_width), x_dt)
    qw, kw = _meta((s.q_width,), w_dt), _meta((s.k_width,), w_dt)
    # The model's tables: fp32, (T, head_dim).
    cos, sin = _meta((s.seq, s.head_dim), "fp32"), _meta((s.seq, s.head_dim), "fp32")
    _qo, _ko, q_rstd, k_rstd = op_fn("qk_norm_rope", "qk_norm_rope_fwd")(
        q=q, k=k, q_weight=qw, k_weight=kw, cos=cos, sin=sin, head_dim=s.head_dim, eps=EPS, backend="triton",
    )
    op_fn("qk_norm_rope", "qk_norm_rope_bwd")(
        dq_out=torch.empty_like(q), dk_out=torch.empty_like(k), q=q, k=k, q_weight=qw, k_weight=kw,
        q_rstd=q_rstd, k_rstd=k_rstd, cos=cos, sin=sin, head_dim=s.head_dim, backend="triton",
    )


def run_swiglu(s: Shapes, x_dt: str) -> None:
    gate, up = _meta((s.batch, s.seq, s.intermediate), x_dt), _meta((s.batch, s.seq, s.intermediate), x_dt)
    op_fn("swiglu", "swiglu_fwd")(gate=gate, up=up, backend="triton")
    op_fn("swiglu", "swiglu_bwd")(dy=torch.empty_like(gate), gate=gate, up=up, backend="triton")


def run_cross_entropy(tokens: int, vocab: int, logits_dt: str) -> None:
    logits, labels = _meta((tokens, vocab), logits_dt), _meta((tokens,), torch.int64)
    ce, z, lse = op_fn("cross_entropy", "cross_entropy_fwd")(
        logits=logits, labels=labels, ignore_index=IGNORE_INDEX, z_loss_coef=Z_LOSS_COEF, backend="triton",
    )
    op_fn("cross_entropy", "cross_entropy_bwd")(
        logits=logits, labels=labels, lse=lse, grad_ce=torch.empty_like(ce), grad_z=torch.empty_like(z),
        ignore_index=IGNORE_INDEX, z_loss_coef=Z_LOSS_COEF, backend="triton",
    )


def run_linear_cross_entropy(tokens: int, hidden: int, vocab: int, dt: str, chunk: int) -> None:
    """The training path (gradients in the forward) and the recompute path
    (forward, then backward), with fp32 chunk logits for bf16 inputs as on a GPU."""
    lce = importlib.import_module("olmo2_kernels.linear_cross_entropy")
    h, w, labels = _meta((tokens, hidden), dt), _meta((vocab, hidden), dt), _meta((tokens,), torch.int64)
    common = dict(hidden=h, weight=w, labels=labels, ignore_index=IGNORE_INDEX, z_loss_coef=Z_LOSS_COEF,
                  chunk_size=chunk, backend="triton")
    with patched(lce, "_fp32_out_supported", _cuda_fp32_out):
        op_fn("linear_cross_entropy", "linear_cross_entropy_fused")(
            **common, reduction="mean", grad_hidden=True, grad_weight=True,
        )
        ce, z, lse = op_fn("linear_cross_entropy", "linear_cross_entropy_fwd")(**common)
        op_fn("linear_cross_entropy", "linear_cross_entropy_bwd")(
            **common, lse=lse, grad_ce=torch.empty_like(ce), grad_z=torch.empty_like(z),
        )


def build_scenarios(models: tuple[str, ...], tokens_list: tuple[int, ...], quick: bool) -> list[Scenario]:
    """Every (op, model, tokens, dtypes) to record; ``quick``: one dtype case per
    op and the padded vocabulary only."""
    norm_cases = NORM_CASES[:1] if quick else NORM_CASES
    act_cases = ACT_CASES[:1] if quick else ACT_CASES
    logits_cases = LOGITS_CASES[:1] if quick else LOGITS_CASES
    configs = {m: Olmo2Config.preset(m) for m in models}
    default_chunk_size = importlib.import_module("olmo2_kernels.linear_cross_entropy").default_chunk_size
    scenarios: list[Scenario] = []
    for tokens in tokens_list:
        # Plain cross-entropy: the shapes depend on the tokens and the vocabulary only.
        vocabs = sorted({c.vocab_size for c in configs.values()} | (set() if quick else {UNPADDED_VOCAB}))
        for vocab, logits_dt in itertools.product(vocabs, logits_cases):
            scenarios.append(Scenario("cross_entropy", "all", tokens, f"logits={logits_dt} V={vocab}",
                                      functools.partial(run_cross_entropy, tokens, vocab, logits_dt)))
        for model, cfg in configs.items():
            short = model.removeprefix("olmo2-")
            shapes = Shapes.of(cfg, tokens)
            for x_dt, w_dt in norm_cases:
                label = f"x={x_dt} w={w_dt}"
                scenarios.append(Scenario("rms_norm", short, tokens, label,
                                          functools.partial(run_rms_norm, shapes, x_dt, w_dt)))
                scenarios.append(Scenario("qk_norm_rope", short, tokens, label,
                                          functools.partial(run_qk_norm_rope, shapes, x_dt, w_dt)))
            for x_dt in act_cases:
                scenarios.append(Scenario("swiglu", short, tokens, f"x={x_dt}",
                                          functools.partial(run_swiglu, shapes, x_dt)))
            for vocab in sorted({cfg.vocab_size} | (set() if quick else {UNPADDED_VOCAB})):
                chunk = default_chunk_size(tokens, cfg.hidden_size, vocab)
                for h_dt in act_cases:
                    logits_dt = "fp32" if _cuda_fp32_out(torch.device("cuda"), DTYPES[h_dt]) else h_dt
                    label = f"h={h_dt} logits={logits_dt} V={vocab} chunk={chunk}"
                    scenarios.append(Scenario(
                        "linear_cross_entropy", short, tokens, label,
                        functools.partial(run_linear_cross_entropy, tokens, cfg.hidden_size, vocab, h_dt, chunk),
                    ))
        if not quick:
            base = Shapes.of(configs[models[0]], tokens)
            for width, (x_dt, w_dt) in itertools.product(WIDE_RMS_NORM_ROWS, norm_cases):
                shapes = dataclasses.replace(base, hidden=width)
                scenarios.append(Scenario("rms_norm", f"H={width}", tokens, f"x={x_dt} w={w_dt}",
                                          functools.partial(run_rms_norm, shapes, x_dt, w_dt)))
    return scenarios


@dataclass
class Recorded:
    scenario: Scenario
    gpu: str
    launch: Launch


def record_launches(
    scenarios: list[Scenario], gpus: list[str], kernels: dict[str, Kernel]
) -> tuple[list[Recorded], list[str]]:
    """Run every scenario for every GPU's SM count; returns the launches and the
    scenario failures (a launcher that raised on meta tensors)."""
    recorded: list[Recorded] = []
    failures: list[str] = []
    with recording(kernels) as sink:
        for gpu in gpus:
            with _triton.assume_sm_count(GPUS[gpu][1]):
                for scenario in scenarios:
                    sink.clear()
                    try:
                        scenario.run()
                    except CheckError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - reported as a failure of this scenario
                        where = traceback.extract_tb(exc.__traceback__)[-1]
                        hint = (" (a changed signature? the calls are in scripts/aot_check.py)"
                                if isinstance(exc, TypeError) else "")
                        failures.append(
                            f"{scenario.op} {scenario.model} N={scenario.tokens} {scenario.dtypes} ({gpu}): "
                            f"the launchers failed on meta tensors: {type(exc).__name__}: {exc} "
                            f"[{Path(where.filename).name}:{where.lineno}]{hint}"
                        )
                        continue
                    recorded.extend(Recorded(scenario, gpu, launch) for launch in sink)
    return recorded, failures


# --------------------------------------------------------------------------- binding
class DevicePointer:
    """What Triton's binder reads of a tensor argument: its dtype and address."""

    __slots__ = ("dtype", "_address")

    def __init__(self, dtype: torch.dtype, address: int) -> None:
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address


def as_device_argument(value: Any) -> Any:
    """A tensor as a real allocation would present it; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return DevicePointer(value.dtype, ALLOCATION_BASE + value.storage_offset() * value.element_size())
    if isinstance(value, tuple):
        return tuple(as_device_argument(v) for v in value)
    return value


@dataclass(frozen=True)
class BoundConfig:
    kernel: str
    arch: int
    signature: dict
    constexprs: dict  # parameter name -> value (the launcher's and the specialized ints == 1)
    attrs: dict  # parameter name -> Triton attributes (tt.divisibility)
    options: dict
    key: str


@dataclass(frozen=True)
class BoundLaunch:
    config: BoundConfig
    grid: tuple[int, ...]

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


_BACKENDS: dict[int, Any] = {}
_BINDERS: dict[tuple[int, int], Callable] = {}
# Config key -> what ASTSource takes (constexpr and attribute paths as the binder made them).
_SOURCES: dict[str, tuple] = {}


def backend_for(arch: int):
    if arch not in _BACKENDS:
        _BACKENDS[arch] = make_backend(GPUTarget("cuda", arch, 32))
    return _BACKENDS[arch]


def _run_options(fn: JITFunction, kwargs: dict) -> dict:
    """The options that ``JITFunction.run`` adds to the launch's keyword arguments."""
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton 3.9
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return kwargs


def _path_name(fn: JITFunction, path: tuple) -> str:
    name = fn.arg_names[path[0]]
    return name + "".join(f"[{i}]" for i in path[1:])


def bind(launch: Launch, arch: int) -> BoundLaunch:
    """Bind a recorded launch as ``JITFunction.run`` does for a GPU of ``arch``."""
    fn = launch.fn
    backend = backend_for(arch)
    binder = _BINDERS.get((id(fn), arch))
    if binder is None:
        binder = _BINDERS[(id(fn), arch)] = create_function_from_signature(fn.signature, fn.params, backend)
    args = tuple(as_device_argument(a) for a in launch.args)
    kwargs = {k: as_device_argument(v) for k, v in _run_options(fn, launch.kwargs).items()}
    try:
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    except (TypeError, KeyError) as exc:
        raise CheckError(f"{launch.kernel}: the launch does not bind to the kernel's parameters: {exc}") from exc
    grid = launch.grid(bound_args) if callable(launch.grid) else launch.grid
    grid = tuple(int(g) for g in grid)
    named_constexprs = {_path_name(fn, p): v for p, v in constexprs.items()}
    named_attrs = {_path_name(fn, p): a for p, a in attrs.items() if a}
    opts = dict(sorted(options.__dict__.items()))
    reprs = lambda d: sorted((k, repr(v)) for k, v in d.items())  # noqa: E731
    key = repr((launch.kernel, arch, sorted(signature.items()),
                reprs(named_constexprs), reprs(named_attrs), reprs(opts)))
    config = BoundConfig(launch.kernel, arch, signature, named_constexprs, named_attrs, opts, key)
    _SOURCES[key] = (fn, signature, constexprs, attrs)
    return BoundLaunch(config, grid)


# --------------------------------------------------------------------------- compiling
@dataclass
class Resources:
    registers: int | None = None
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    cmem: int = 0
    num_warps: int = 0
    compile_s: float = 0.0
    error: str | None = None


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "frame": re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"),
    "cmem": re.compile(r"(\d+) bytes cmem\[0\]"),
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    regs = _PTXAS_RE["registers"].search(log)
    frame = _PTXAS_RE["frame"].search(log)
    if not regs or not frame:
        raise CheckError(f"could not read registers and spills from the ptxas -v log:\n{log}")
    cmem = _PTXAS_RE["cmem"].search(log)
    return {
        "registers": int(regs.group(1)),
        "stack": int(frame.group(1)),
        "spill_stores": int(frame.group(2)),
        "spill_loads": int(frame.group(3)),
        "cmem": int(cmem.group(1)) if cmem else 0,
    }


_COMPILED: dict[str, Resources] = {}


def compile_config(config: BoundConfig) -> Resources:
    """Compile one bound configuration for its architecture (cached by key).

    Triton's ptxas runs with ``-v``; its log is printed when
    ``knobs.nvidia.dump_ptxas_log`` is set, hence the captured stdout, and the
    compile is forced so that the log exists even when Triton's cache has it.
    """
    if config.key in _COMPILED:
        return _COMPILED[config.key]
    fn, signature, constexprs, attrs = _SOURCES[config.key]
    res = Resources()
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs, attrs),
                target=GPUTarget("cuda", config.arch, 32),
                options=config.options,
            )
        for name, value in parse_ptxas_log(log.getvalue()).items():
            setattr(res, name, value)
        res.shared = int(compiled.metadata.shared)
        res.num_warps = int(compiled.metadata.num_warps)
    except CheckError:
        raise
    except Exception as exc:  # noqa: BLE001 - a compile error is a result of the check
        text = str(exc).strip().splitlines()
        res.error = f"{type(exc).__name__}: {' | '.join(text[:6])}"
    res.compile_s = time.perf_counter() - start
    _COMPILED[config.key] = res
    return res


# --------------------------------------------------------------------------- occupancy
@dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    occupancy: float  # resident warps / max warps per SM
    limited_by: str
    problems: tuple[str, ...]


def occupancy(arch: int, registers: int, num_warps: int, shared: int) -> Occupancy:
    """Theoretical occupancy of blocks of ``num_warps`` warps using ``registers``
    per thread and ``shared`` bytes of shared memory, as the CUDA occupancy
    calculator counts it: registers per warp rounded up to the allocation unit,
    1 KiB of shared memory reserved per block, at most 64 warps and 32 blocks."""
    lim = ARCHS[arch]
    problems = []
    regs_per_warp = -(-registers * 32 // lim.reg_alloc_unit) * lim.reg_alloc_unit
    if regs_per_warp * num_warps > lim.regs_per_sm:
        problems.append(
            f"{num_warps} warps x {regs_per_warp} registers per warp = {regs_per_warp * num_warps} > "
            f"{lim.regs_per_sm} registers per SM"
        )
    if shared > lim.smem_per_block:
        problems.append(f"shared memory {shared} B > {lim.smem_per_block} B per block")
    limits = {
        "blocks": lim.max_blocks_per_sm,
        "warps": lim.max_warps_per_sm // num_warps,
        "registers": (lim.regs_per_sm // regs_per_warp) // num_warps if regs_per_warp else lim.max_blocks_per_sm,
        "smem": lim.smem_per_sm // (shared + lim.reserved_smem_per_block),
    }
    blocks = min(limits.values())
    limited_by = min(limits, key=lambda k: limits[k])
    if blocks == 0 and not problems:
        problems.append(f"no block fits on an SM (limited by {limited_by})")
    return Occupancy(blocks, blocks * num_warps / lim.max_warps_per_sm, limited_by, tuple(problems))


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    kernel: str
    model: str
    tokens: int
    dtypes: str
    gpus: list[str]
    arch: int
    sms: int
    launch: BoundLaunch
    resources: Resources | None = None
    occ: Occupancy | None = None

    @property
    def waves(self) -> float:
        if not self.occ or not self.occ.blocks_per_sm:
            return float("nan")
        return self.launch.programs / (self.sms * self.occ.blocks_per_sm)

    def failures(self) -> list[str]:
        r = self.resources
        out = []
        if r is None:
            return out
        if r.error:
            return [f"compile error: {r.error}"]
        if r.stack or r.spill_stores or r.spill_loads:
            out.append(f"spills: {r.stack} B stack frame, {r.spill_stores} B spill stores, "
                       f"{r.spill_loads} B spill loads")
        if self.occ:
            out.extend(self.occ.problems)
        for axis, (g, limit) in enumerate(zip(self.launch.grid, MAX_GRID)):
            if g > limit:
                out.append(f"grid axis {axis} is {g} > {limit}")
        return out


def build_rows(recorded: list[Recorded]) -> tuple[list[Row], list[str]]:
    """Bind every launch for its GPU's architecture; identical launches of one
    scenario (e.g. every chunk of linear_cross_entropy, or H100 and H200) make
    one row. Also returns the launches that do not bind (a launcher bug)."""
    rows: dict[tuple, Row] = {}
    failures: dict[str, None] = {}
    for rec in recorded:
        arch, sms = GPUS[rec.gpu]
        sc = rec.scenario
        try:
            bound = bind(rec.launch, arch)
        except CheckError as exc:
            failures[f"{sc.op} {sc.model} N={sc.tokens} {sc.dtypes} ({rec.gpu}): {exc}"] = None
            continue
        key = (rec.launch.kernel, sc.model, sc.tokens, sc.dtypes, arch, sms, bound.config.key, bound.grid)
        row = rows.get(key)
        if row is None:
            rows[key] = Row(rec.launch.kernel, sc.model, sc.tokens, sc.dtypes, [rec.gpu], arch, sms, bound)
        elif rec.gpu not in row.gpus:
            row.gpus.append(rec.gpu)
    return list(rows.values()), list(failures)


def compile_rows(rows: list[Row], progress: Callable[[str], None]) -> None:
    configs: dict[str, BoundConfig] = {}
    for row in rows:
        configs.setdefault(row.launch.config.key, row.launch.config)
    todo = [c for c in configs.values() if c.key not in _COMPILED]
    progress(f"aot_check: {len(rows)} rows, {len(configs)} distinct configurations, {len(todo)} to compile")
    for i, config in enumerate(todo, 1):
        res = compile_config(config)
        consts = " ".join(f"{k}={v}" for k, v in config.constexprs.items())
        status = res.error.split(":")[0] if res.error else f"{res.registers} regs"
        progress(f"  [{i:>3}/{len(todo)}] sm_{config.arch} {config.kernel} {consts} "
                 f"warps={config.options.get('num_warps')}: {status} ({res.compile_s:.1f} s)")
    for row in rows:
        row.resources = _COMPILED[row.launch.config.key]
        r = row.resources
        if not r.error:
            row.occ = occupancy(row.arch, r.registers, r.num_warps, r.shared)


def evaluate(launches: list[Launch], gpu: str) -> list[Row]:
    """Bind, compile and check launches recorded outside the scenarios (tests),
    one row per launch."""
    arch, sms = GPUS[gpu]
    rows = [Row(launch.kernel, "-", 0, "-", [gpu], arch, sms, bind(launch, arch)) for launch in launches]
    compile_rows(rows, progress=lambda _msg: None)
    return rows


# --------------------------------------------------------------------------- report
_MODEL_ORDER = {m.removeprefix("olmo2-"): i for i, m in enumerate(MODELS)}


def _sort_key(row: Row):
    module, _, name = row.kernel.partition(".")
    op_index = OP_MODULES.index(module) if module in OP_MODULES else len(OP_MODULES)
    return (op_index, name, _MODEL_ORDER.get(row.model, len(MODELS)), row.model, row.tokens, row.dtypes, -row.arch)


def _fmt_row(row: Row) -> list[str]:
    r = row.resources
    c = row.launch.config
    consts = " ".join(f"{k}={v}" for k, v in c.constexprs.items())
    gpu = f"sm_{row.arch} {'/'.join(row.gpus)}"
    if r is None or r.error:
        tail = ["ERROR", "", "", "", "", str(row.launch.programs), ""]
    else:
        spilled = r.stack or r.spill_stores or r.spill_loads
        spill = f"{r.stack}/{r.spill_stores}/{r.spill_loads}" if spilled else "0"
        tail = [
            str(r.registers), spill, str(r.shared), f"{100 * row.occ.occupancy:.0f}",
            str(row.occ.blocks_per_sm), str(row.launch.programs), f"{row.waves:.2f}",
        ]
    flag = "FAIL" if row.failures() else ""
    warps = str(c.options.get("num_warps"))
    return [row.kernel, row.model, str(row.tokens), row.dtypes, consts, warps, gpu, *tail, flag]


HEADER = ["kernel", "model", "tokens", "dtypes", "constexprs", "warps", "gpu", "regs", "spill",
          "smem", "occ%", "blk/SM", "programs", "waves", ""]


def format_table(rows: list[Row]) -> str:
    body = [_fmt_row(r) for r in sorted(rows, key=_sort_key)]
    widths = [max(len(line[i]) for line in [HEADER, *body]) for i in range(len(HEADER))]
    right = {2, 5, 7, 8, 9, 10, 11, 12, 13}
    out = []
    for n, line in enumerate([HEADER, *body]):
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths).rstrip())
    return "\n".join(out)


def row_json(row: Row) -> dict:
    c, r = row.launch.config, row.resources
    return {
        "kernel": row.kernel, "model": row.model, "tokens": row.tokens, "dtypes": row.dtypes, "gpus": row.gpus,
        "arch": f"sm_{row.arch}", "sms": row.sms, "grid": list(row.launch.grid), "programs": row.launch.programs,
        "constexprs": {k: repr(v) if not isinstance(v, (int, float, bool, str, type(None))) else v
                       for k, v in c.constexprs.items()},
        "signature": c.signature,
        "divisible_by_16": sorted(k for k, a in c.attrs.items() if ["tt.divisibility", 16] in a),
        "num_warps": c.options.get("num_warps"), "num_stages": c.options.get("num_stages"),
        "resources": dataclasses.asdict(r) if r else None,
        "blocks_per_sm": row.occ.blocks_per_sm if row.occ else None,
        "occupancy": row.occ.occupancy if row.occ else None,
        "occupancy_limited_by": row.occ.limited_by if row.occ else None,
        "waves": None if math.isnan(row.waves) else row.waves,
        "failures": row.failures(),
    }


def _ptxas_versions(archs: list[int]) -> dict[str, str]:
    out = {}
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        for arch in archs:
            tool = get_ptxas(arch)
            out[f"sm_{arch}"] = f"{Path(tool.path).name} {tool.version}"
    except Exception as exc:  # noqa: BLE001 - informational only
        out["error"] = str(exc)
    return out


# --------------------------------------------------------------------------- main
@dataclass
class Report:
    rows: list[Row]
    failures: list[str]
    unlaunched: list[str]
    elapsed_s: float


def run_check(models, tokens_list, archs, quick: bool, progress: Callable[[str], None] = print) -> Report:
    start = time.perf_counter()
    if not hasattr(JITFunction, "_pack_args"):
        raise CheckError(
            f"Triton {triton.__version__}'s JITFunction has no _pack_args; scripts/aot_check.py binds launches "
            "as JITFunction.run does in Triton 3.6 to 3.9: update bind()"
        )
    kernels = discover_kernels(op_modules())
    gpus = [g for g, (arch, _) in GPUS.items() if arch in archs]
    scenarios = build_scenarios(tuple(models), tuple(tokens_list), quick)
    recorded, failures = record_launches(scenarios, gpus, kernels)
    progress(f"aot_check: {len(scenarios)} scenarios x {len(gpus)} GPUs recorded {len(recorded)} launches "
             f"of {len({r.launch.kernel for r in recorded})} kernels")
    rows, bind_failures = build_rows(recorded)
    failures.extend(bind_failures)
    compile_rows(rows, progress)
    launched = {r.launch.kernel for r in recorded}
    # Device functions called from kernels are never launched themselves.
    sources = [k.fn.src for k in kernels.values()]
    unlaunched = [
        name for name, k in kernels.items()
        if name not in launched
        and not any(re.search(rf"\b{k.fn.fn.__name__}\(", src) for src in sources if src != k.fn.src)
    ]
    for row in rows:
        failures.extend(f"{row.kernel} {row.model} N={row.tokens} {row.dtypes} sm_{row.arch}: {f}"
                        for f in row.failures())
    return Report(rows, failures, unlaunched, time.perf_counter() - start)


def _parse_list(text: str, choices: dict[str, Any], what: str) -> list:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item not in choices:
            raise SystemExit(f"aot_check: --{what} must be a comma-separated subset of {sorted(choices)}, "
                             f"got {item!r}")
        out.append(choices[item])
    if not out:
        raise SystemExit(f"aot_check: --{what} is empty")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(m.removeprefix("olmo2-") for m in MODELS),
                        help="comma-separated presets (1b,7b,13b,32b; default: all)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="tokens per batch (default: 8192,16384)")
    parser.add_argument("--archs", default="90,80", help="compute capabilities: 90 (H100, H200), 80 (A100)")
    parser.add_argument("--quick", action="store_true",
                        help="1B at 8192 tokens, one dtype case per op, the padded vocabulary (ignores "
                             "--models and --tokens)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and failures as JSON")
    args = parser.parse_args(argv)

    model_choices = {m.removeprefix("olmo2-"): m for m in MODELS} | {m: m for m in MODELS}
    models = ["olmo2-1b"] if args.quick else _parse_list(args.models, model_choices, "models")
    try:
        tokens_list = [8192] if args.quick else [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        tokens_list = []
    if not tokens_list or any(t <= 0 for t in tokens_list):
        raise SystemExit(f"aot_check: --tokens must be comma-separated positive ints, got {args.tokens!r}")
    archs = _parse_list(args.archs, {str(a): a for a in ARCHS}, "archs")

    print(f"aot_check: Triton {triton.__version__}, torch {torch.__version__}, ptxas "
          + ", ".join(f"{k}: {v}" for k, v in _ptxas_versions(archs).items()), flush=True)
    progress = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        report = run_check(models, tokens_list, archs, args.quick, progress)
    except CheckError as exc:
        print(f"aot_check: ERROR: {exc}", file=sys.stderr)
        return 2

    print(format_table(report.rows))
    print("\nspill: stack frame/spill stores/spill loads in bytes; smem: shared memory per block in bytes; "
          "occ%: resident warps of 64 per SM; waves: programs / (SMs x blocks per SM)")
    if report.unlaunched:
        print("not launched at these shapes (nothing checked): " + ", ".join(report.unlaunched))
    n_configs = len({r.launch.config.key for r in report.rows})
    print(f"\naot_check: {len(report.rows)} rows, {n_configs} distinct configurations, "
          f"{report.elapsed_s:.0f} s, Triton {triton.__version__}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "triton": triton.__version__, "torch": torch.__version__, "ptxas": _ptxas_versions(archs),
            "models": models, "tokens": tokens_list, "archs": [f"sm_{a}" for a in archs],
            "elapsed_s": report.elapsed_s, "failures": report.failures, "not_launched": report.unlaunched,
            "rows": [row_json(r) for r in sorted(report.rows, key=_sort_key)],
        }, indent=1) + "\n")
        print(f"aot_check: wrote {path}")
    if report.failures:
        print(f"\naot_check: FAILED ({len(report.failures)}):")
        for failure in report.failures:
            print(f"  {failure}")
        return 1
    print("aot_check: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
