"""Trainer configuration: typed dataclasses, named presets, YAML files and
dotted ``--key=value`` overrides.

Resolution order (later wins): the dataclass defaults, the preset (``preset``
key; ``tiny`` unless a file or the command line names another), the YAML file
(``--config``), then ``--key=value`` overrides (``--optim.lr=1e-3``,
``--model.num_hidden_layers=2``, ``--data.sources='[{paths: [a.npy], weight: 0.7}]'``;
values are read as YAML, then converted to the field's type). The ``model``
section is an :class:`olmo2.Olmo2Config`: ``model.preset`` names a model preset,
the other keys override its fields. The resolved config (model fully spelled
out) is what :meth:`TrainConfig.to_dict` returns and what every checkpoint
stores.

Units: batch sizes are in tokens, like OLMo-core (``global_batch_tokens``: the
whole optimizer step over all ranks and micro-batches; ``micro_batch_tokens``:
one forward/backward on one rank), both multiples of ``data.seq_len``. Step
counts (``max_steps``, warmup, decay horizon) are optimizer steps.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

import olmo2_kernels

from ..config import Olmo2Config
from .optim import SCHEDULES

PARALLEL_STRATEGIES = ("auto", "fsdp", "ddp", "none")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
KERNEL_BACKENDS = ("auto", *olmo2_kernels.BACKENDS)


class ConfigError(ValueError):
    """A config value, key or file is invalid (the message names it)."""


# ---------------------------------------------------------------------- sections
@dataclass
class SourceConfig:
    """One token source of the data mix."""

    # Token files or glob patterns (headerless uint32/uint16 arrays).
    paths: list[str] = field(default_factory=list)
    # Relative share of training instances (normalized over sources).
    weight: float = 1.0
    dtype: str = "uint32"
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not self.paths:
            raise ConfigError("data source: paths must list at least one token file")
        if not self.weight > 0:
            raise ConfigError(f"data source {self.paths}: weight must be positive, got {self.weight!r}")
        if self.dtype not in ("uint32", "uint16"):
            raise ConfigError(f"data source {self.paths}: dtype must be 'uint32' or 'uint16', got {self.dtype!r}")


@dataclass
class DataConfig:
    # Training mix. Empty: the built-in corpus (the Python standard library's
    # source, byte tokens; see olmo2.train.corpus.stdlib_corpus).
    sources: list[SourceConfig] = field(default_factory=list)
    # Held-out evaluation token files (built-in corpus: its validation split).
    eval_paths: list[str] = field(default_factory=list)
    eval_dtype: str = "uint32"
    seq_len: int = 256
    # Seed of the data order (independent of the model-init seed).
    seed: int = 0
    # Where the built-in corpus is cached (default $OLMO2_CACHE_DIR or ~/.cache/olmo2).
    cache_dir: str | None = None
    # Check sampled token ids against the vocabulary when opening files.
    check_token_ids: bool = True

    def __post_init__(self) -> None:
        _positive_int("data.seq_len", self.seq_len, minimum=2)
        if isinstance(self.eval_paths, str):
            self.eval_paths = [self.eval_paths]


@dataclass
class OptimConfig:
    # Peak learning rate. None: continue from the init_from checkpoint's last
    # learning rate (stage 2 annealing).
    lr: float | None = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    embedding_weight_decay: bool = False
    norm_weight_decay: bool = True
    # Global-norm gradient clipping; 0 disables.
    max_grad_norm: float = 1.0
    z_loss_coef: float = 1e-5
    # Fused CUDA AdamW; None: fused when the parameters are on a GPU.
    fused: bool | None = None

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr >= 0:
            raise ConfigError(f"optim.lr must be >= 0 or null, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("eps", "weight_decay", "max_grad_norm", "z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass
class ScheduleConfig:
    # "cosine", "linear" or "constant" after a linear warmup.
    name: str = "cosine"
    warmup_steps: int = 0
    # Horizon of the decay in steps (the LR reaches final_lr_ratio * peak
    # there). None: max_steps. Longer than max_steps: a truncated schedule.
    decay_steps: int | None = None
    final_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"schedule.name must be one of {SCHEDULES}, got {self.name!r}")
        _positive_int("schedule.warmup_steps", self.warmup_steps, minimum=0)
        if self.decay_steps is not None:
            _positive_int("schedule.decay_steps", self.decay_steps)
        if not 0 <= self.final_lr_ratio <= 1:
            raise ConfigError(f"schedule.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio!r}")


@dataclass
class SpikeConfig:
    """Skip the step when loss or grad norm exceeds the rolling mean by > sigma std."""

    enabled: bool = True
    window: int = 128
    min_history: int = 64
    sigma: float = 6.0

    def __post_init__(self) -> None:
        _positive_int("spike.window", self.window, minimum=2)
        _positive_int("spike.min_history", self.min_history, minimum=2)
        if self.min_history > self.window:
            raise ConfigError(f"spike.min_history ({self.min_history}) must be <= spike.window ({self.window})")
        if not self.sigma > 0:
            raise ConfigError(f"spike.sigma must be positive, got {self.sigma!r}")


@dataclass
class ParallelConfig:
    # "auto": FSDP2 with several ranks, nothing with one; or "fsdp", "ddp", "none".
    strategy: str = "auto"
    # Recompute each block in the backward (memory for compute).
    activation_checkpointing: bool = False
    # torch.compile each block.
    compile: bool = False
    # "auto": bf16 on GPU (FSDP2 mixed precision, else autocast), fp32 on CPU.
    precision: str = "auto"
    # FSDP2 gradient reduction dtype.
    reduce_fp32: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in PARALLEL_STRATEGIES:
            raise ConfigError(f"parallel.strategy must be one of {PARALLEL_STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"parallel.precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class CheckpointConfig:
    # Save every this many steps (0: only at the end).
    interval: int = 0
    # Keep the newest K checkpoints (0: all).
    keep_last: int = 2
    save_final: bool = True
    # Also write the final weights in Hugging Face format to <run_dir>/hf.
    export_hf: bool = True

    def __post_init__(self) -> None:
        _positive_int("checkpoint.interval", self.interval, minimum=0)
        _positive_int("checkpoint.keep_last", self.keep_last, minimum=0)


@dataclass
class TrainConfig:
    preset: str = "tiny"
    run_name: str = "olmo2-tiny"
    # Runs live in <out_dir>/<run_name> (checkpoints, metrics.jsonl, hf/).
    out_dir: str = "runs"
    model: Olmo2Config = field(default_factory=lambda: Olmo2Config.preset("olmo2-tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Tokens per optimizer step over all ranks and micro-batches.
    global_batch_tokens: int = 16 * 256
    # Tokens per forward/backward on one rank (gradient accumulation makes up the rest).
    micro_batch_tokens: int = 16 * 256
    max_steps: int = 100
    # Seed of model init (and of torch/numpy/python RNGs).
    seed: int = 0
    # "auto" (cuda when available), "cpu" or "cuda".
    device: str = "auto"
    # olmo2_kernels backend for this run ("auto", "torch", "triton", "cuda", "cpu").
    kernel_backend: str = "auto"
    log_interval: int = 1
    # Evaluate on data.eval_paths every N steps (0: never) over eval_batches global batches.
    eval_interval: int = 0
    eval_batches: int = 4
    # Start a new stage from this trainer checkpoint (folder, or a run's
    # checkpoints folder to take its latest): weights, and the optimizer state
    # when init_from_optimizer; step, data order and schedule start afresh.
    init_from: str | None = None
    init_from_optimizer: bool = True
    # "auto": continue from <run_dir>/checkpoints/latest if there is one;
    # "never"; or a checkpoint folder.
    resume: str = "auto"
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, Olmo2Config):
            raise ConfigError(f"model must be an Olmo2Config, got {type(self.model).__name__}")
        for name in ("global_batch_tokens", "micro_batch_tokens", "max_steps", "log_interval"):
            _positive_int(name, getattr(self, name))
        _positive_int("eval_interval", self.eval_interval, minimum=0)
        _positive_int("eval_batches", self.eval_batches)
        seq = self.data.seq_len
        for name in ("global_batch_tokens", "micro_batch_tokens"):
            if getattr(self, name) % seq:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of data.seq_len ({seq})")
        if self.global_batch_tokens % self.micro_batch_tokens:
            raise ConfigError(
                f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple of "
                f"micro_batch_tokens ({self.micro_batch_tokens}) (times the number of ranks)"
            )
        if seq > self.model.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len ({seq}) exceeds model.max_position_embeddings ({self.model.max_position_embeddings})"
            )
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ConfigError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        if self.optim.lr is None and not self.init_from:
            raise ConfigError("optim.lr is null (continue a checkpoint's learning rate) but init_from is not set")
        if self.schedule.decay_steps is not None and self.schedule.decay_steps <= self.schedule.warmup_steps \
                and self.schedule.name != "constant":
            raise ConfigError(
                f"schedule.decay_steps ({self.schedule.decay_steps}) must exceed schedule.warmup_steps "
                f"({self.schedule.warmup_steps})"
            )
        if self.schedule.decay_steps is None and self.schedule.name != "constant" \
                and self.max_steps <= self.schedule.warmup_steps:
            raise ConfigError(
                f"max_steps ({self.max_steps}) must exceed schedule.warmup_steps ({self.schedule.warmup_steps})"
            )

    # ------------------------------------------------------------------ derived
    @property
    def global_batch_instances(self) -> int:
        return self.global_batch_tokens // self.data.seq_len

    @property
    def micro_batch_instances(self) -> int:
        return self.micro_batch_tokens // self.data.seq_len

    @property
    def decay_steps(self) -> int:
        return self.schedule.decay_steps or self.max_steps

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.run_name)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step; a clear error when the batch does not split."""
        per_rank, rem = divmod(self.global_batch_tokens, world_size)
        if rem or per_rank % self.micro_batch_tokens:
            raise ConfigError(
                f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple of "
                f"micro_batch_tokens ({self.micro_batch_tokens}) x world size ({world_size})"
            )
        return per_rank // self.micro_batch_tokens

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (temporary file, then rename)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_yaml())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        """A config from a YAML file written by :meth:`save` (or by hand)."""
        return resolve(config_file=path)


