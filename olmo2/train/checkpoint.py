"""Trainer checkpoints: everything needed to continue a run exactly, written
atomically, readable by any number of ranks.

Layout of ``<run_dir>/checkpoints``::

    step00000100/
        state/            model and optimizer (torch.distributed.checkpoint)
        rng/rank00000.pt  python, numpy, torch CPU and CUDA RNG states of each rank
        trainer.json      step, tokens seen, data position, spike-detector and
                          other callback state, the last learning rate
        config.yaml       the resolved TrainConfig
    step00000200/
    latest                the name of the newest complete checkpoint

Model and optimizer go through ``torch.distributed.checkpoint`` (DCP) with the
state dicts of ``torch.distributed.checkpoint.state_dict``: each rank writes
its own FSDP2 shards (no gather on rank 0, so the 7B/13B presets save without
a full copy in one process's memory), and DCP reshards on load, so a
checkpoint written by N ranks loads on M ranks, or in one process with no
process group (as the soup and the HF export do). Names are the model's own
(``model.layers.0.mlp.up_proj.weight``), whatever wrappers (FSDP2, activation
checkpointing, ``torch.compile``) are applied.

Atomicity: everything is written into ``.tmp-stepXXXXXXXX``; rank 0 renames it
to ``stepXXXXXXXX`` once every rank has finished, and only then rewrites
``latest`` (temporary file + ``os.replace``). A crash at any point leaves the
previous checkpoint complete and ``latest`` pointing at it. Older checkpoints
beyond ``keep_last`` are deleted after ``latest`` moves. With several ranks the
run folder must be on a file system all ranks share.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint_hf import save_pretrained
from ..files import atomic_copy, atomic_write, fsync_dir
from ..model import Olmo2ForCausalLM
from .config import CheckpointConfig, TrainConfig

LATEST = "latest"
STATE_DIR = "state"
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"
_STEP_RE = re.compile(r"^step(\d{8,})$")
FORMAT_VERSION = 1


def step_dirname(step: int) -> str:
    return f"step{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it runs in one process when there is no process group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


# ---------------------------------------------------------------------- small files
def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (:func:`olmo2.files.atomic_write`)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


# ---------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------- locating checkpoints
def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / TRAINER_FILE).is_file():
            out.append((int(m.group(1)), child))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = root / name
    if not (path / TRAINER_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints`` folder (its
    ``latest``), or a run folder (``<run>/checkpoints/latest``)."""
    path = Path(path)
    if (path / TRAINER_FILE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root) if (root / LATEST).is_file() else None
        if found is not None:
            return found
    raise FileNotFoundError(
        f"{path} is not a trainer checkpoint (no {TRAINER_FILE}) nor a folder with a '{LATEST}' pointer"
    )


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    with open(Path(path) / TRAINER_FILE, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------- state dicts
def _options(full: bool = False, cpu_offload: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=cpu_offload, strict=strict)


def model_state_dict(model: nn.Module, full: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict with clean names; ``full=True`` gathers plain CPU tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full=full, cpu_offload=full))


def _train_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {"model": get_model_state_dict(model, options=_options())}
    if optimizer is not None:
        out["optim"] = get_optimizer_state_dict(model, optimizer, options=_options())
    return out


# ---------------------------------------------------------------------- save
def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], config_yaml: str | None = None, keep_last: int = 0) -> Path:
    """Write checkpoint ``step`` under ``root`` (collective: every rank calls it).

    See the module docstring for the layout and the atomicity guarantee.
    Returns the final folder.
    """
    root = Path(root)
    rank = _rank()
    name = step_dirname(step)
    final = root / name
    tmp = root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save
        (tmp / "rng").mkdir(parents=True)
    _barrier()

    state = _train_state_dicts(model, optimizer)
    with _quiet_dcp():
        _dcp().save(state, checkpoint_id=str(tmp / STATE_DIR))
    torch.save(rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")
    _barrier()

    if rank == 0:
        record = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": _world(),
            "saved_at": time.time(),
            **trainer_state,
        }
        write_json(tmp / TRAINER_FILE, record)
        if config_yaml is not None:
            _write_text(tmp / CONFIG_FILE, config_yaml)
        fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (after resuming from an earlier one): swap, then drop the old copy.
            old = root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        _write_text(root / LATEST, name + "\n")
        fsync_dir(root)
        if keep_last > 0:
            prune_checkpoints(root, keep_last)
    _barrier()
    return final


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    root = Path(root)
    pointer = root / LATEST
    protected = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    removed = []
    for _, path in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if path.name == protected:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ---------------------------------------------------------------------- load
