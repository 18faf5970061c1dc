"""Trainer configuration: typed dataclasses merged by OmegaConf.

The schema is the dataclasses below; their defaults are the default run
(``olmo2-train`` with no arguments: the ``olmo2-tiny`` model on the built-in
corpus), so they are the one source of default values. A named preset
(:data:`PRESETS`, the ``preset`` key) holds only what differs from them.

Resolution (later wins), merged by ``OmegaConf.merge`` over
``OmegaConf.structured(TrainConfig)``: the defaults, the preset, the YAML file
(``--config``), then dotted ``--key=value`` overrides (``OmegaConf.from_dotlist``:
``--optim.lr=1e-3``, ``--model.num_hidden_layers=2``,
``--data.sources='[{paths: [a.npy], weight: 0.7}]'``). The library converts
values to the field types and rejects unknown keys and wrong types naming the
dotted key; ``__post_init__`` of each section checks the values. The
``model`` section is an :class:`olmo2.Olmo2Config`: ``model.preset`` names a
model preset, the other keys override its fields. The resolved config (model
fully spelled out) is what :meth:`TrainConfig.to_dict` returns and what every
checkpoint stores. ``olmo2-train --help`` lists every key with its default and
the comment above its field (:func:`options_help`).

Units: batch sizes are in tokens, like OLMo-core (``global_batch_tokens``: the
whole optimizer step over all ranks and micro-batches; ``micro_batch_tokens``:
one forward/backward on one rank), both multiples of ``data.seq_len``. Step
counts (``max_steps``, warmup, decay horizon) are optimizer steps.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import olmo2_kernels

from ..config import PRESETS as MODEL_PRESETS
from ..config import Olmo2Config
from ..files import atomic_write
from .evaluation import DownstreamEvalConfig
from .optim import SCHEDULES

PARALLEL_STRATEGIES = ("auto", "fsdp", "ddp", "none")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
KERNEL_BACKENDS = ("auto", *olmo2_kernels.BACKENDS)
VERIFY_LEVELS = ("checksum", "size")
# The model of the default run.
DEFAULT_MODEL_PRESET = "olmo2-tiny"


class ConfigError(ValueError):
    """A config value, key or file is invalid (the message names it)."""


# ---------------------------------------------------------------------- sections
@dataclass
class SourceConfig:
    """One token source of the data mix."""

    # Token files or glob patterns (headerless uint32/uint16 arrays); one path may be given as a string.
    paths: list[str] = field(default_factory=list)
    # Relative share of training instances (normalized over sources).
    weight: float = 1.0
    # Token id type of the files: uint32 or uint16.
    dtype: str = "uint32"
    # Name in logs (default: the first file's name).
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
    # Training mix (a list of {paths, weight, dtype, name}). Empty: the built-in corpus
    # (the Python standard library's source as byte tokens; olmo2.train.corpus).
    sources: list[SourceConfig] = field(default_factory=list)
    # Held-out evaluation token files (built-in corpus: its validation split).
    eval_paths: list[str] = field(default_factory=list)
    # Token id type of the evaluation files.
    eval_dtype: str = "uint32"
    # Tokens per training instance.
    seq_len: int = 128
    # Seed of the data order (independent of the model-init seed).
    seed: int = 0
    # Where the built-in corpus is cached (None: $OLMO2_CACHE_DIR or ~/.cache/olmo2).
    cache_dir: str | None = None
    # Check sampled token ids against the vocabulary when opening files.
    check_token_ids: bool = True
    # Tokenizer of the token files: a shipped one ("byte", "dolma2") or a tokenizer.json (or a folder holding one);
    # copied into the run folder, every checkpoint and the HF export. None: the one the
    # files' olmo2-tokenize sidecars (<file>.json) name (the built-in corpus: byte).
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        _positive_int("data.seq_len", self.seq_len, minimum=2)
        if isinstance(self.eval_paths, str):
            self.eval_paths = [self.eval_paths]


@dataclass
class OptimConfig:
    # Peak learning rate. None: continue from the init_from checkpoint's last
    # learning rate (stage 2 annealing).
    lr: float | None = 3e-3
    # AdamW betas.
    betas: tuple[float, float] = (0.9, 0.95)
    # AdamW epsilon (OLMo 2: 1e-8).
    eps: float = 1e-8
    # Decoupled weight decay of the decayed group.
    weight_decay: float = 0.1
    # Decay the input embedding too (OLMo 2: no).
    embedding_weight_decay: bool = False
    # Decay the RMSNorm weights too (OLMo 2: yes).
    norm_weight_decay: bool = True
    # Global-norm gradient clipping; 0 disables.
    max_grad_norm: float = 1.0
    # Coefficient of the z-loss, logsumexp(logits)^2 per token.
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
    # Steps of linear warmup from 0 to the peak.
    warmup_steps: int = 20
    # Horizon of the decay in steps (the LR reaches final_lr_ratio * peak
    # there). None: max_steps. Longer than max_steps: a truncated schedule.
    decay_steps: int | None = None
    # Learning rate at the end of the decay, as a fraction of the peak.
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

    # Skip optimizer steps whose loss or gradient norm is a spike.
    enabled: bool = True
    # Rolling window of past values (OLMo-core: 128).
    window: int = 128
    # Values needed before a step is judged, counting the step's own (OLMo-core: 64).
    min_history: int = 64
    # Standard deviations above the rolling mean that make a spike.
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
    # FSDP2 gradient reduction in fp32.
    reduce_fp32: bool = True
    # FSDP2 shard group size: null shards over every rank; k makes it HSDP, sharding
    # within groups of k consecutive ranks (e.g. one node) and replicating across
    # world / k groups (k must divide the world size).
    shard_degree: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in PARALLEL_STRATEGIES:
            raise ConfigError(f"parallel.strategy must be one of {PARALLEL_STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"parallel.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.shard_degree is not None:
            _positive_int("parallel.shard_degree", self.shard_degree)
            if self.strategy in ("ddp", "none") and self.shard_degree != 1:
                raise ConfigError(f"parallel.shard_degree={self.shard_degree} needs parallel.strategy=fsdp "
                                  f"(or auto), got {self.strategy!r}")


@dataclass
class CheckpointConfig:
    # Save every this many steps (0: only at the end).
    interval: int = 100
    # Keep the newest K checkpoints (0: all).
    keep_last: int = 2
    # Save a checkpoint after the last step.
    save_final: bool = True
    # Also write the final weights in Hugging Face format to <run_dir>/hf.
    export_hf: bool = True
    # Check a checkpoint before loading it against its manifest: "checksum" (sizes and
    # sha256, about 2 s per GB per core) or "size" (sizes only).
    verify: str = "checksum"
    # Write interval checkpoints in the background (state copied to host memory first,
    # at most one save in flight; the final and signal saves wait). None: on for GPU
    # runs, off on CPU (the state is in host memory already: a copy would double it).
    async_save: bool | None = None

    def __post_init__(self) -> None:
        _positive_int("checkpoint.interval", self.interval, minimum=0)
        _positive_int("checkpoint.keep_last", self.keep_last, minimum=0)
        if self.verify not in VERIFY_LEVELS:
            raise ConfigError(f"checkpoint.verify must be one of {VERIFY_LEVELS}, got {self.verify!r}")


def _default_model() -> Olmo2Config:
    return Olmo2Config.preset(DEFAULT_MODEL_PRESET)


@dataclass
class TrainConfig:
    # Training preset applied over these defaults (see PRESETS).
    preset: str = "tiny"
    # Name of the run folder.
    run_name: str = "olmo2-tiny"
    # Runs live in <out_dir>/<run_name> (checkpoints, metrics.jsonl, hf/).
    out_dir: str = "runs"
    # The architecture (olmo2.Olmo2Config); model.preset names a model preset.
    model: Olmo2Config = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Tokens per optimizer step over all ranks and micro-batches.
    global_batch_tokens: int = 16 * 128
    # Tokens per forward/backward on one rank (gradient accumulation makes up the rest).
    micro_batch_tokens: int = 16 * 128
    # Optimizer steps of the run; also the decay horizon unless schedule.decay_steps is set.
    max_steps: int = 200
    # Stop at this step without changing the schedule (OLMo-core's hard_stop); None: max_steps.
    hard_stop: int | None = None
    # Seed of model init (and of torch/numpy/python RNGs).
    seed: int = 0
    # "auto" (cuda when available), "cpu" or "cuda".
    device: str = "auto"
    # olmo2_kernels backend for this run ("auto", "torch", "triton", "cuda", "cpu").
    kernel_backend: str = "auto"
    # Write metrics every N steps.
    log_interval: int = 1
    # Evaluate on data.eval_paths every N steps (0: never).
    eval_interval: int = 50
    # Global batches per evaluation.
    eval_batches: int = 4
    # In-loop downstream evaluation: OLMES tasks (the eval extra) every downstream_eval.interval steps.
    downstream_eval: DownstreamEvalConfig = field(default_factory=DownstreamEvalConfig)
    # Start a new stage from this trainer checkpoint (folder, or a run's
    # checkpoints folder to take its latest): weights, and the optimizer state
    # when init_from_optimizer; step, data order and schedule start afresh.
    init_from: str | None = None
    # With init_from: also load the optimizer state.
    init_from_optimizer: bool = True
    # "auto": continue from <run_dir>/checkpoints/latest if there is one;
    # "never"; or a checkpoint folder.
    resume: str = "auto"
    # Show a progress bar.
    progress: bool = True
    # Also log to TensorBoard (when installed).
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, Olmo2Config):
            raise ConfigError(f"model must be an Olmo2Config, got {type(self.model).__name__}")
        for name in ("global_batch_tokens", "micro_batch_tokens", "max_steps", "log_interval"):
            _positive_int(name, getattr(self, name))
        _positive_int("eval_interval", self.eval_interval, minimum=0)
        _positive_int("eval_batches", self.eval_batches)
        if self.hard_stop is not None:
            _positive_int("hard_stop", self.hard_stop)
            if self.hard_stop > self.max_steps:
                raise ConfigError(f"hard_stop ({self.hard_stop}) must be <= max_steps ({self.max_steps}); to train "
                                  "longer, raise max_steps (and set schedule.decay_steps to keep the schedule)")
        seq = self.data.seq_len
        for name in ("global_batch_tokens", "micro_batch_tokens"):
            if getattr(self, name) % seq:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of data.seq_len ({seq})")
        if self.global_batch_tokens % self.micro_batch_tokens:
            raise ConfigError(
                f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple of "
                f"micro_batch_tokens ({self.micro_batch_tokens}) (times the number of ranks)"
            )
        if self.model.max_positions is not None and seq > self.model.max_positions:
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
    def stop_step(self) -> int:
        """The step the run ends at: ``hard_stop``, else ``max_steps``."""
        return self.hard_stop or self.max_steps

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
        """Write the resolved config as YAML (:func:`olmo2.files.atomic_write`)."""
        with atomic_write(path) as f:
            f.write(self.to_yaml())

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
        "eval_interval": 0,
    }


# What each preset changes from the dataclass defaults (which are the "tiny" run).
PRESETS: dict[str, dict[str, Any]] = {
    # The default, on the built-in corpus (README: its measured time on 2 CPU cores).
    "tiny": {},
    # Unit tests: seconds.
    "test": {
        "run_name": "olmo2-test",
        "model": {"preset": "olmo2-test"},
        "data": {"seq_len": 32},
        "global_batch_tokens": 4 * 32,
        "micro_batch_tokens": 2 * 32,
        "max_steps": 8,
        "optim": {"lr": 1e-2},
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"interval": 0, "export_hf": False},
        "eval_interval": 0,
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


def _library_error(exc: OmegaConfBaseException) -> ConfigError:
    """OmegaConf's error as one line that starts with the dotted key."""
    message = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    return ConfigError(f"{key}: {message}" if key else message)