# ---------------------------------------------------------------------- presets
def _steps(tokens: float, batch_tokens: int) -> int:
    return int(round(tokens / batch_tokens))


def _published(model: str, batch_instances: int, lr: float, micro_instances: int, stop_tokens: float,
               activation_checkpointing: bool) -> dict[str, Any]:
    """A published OLMo 2 stage-1 run: seq 4096, warmup 8.39B tokens (2000 steps at the
    7B batch), cosine to 0.1 x peak over a 5T-token horizon, stopped at ``stop_tokens``."""
    batch = batch_instances * 4096
    return {
        "run_name": f"{model}-stage1",
        "model": {"preset": model},
        "data": {"seq_len": 4096},
        "global_batch_tokens": batch,
        "micro_batch_tokens": micro_instances * 4096,
        "max_steps": _steps(stop_tokens, batch),
        "optim": {"lr": lr},
        "schedule": {"name": "cosine", "warmup_steps": _steps(8_388_608_000, batch),
                     "decay_steps": _steps(5e12, batch), "final_lr_ratio": 0.1},
        "parallel": {"strategy": "auto", "activation_checkpointing": activation_checkpointing},
        "checkpoint": {"interval": 1000, "keep_last": 3},
        "log_interval": 1,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # The default: a few minutes on 2 CPU cores on the built-in corpus.
    "tiny": {
        "run_name": "olmo2-tiny",
        "model": {"preset": "olmo2-tiny", "eos_token_id": 256, "pad_token_id": 257},
        "data": {"seq_len": 128},
        "global_batch_tokens": 16 * 128,
        "micro_batch_tokens": 16 * 128,
        "max_steps": 200,
        "optim": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 20, "final_lr_ratio": 0.1},
        "spike": {"window": 128, "min_history": 64},
        "checkpoint": {"interval": 100, "keep_last": 2},
        "eval_interval": 50,
        "eval_batches": 4,
    },
    # Unit tests: seconds.
    "test": {
        "run_name": "olmo2-test",
        "model": {"preset": "olmo2-test", "eos_token_id": 256, "pad_token_id": 257},
        "data": {"seq_len": 32},
        "global_batch_tokens": 4 * 32,
        "micro_batch_tokens": 2 * 32,
        "max_steps": 8,
        "optim": {"lr": 1e-2},
        "schedule": {"name": "cosine", "warmup_steps": 1, "final_lr_ratio": 0.1},
        "checkpoint": {"interval": 0, "keep_last": 2, "export_hf": False},
        "progress": False,
        "tensorboard": False,
    },
    # Published stage-1 runs (OLMo 2 report; allenai/OLMo official configs).
    "olmo2-1b": _published("olmo2-1b", 512, 4e-4, 4, 4.0e12, activation_checkpointing=False),
    "olmo2-7b": _published("olmo2-7b", 1024, 3e-4, 2, 3.9e12, activation_checkpointing=True),
    "olmo2-13b": _published("olmo2-13b", 2048, 9e-4, 1, 5.0e12, activation_checkpointing=True),
    # Stage 2 (annealing) of the 7B: 50B tokens from a stage-1 checkpoint, the LR
    # decaying linearly to 0 from stage 1's last LR (optim.lr null), no warmup.
    # Set init_from and data.sources (the mid-training mix) on the command line.
    "olmo2-7b-stage2": {
        **_published("olmo2-7b", 1024, 3e-4, 2, 50e9, activation_checkpointing=True),
        "run_name": "olmo2-7b-stage2",
        "optim": {"lr": None},
        "schedule": {"name": "linear", "warmup_steps": 0, "decay_steps": None, "final_lr_ratio": 0.0},
    },
}