def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load model (and optimizer) state from checkpoint ``path`` into the
    (possibly sharded) ``model``/``optimizer``; collective with several ranks.

    Returns the trainer state (``trainer.json``). RNG states are restored when
    the checkpoint was written by as many ranks as now run; otherwise they are
    left as they are (nothing in training draws random numbers after init).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = resolve_checkpoint(path)
    state = _train_state_dicts(model, optimizer)
    with _quiet_dcp():
        _dcp().load(state, checkpoint_id=str(path / STATE_DIR))
    set_model_state_dict(model, state["model"], options=_options())
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_options())
    trainer = read_trainer_state(path)
    rng_file = path / "rng" / f"rank{_rank():05d}.pt"
    if restore_rng and trainer.get("world_size") == _world() and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Only the model weights of a trainer checkpoint, into ``model`` (any sharding)."""
    load_checkpoint(path, model, optimizer=None, restore_rng=False)


def checkpoint_config(path: str | os.PathLike):
    """The resolved :class:`olmo2.train.config.TrainConfig` saved with a checkpoint."""
    path = resolve_checkpoint(path)
    return TrainConfig.load(path / CONFIG_FILE)


def load_model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                               dtype: torch.dtype | None = None):
    """An unsharded :class:`olmo2.Olmo2ForCausalLM` with the weights of a trainer checkpoint."""
    path = resolve_checkpoint(path)
    config = checkpoint_config(path).model
    model = Olmo2ForCausalLM.from_config(config, device="meta")
    model.to_empty(device=device)
    load_model_weights(path, model)
    if dtype is not None:
        model.to(dtype)
    return model


# ---------------------------------------------------------------------- HF export
def export_hf(model: nn.Module, out_dir: str | os.PathLike, tokenizer_json: str | None = None) -> Path | None:
    """Write the (possibly sharded) model in Hugging Face format to ``out_dir``
    (collective: gathers a full fp32 CPU state dict, rank 0 writes). Returns the
    folder on rank 0, None on the others."""
    full = model_state_dict(model, full=True)
    if _rank() != 0:
        _barrier()
        return None
    config = model.config if hasattr(model, "config") else None
    if config is None:
        raise TypeError(f"export_hf: model must carry an Olmo2Config as .config, got {type(model).__name__}")
    plain = Olmo2ForCausalLM.from_config(config, device="meta")
    plain.load_state_dict(full, assign=True)
    out = Path(out_dir)
    save_pretrained(plain, out)
    if tokenizer_json is not None:
        atomic_copy(tokenizer_json, out / "tokenizer.json")
    _barrier()
    return out


# ---------------------------------------------------------------------- the trainer's component
class Checkpointer:
    """When and where the trainer saves: every ``interval`` steps before the
    last, once at the end (``save_final``), keeping the newest ``keep_last``.

    ``state()`` gives the trainer state to store (step excluded),
    ``config_yaml`` is the resolved config saved beside each checkpoint, and
    ``log`` receives one line per checkpoint written.
    """

    def __init__(self, root: str | os.PathLike, cfg: CheckpointConfig, max_steps: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer, state: Callable[[], dict[str, Any]], config_yaml: str,
                 log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.max_steps = max_steps
        self.model = model
        self.optimizer = optimizer
        self.state = state
        self.config_yaml = config_yaml
        self.log = log

    def save(self, step: int) -> Path:
        path = save_checkpoint(self.root, step, self.model, self.optimizer, self.state(),
                               config_yaml=self.config_yaml, keep_last=self.cfg.keep_last)
        self.log(f"step {step}: checkpoint {path}")
        return path

    def maybe_save(self, step: int) -> Path | None:
        """Save at the interval's steps (the last step is left to :meth:`save_final`)."""
        if self.cfg.interval and step % self.cfg.interval == 0 and step < self.max_steps:
            return self.save(step)
        return None

    def save_final(self, step: int) -> Path | None:
        """The checkpoint of the last step (saved unless it already exists); None when disabled."""
        if not self.cfg.save_final or step == 0:
            return None
        have = list_checkpoints(self.root)
        if not have or have[-1][0] != step:
            return self.save(step)
        return self.root / step_dirname(step)