def overrides_dotlist(args: list[str]) -> list[str]:
    """``["--optim.lr=1e-3"]`` -> ``["optim.lr=1e-3"]``, refusing anything else."""
    out = []
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --key=value (dotted keys for sections)")
        key, value = arg[2:].split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {arg!r}: empty key")
        out.append(f"{key.replace('-', '_')}={value}")
    return out


def parse_overrides(args: list[str]) -> dict:
    """``["--a.b=1", "--c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values read as YAML)."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(overrides_dotlist(args)))
    except OmegaConfBaseException as exc:
        raise _library_error(exc) from None


def _load_file(path: str | os.PathLike) -> DictConfig:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"--config {path}: expected a mapping at the top level, got a list")
    return loaded


def _as_layer(values: Any) -> DictConfig:
    if isinstance(values, DictConfig):
        return values.copy()
    try:
        return OmegaConf.create(values or {})
    except OmegaConfBaseException as exc:
        raise _library_error(exc) from None


def _paths_as_lists(layer: DictConfig) -> None:
    """A single path given as a string (``paths: a.npy``) is a one-item list."""
    data = layer.get("data")
    if not isinstance(data, DictConfig):
        return
    if isinstance(data.get("eval_paths"), str):
        data.eval_paths = [data.eval_paths]
    for source in data.get("sources") or []:
        if isinstance(source, DictConfig) and isinstance(source.get("paths"), str):
            source.paths = [source.paths]


def _pop_model_preset(layer: DictConfig) -> str | None:
    model = layer.get("model")
    if isinstance(model, DictConfig) and "preset" in model:
        name = model.pop("preset")
        if name not in MODEL_PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(MODEL_PRESETS)}, got {name!r}")
        return name
    return None


def resolve_config(schema: type, presets: dict[str, Any], config_file: str | os.PathLike | None = None,
                   overrides: list[str] | dict | DictConfig | None = None, preset: str | None = None,
                   prepare: typing.Callable[[list[DictConfig]], DictConfig] | None = None) -> Any:
    """The one resolver of every stage (pretraining, SFT, DPO): the dataclass ``schema``'s
    defaults <- the named preset <- the YAML file <- the overrides, merged by OmegaConf
    into a validated ``schema`` instance.

    ``overrides`` are ``--key=value`` strings (dotted keys for sections) or a (nested)
    mapping. The preset is the overrides' ``preset``, else the file's, else ``preset``
    (None: none). ``prepare(layers)`` may edit the three layers (preset, file,
    overrides) and returns the schema node to merge them into (default: the
    structured ``schema``). Every error is a :class:`ConfigError` of one line that
    names the dotted key.
    """
    file_layer = _load_file(config_file) if config_file else OmegaConf.create({})
    if isinstance(overrides, list):
        try:
            cli_layer = OmegaConf.from_dotlist(overrides_dotlist(overrides))
        except OmegaConfBaseException as exc:
            raise _library_error(exc) from None
    else:
        cli_layer = _as_layer(overrides)
    name = cli_layer.get("preset", file_layer.get("preset", preset))
    if name is not None and name not in presets:
        raise ConfigError(f"preset must be one of {sorted(presets)}, got {name!r}")
    layers = [_as_layer(presets[name] if name is not None else {}), file_layer, cli_layer]
    try:
        base = prepare(layers) if prepare is not None else OmegaConf.structured(schema)
        if "preset" not in base:  # a schema that does not record its preset
            for layer in layers:
                layer.pop("preset", None)
        merged = OmegaConf.merge(base, *layers)
        if "preset" in merged:
            merged.preset = name if name is not None else ""
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _library_error(exc) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # the dataclasses' own checks (Olmo2Config's, SFTConfig's, ...)
        raise ConfigError(f"model: {exc}" if "Olmo2Config" in str(exc) else str(exc)) from None


def _train_schema(layers: list[DictConfig]) -> DictConfig:
    """TrainConfig's schema node: the model preset named in the layers (``model.preset``)
    as the model's defaults; single paths as one-item lists."""
    model_preset = DEFAULT_MODEL_PRESET
    for layer in layers:
        model_preset = _pop_model_preset(layer) or model_preset
        _paths_as_lists(layer)
    schema = OmegaConf.structured(TrainConfig)
    # The model preset's own values, not a built Olmo2Config: fields it leaves
    # unset (head_dim, num_key_value_heads) follow the overrides.
    schema.model = OmegaConf.merge(OmegaConf.structured(Olmo2Config), MODEL_PRESETS[model_preset])
    return schema