# ---------------------------------------------------------------------- resolution
def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``, recursively for dicts; lists and scalars replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(args: list[str]) -> dict:
    """``["--a.b=1", "--c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values read as YAML)."""
    out: dict = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --key=value (dotted keys for sections)")
        key, raw = arg[2:].split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {arg!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {arg!r}: value is not valid YAML ({exc})") from None
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: {part} was already given a value")
        node[parts[-1]] = value
    return out


def _read_yaml(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def resolve(config_file: str | os.PathLike | None = None, overrides: list[str] | dict | None = None,
            preset: str | None = None) -> TrainConfig:
    """Defaults <- preset <- YAML file <- overrides, as a validated :class:`TrainConfig`."""
    file_values = _read_yaml(config_file) if config_file else {}
    cli = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    name = cli.get("preset", file_values.get("preset", preset or "tiny"))
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    values = deep_merge(deep_merge(deep_merge({"preset": name}, PRESETS[name]), file_values), cli)
    values["preset"] = name
    return from_dict(TrainConfig, values)


def _model_from_dict(values: Any, path: str) -> Olmo2Config:
    if isinstance(values, Olmo2Config):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must be a mapping (model.preset and Olmo2Config fields), got {values!r}")
    values = dict(values)
    name = values.pop("preset", None)
    fields = {f.name: f for f in dataclasses.fields(Olmo2Config)}
    hints = typing.get_type_hints(Olmo2Config)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; Olmo2Config has {sorted(fields)}")
    converted = {k: _convert(v, hints[k], f"{path}.{k}") for k, v in values.items()}
    try:
        return Olmo2Config.preset(name, **converted) if name is not None else Olmo2Config(**converted)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def from_dict(cls: type, values: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict, converting values to the field
    types; unknown keys and wrong types raise :class:`ConfigError` naming the key."""
    if cls is Olmo2Config:
        return _model_from_dict(values, path or "model")
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{path or cls.__name__} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}unknown key(s) {unknown}; expected some of {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and args and args[0] is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path} must have {len(args)} items, got {value!r}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
        raise ConfigError(f"{path} must be an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{path} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path} must be a string, got {value!r}")
    return value


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """``[--config FILE] [--key=value ...] [--dry-run]`` -> (config, dry_run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_file = None
    dry_run = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--dry-run", "--dry_run"):
            dry_run = True
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            config_file = argv[i + 1]
            i += 1
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return resolve(config_file, rest), dry_run