def resolve(config_file: str | os.PathLike | None = None, overrides: list[str] | dict | DictConfig | None = None,
            preset: str | None = None) -> TrainConfig:
    """Defaults <- preset <- YAML file <- overrides, merged by OmegaConf into a validated :class:`TrainConfig`
    (:func:`resolve_config`; the preset defaults to ``tiny``)."""
    return resolve_config(TrainConfig, PRESETS, config_file, overrides, preset or "tiny", prepare=_train_schema)


# ---------------------------------------------------------------------- --help
def field_docs(cls: type) -> dict[str, str]:
    """The comment lines just above each field of dataclass ``cls``, joined into one line."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    comment: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^ {4}(\w+)\s*:", line)
        if match and match.group(1) in names and comment:
            docs[match.group(1)] = " ".join(comment)
        comment = []
    return docs


def _leaf_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def options_help(cfg: TrainConfig | None = None) -> list[tuple[str, str, str]]:
    """``(dotted key, value, doc)`` for every config key: the values of ``cfg``
    (default: the defaults), the docs from the comments above the fields."""
    cfg = cfg if cfg is not None else TrainConfig()
    rows: list[tuple[str, str, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        docs = field_docs(type(obj))
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if not f.repr and type(obj) is Olmo2Config:
                continue  # tie_word_embeddings: only ever False
            key = f"{prefix}{f.name}"
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                if key == "model":
                    model_preset = PRESETS.get(cfg.preset, {}).get("model", {}).get("preset", DEFAULT_MODEL_PRESET)
                    rows.append(("model.preset", model_preset,
                                 f"model preset ({', '.join(MODEL_PRESETS)}); the model.* keys override its fields"))
                walk(value, key + ".")
                continue
            rows.append((key, _leaf_value(value), docs.get(f.name, "")))
            item = typing.get_args(hints[f.name])
            if item and dataclasses.is_dataclass(item[0]):
                item_docs = field_docs(item[0])
                for sub in dataclasses.fields(item[0]):
                    default = sub.default if sub.default is not dataclasses.MISSING else sub.default_factory()
                    rows.append((f"{key}[].{sub.name}", _leaf_value(default), item_docs.get(sub.name, "")))

    walk(cfg, "")
    return rows
