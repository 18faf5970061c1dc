"""Trainer checkpoints: everything needed to continue a run exactly, written
atomically, readable by any number of ranks.

Layout of ``<run_dir>/checkpoints``::

    step00000100/
        state/            model and optimizer (torch.distributed.checkpoint)
        rng/rank00000.pt  python, numpy, torch CPU and CUDA RNG states of each rank
        trainer.json      step, tokens seen, data position, spike-detector and
                          other callback state, the last learning rate, the
                          learning-rate schedule that produced the checkpoint
        config.yaml       the resolved TrainConfig
        tokenizer.json    the tokenizer of the training data, when known
        manifest.json     every other file's size and sha256; written last
    step00000200/
    latest                the name of the newest complete checkpoint
    damaged-step00000300/ a checkpoint that failed verification, moved aside on resume

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
beyond ``keep_last`` are deleted after ``latest`` moves (never the one
``latest`` names, nor the newest saved from finite state). With several ranks
the run folder must be on a file system all ranks share. A save that fails
(a full disk: ``OSError`` ENOSPC naming the folder) removes its temporary
folder and leaves the older checkpoints as they were.

Failures with several ranks: each step of a save that can fail on some ranks
only (rank 0 making the folder, a rank's RNG file, rank 0's small files, manifest
and rename) ends in an agreement, one ``all_gather_object`` of a short string per
step, so when one rank fails every rank raises the same one-line
:class:`CheckpointError` naming the checkpoint, the rank and its error, within
seconds (not after the process-group timeout, 30 minutes on NCCL, in a barrier
the failed rank never reached), with the temporary folder already removed. Loads
agree the same way: verification and trainer.json are read on rank 0 and
broadcast, and a local problem on one rank (its RNG file) is raised on every rank,
so :func:`load_newest_good` falls back to the same checkpoint everywhere.

Verification: ``manifest.json`` lists each file's size and sha256 and is
written last, into the temporary folder, before the rename. Loading checks it
first (``checkpoint.verify``: ``checksum``, or ``size`` for sizes only); a
mismatch, a load error or non-finite weights or optimizer state raise
:class:`CheckpointError`, one line naming the checkpoint and the file.
:func:`load_newest_good` then falls back to the newest checkpoint that loads,
saying so, and refuses rather than start from scratch when none does. Cost:
sha256 at about 0.5 GB/s per core (measured; :mod:`olmo2.files`), in up to 8
threads; the 1B's 18 GB of fp32 model + AdamW state is about 35 s on one core,
next to the minutes of writing it. Checkpoints written before manifests existed
load with a warning, after a structural check (DCP metadata readable, every
shard as long as the metadata says).
Nothing is saved from non-finite state (:func:`save_checkpoint` checks first).

Saving in the background (``checkpoint.async_save``; :func:`save_checkpoint_async`,
:class:`Checkpointer`): the model and optimizer state is copied into host memory
while training waits (DCP's stager), then written by a background thread while
training goes on; the temporary folder, manifest, rename and ``latest`` are as
above and happen only once every rank's write is complete, so a crash or an
error during the write leaves the previous checkpoint as it was. At most one
save is in flight; a failure stops the run at the next step with one line.
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
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint_hf import save_pretrained
from ..files import HASH_NAME, atomic_copy, atomic_write, disk_full_error, file_digests, fsync_dir
from ..model import Olmo2ForCausalLM
from .config import VERIFY_LEVELS, CheckpointConfig, TrainConfig
from .stability import NonFiniteStateError, first_nonfinite

LATEST = "latest"
STATE_DIR = "state"
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
DAMAGED_PREFIX = "damaged-"
_STEP_RE = re.compile(r"^step(\d{8,})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that fails verification or cannot be loaded. The message is one
    line: ``checkpoint <folder>: <file> <problem> (<path of the file>)``."""

    def __init__(self, message: str, checkpoint: str | os.PathLike | None = None, file: str | None = None):
        super().__init__(message)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.file = file


def _damaged(path: Path, file: str, problem: str) -> CheckpointError:
    target = path / file if file else path
    return CheckpointError(f"checkpoint {path.name}: {file} {problem} ({target})", path, file)


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
def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint folder (it holds trainer.json or manifest.json)."""
    path = Path(path)
    return path.is_dir() and ((path / TRAINER_FILE).is_file() or (path / MANIFEST_FILE).is_file())


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Checkpoints under ``root`` (renamed into place, so complete unless damaged
    since) as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and is_checkpoint(child):
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


def checkpoint_root(path: str | os.PathLike) -> Path | None:
    """The folder of step checkpoints that ``path`` means: ``path`` itself (a
    ``checkpoints`` folder) or ``path/checkpoints`` (a run folder); None if neither."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if list_checkpoints(root):
            return root
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints`` folder or a
    run folder (their newest checkpoint; not verified here)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    root = checkpoint_root(path)
    if root is not None:
        return list_checkpoints(root)[-1][1]
    raise FileNotFoundError(
        f"{path} is not a trainer checkpoint (no {TRAINER_FILE}) nor a run or checkpoints folder holding one"
    )


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """``trainer.json`` of a checkpoint; :class:`CheckpointError` naming it when unreadable."""
    path = Path(path)
    try:
        with open(path / TRAINER_FILE, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise _damaged(path, TRAINER_FILE, "is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(path, TRAINER_FILE, f"is not valid JSON ({exc})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise _damaged(path, TRAINER_FILE, "holds no trainer state (no 'step')")
    return state


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


# ---------------------------------------------------------------------- manifest
def write_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Write ``manifest.json`` into ``folder``: every other file's size and sha256."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    digests = file_digests(files)
    manifest = {
        "format_version": FORMAT_VERSION,
        "hash": HASH_NAME,
        "files": {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, HASH_NAME: d}
                  for p, d in zip(files, digests)},
    }
    write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's manifest, None when it has none (written before manifests)."""
    path = Path(path)
    file = path / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(path, MANIFEST_FILE, f"is not valid JSON ({exc})") from None
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict) or not entries or manifest.get("hash") != HASH_NAME or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get(HASH_NAME), str)
            for e in entries.values()):
        raise _damaged(path, MANIFEST_FILE, f"is not a manifest (expected 'files' with sizes and {HASH_NAME})")
    return manifest


def verify_checkpoint(path: str | os.PathLike, level: str = "checksum") -> bool:
    """Check a checkpoint folder against its manifest: every file present, of its size
    and (``level="checksum"``) its sha256. Raises :class:`CheckpointError` naming the
    first bad file. Returns False for a checkpoint without a manifest (written
    before them), after a structural check (:func:`check_structure`)."""
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify_checkpoint: level must be one of {VERIFY_LEVELS}, got {level!r}")
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        check_structure(path)
        return False
    entries = manifest["files"]
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            raise _damaged(path, name, "is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise _damaged(path, name, f"is {size} bytes, the manifest says {entry['size']}")
    if level == "checksum":
        names = list(entries)
        for name, digest in zip(names, file_digests(path / n for n in names)):
            if digest != entries[name][HASH_NAME]:
                raise _damaged(path, name, f"does not match its {HASH_NAME} in {MANIFEST_FILE} (the bytes changed)")
    return True


def check_structure(path: str | os.PathLike) -> None:
    """What can be checked without a manifest: trainer.json parses, the DCP metadata
    reads, and every shard is as long as the metadata says."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    read_trainer_state(path)
    state = path / STATE_DIR
    metadata_file = f"{STATE_DIR}/.metadata"
    if not (state / ".metadata").is_file():
        raise _damaged(path, metadata_file, "is missing")
    try:
        metadata = FileSystemReader(str(state)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is damage
        raise _damaged(path, metadata_file, f"cannot be read ({_first_line(exc)})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(needed.items()):
        file = state / rel
        if not file.is_file():
            raise _damaged(path, f"{STATE_DIR}/{rel}", "is missing")
        size = file.stat().st_size
        if size < end:
            raise _damaged(path, f"{STATE_DIR}/{rel}", f"is {size} bytes, shorter than the {end} its metadata needs")


def _first_line(exc: BaseException) -> str:
    inner = _unwrap(exc)
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0]}" if text else type(inner).__name__


def _unwrap(exc: BaseException) -> BaseException:
    """The first per-rank exception inside DCP's ``CheckpointException``, else ``exc``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return exc


# ---------------------------------------------------------------------- save
def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], config_yaml: str | None = None, keep_last: int = 0,
                    tokenizer_json: str | os.PathLike | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` (collective: every rank calls it).

    See the module docstring for the layout and the atomicity guarantee.
    Refuses (:class:`NonFiniteStateError`) when the weights or the optimizer
    state hold NaN or infinity. Returns the final folder.
    """
    root, tmp, final = _begin_save(root, step, model, optimizer)
    record = _trainer_record(step, trainer_state)

    def write_state() -> None:
        state = _train_state_dicts(model, optimizer)
        with _quiet_dcp():
            _dcp().save(state, checkpoint_id=str(tmp / STATE_DIR))
        torch.save(rng_state(), tmp / "rng" / f"rank{_rank():05d}.pt")

    _save_step(tmp, final, write_state)
    _save_step(tmp, final, lambda: _finish_on_rank0(root, tmp, final, record, config_yaml, tokenizer_json, keep_last))
    return final


def _begin_save(root: str | os.PathLike, step: int, model: nn.Module,
                optimizer: torch.optim.Optimizer | None) -> tuple[Path, Path, Path]:
    """Refuse non-finite state; rank 0 makes an empty temporary folder (collective)."""
    root = Path(root)
    bad = first_nonfinite(model, optimizer)
    if bad is not None:
        raise NonFiniteStateError(f"step {step}: {bad} holds NaN or infinity; not saving a checkpoint of it ({root})")
    name = step_dirname(step)
    tmp = root / f".tmp-{name}"

    def make_folder() -> None:
        if _rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash during an earlier save
            (tmp / "rng").mkdir(parents=True)

    _save_step(tmp, root / name, make_folder)
    return root, tmp, root / name


def _failure_text(exc: BaseException, tmp: Path) -> str:
    """One line for a failed save step: the disk-full line naming the folder, else the exception's first line."""
    full = disk_full_error(_unwrap(exc), tmp)
    if full is not None:
        return f"no space left on device ({full.filename})"
    return _first_line(exc)


def _agree_on_failure(exc: BaseException | None, describe: Callable[[BaseException], str],
                      group: dist.ProcessGroup | None = None) -> tuple[int, str] | None:
    """Collective over ``group``: the lowest rank whose step raised and its one-line
    description, the same on every rank; None when no rank failed. One
    ``all_gather_object`` of a short string (or None) per call: a barrier too."""
    mine = None if exc is None else describe(exc)
    texts: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(texts, mine, group=group)
    for rank, text in enumerate(texts):
        if text is not None:
            return rank, text
    return None


def _save_step(tmp: Path, final: Path, step: Callable[[], None], group: dist.ProcessGroup | None = None) -> None:
    """Run one step of a save on every rank (it may do nothing on some) and agree on
    the outcome. In one process a failure is :func:`_discard`-ed (the temporary folder
    removed, the error re-raised, a full disk as ``OSError`` ENOSPC naming the folder).
    With several ranks, when the step raised on any rank, rank 0 removes the temporary
    folder and every rank raises the same :class:`CheckpointError`, naming the
    checkpoint, the rank that failed and its error, within the time of one collective
    (before, the other ranks waited in a barrier until the process-group timeout)."""
    exc: BaseException | None = None
    try:
        step()
    except BaseException as caught:  # noqa: BLE001 - agreed on below, then raised on every rank
        exc = caught
    if _world() == 1:
        if exc is not None:
            _discard(tmp, exc)
        return
    failed = _agree_on_failure(exc, lambda e: _failure_text(e, tmp), group)
    if failed is None:
        return
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier(group=group)  # the folder is gone when any rank reports the failure
    if exc is not None and not isinstance(exc, Exception):
        raise exc  # KeyboardInterrupt or SystemExit on this rank: as it is
    rank, text = failed
    raise CheckpointError(f"saving checkpoint {final.name} failed on rank {rank} of {_world()}: {text}; "
                          f"the temporary folder is removed, the older checkpoints are as they were ({tmp})",
                          final)


def _trainer_record(step: int, trainer_state: dict[str, Any]) -> dict[str, Any]:
    """trainer.json's content, a copy taken now (the trainer moves on while an async save writes it)."""
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, "step": step, "world_size": _world(),
                                  "saved_at": time.time(), "finite": True, **trainer_state}))


def _write_rest(tmp: Path, record: dict[str, Any], config_yaml: str | None,
                tokenizer_json: str | os.PathLike | None) -> None:
    """Rank 0, after every rank's state and RNG are written: the small files, then the manifest."""
    write_json(tmp / TRAINER_FILE, record)
    if config_yaml is not None:
        _write_text(tmp / CONFIG_FILE, config_yaml)
    if tokenizer_json is not None:
        atomic_copy(tokenizer_json, tmp / TOKENIZER_FILE)
    write_manifest(tmp)  # last: a folder with a valid manifest is complete
    fsync_dir(tmp)


def _finish_on_rank0(root: Path, tmp: Path, final: Path, record: dict[str, Any], config_yaml: str | None,
                     tokenizer_json: str | os.PathLike | None, keep_last: int) -> None:
    """Rank 0, once every rank's state and RNG are written: the small files and the
    manifest, then the rename into place (:func:`_publish`)."""
    if _rank() == 0:
        _write_rest(tmp, record, config_yaml, tokenizer_json)
        _publish(root, tmp, final, keep_last)


def _discard(tmp: Path, exc: BaseException) -> None:
    """A failed save: rank 0 removes the incomplete folder (freeing its space); re-raise,
    as the disk-full error naming the folder when that is the cause."""
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    full = disk_full_error(_unwrap(exc), tmp)
    if full is not None:
        raise full from None
    raise exc


def _publish(root: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0: rename the complete folder into place, point ``latest`` at it, prune."""
    name = final.name
    if final.exists():
        # Re-saving a step (after resuming from an earlier one): swap, then drop the old copy.
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)  # put the old copy back where it was
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    _write_text(root / LATEST, name + "\n")
    fsync_dir(root)
    if keep_last > 0:
        prune_checkpoints(root, keep_last)


# ---------------------------------------------------------------------- async save
class AsyncSave:
    """One checkpoint being written in the background (:func:`save_checkpoint_async`).

    ``future`` resolves to the final folder once this rank's part is written
    (on rank 0: once the checkpoint is complete, manifest and rename
    included), or raises what went wrong.
    """

    def __init__(self, step: int, tmp: Path, final: Path, future: Future) -> None:
        self.step = step
        self.tmp = tmp
        self.final = final
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def failed(self) -> bool:
        return self.future.done() and self.future.exception() is not None


def save_checkpoint_async(root: str | os.PathLike, step: int, model: nn.Module,
                          optimizer: torch.optim.Optimizer | None, trainer_state: dict[str, Any],
                          executor: ThreadPoolExecutor, config_yaml: str | None = None, keep_last: int = 0,
                          tokenizer_json: str | os.PathLike | None = None,
                          process_group: dist.ProcessGroup | None = None) -> AsyncSave:
    """Start writing checkpoint ``step`` in the background (collective); returns at once.

    In the caller's thread: the finiteness check, the temporary folder, the
    trainer record and RNG file (small), and a copy of the model and optimizer
    state into host memory (:func:`torch.distributed.checkpoint.async_save`'s
    stager), so training may change them right after. In ``executor``'s
    thread: DCP writes the copy (its collectives on ``process_group``, a gloo
    group other than the one training uses), then rank 0, once DCP's last
    collective says every rank's shards are written, adds trainer.json,
    config, tokenizer and manifest and renames the folder into place, as
    :func:`save_checkpoint` does. A failure removes the temporary folder and
    leaves the older checkpoints as they were; it is raised by ``future``.
    """
    root, tmp, final = _begin_save(root, step, model, optimizer)
    record = _trainer_record(step, trainer_state)
    if _world() == 1:
        # DCP's writer thread warns that it saves in one process, which is intended; the
        # filter must outlive this call (a catch_warnings block would end before the thread runs).
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized, "
                                                  r"assuming the intent is to save in a single process")
    # The RNG files first, agreed on, so no rank starts the background write (whose
    # collectives the others would never join) when one of them failed.
    _save_step(tmp, final, lambda: torch.save(rng_state(), tmp / "rng" / f"rank{_rank():05d}.pt"))
    started: list[Future] = []

    def stage() -> None:
        state = _train_state_dicts(model, optimizer)
        with _quiet_dcp():
            started.append(_dcp().async_save(state, checkpoint_id=str(tmp / STATE_DIR), process_group=process_group,
                                             no_dist=_world() == 1))

    # A copy that fails on one rank only (host memory) leaves the others' background
    # writes waiting in DCP's collectives until the write group's timeout.
    _save_step(tmp, final, stage)
    written = started[0]

    def finish() -> Path:
        # Collectives on process_group (the write group), never the training group.
        _save_step(tmp, final, written.result, process_group)
        _save_step(tmp, final, lambda: _finish_on_rank0(root, tmp, final, record, config_yaml, tokenizer_json,
                                                        keep_last), process_group)
        return final

    return AsyncSave(step, tmp, final, executor.submit(finish))


def _saved_finite(path: Path) -> bool:
    try:
        return read_trainer_state(path).get("finite") is True
    except CheckpointError:
        return False


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; never the one ``latest``
    names, nor the newest one saved from finite state."""
    root = Path(root)
    pointer = root / LATEST
    protected = {pointer.read_text(encoding="utf-8").strip()} if pointer.is_file() else set()
    checkpoints = list_checkpoints(root)
    for _, path in reversed(checkpoints):
        if _saved_finite(path):
            protected.add(path.name)
            break
    removed = []
    for _, path in checkpoints[:-keep_last] if keep_last > 0 else []:
        if path.name in protected:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ---------------------------------------------------------------------- load
def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result, or its CheckpointError
    (another exception, a file rank 0 cannot read, say: an ``OSError`` with its first
    line on every rank, rather than the other ranks waiting in the broadcast)."""
    if _world() == 1:
        return fn()
    out: list[Any] = [None]
    if _rank() == 0:
        try:
            out[0] = ("ok", fn())
        except CheckpointError as exc:
            out[0] = ("checkpoint", str(exc))
        except Exception as exc:  # noqa: BLE001 - raised below on every rank, as one line
            out[0] = ("other", _first_line(exc))
    dist.broadcast_object_list(out, src=0)
    kind, value = out[0]
    if kind == "checkpoint":
        raise CheckpointError(value)
    if kind == "other":
        raise OSError(f"rank 0 of {_world()}: {value}")
    return value


def _check_covers(path: Path, model_state: dict[str, Any]) -> None:
    """Refuse a checkpoint that lacks one of the model's state-dict entries: a resume
    allocates the model without initial values (:func:`olmo2.train.init.build_model`),
    so the load must fill all of it. (DCP's default planner refuses a missing key too;
    this says so before any tensor is read, and keeps holding if the planner changes.)"""
    try:
        saved = _dcp().FileSystemReader(str(path / STATE_DIR)).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001
        raise _damaged(path, STATE_DIR, f"has no readable metadata ({_first_line(exc)})") from None
    missing = [name for name in model_state if f"model.{name}" not in saved]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _damaged(path, STATE_DIR, f"lacks model parameter {missing[0]}{more}: it cannot fill this model")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True, verify: str = "checksum",
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Verify checkpoint ``path`` (:func:`verify_checkpoint`), load model (and
    optimizer) state into the (possibly sharded) ``model``/``optimizer`` and check
    it finite; collective with several ranks.

    Raises :class:`CheckpointError` (one line naming the checkpoint and the file)
    on any mismatch, load error or non-finite value. Returns the trainer state
    (``trainer.json``). RNG states are restored when the checkpoint was written by
    as many ranks as now run; otherwise they are left as they are (nothing in
    training draws random numbers after init). ``log`` gets the warning for a
    checkpoint without a manifest.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = resolve_checkpoint(path)
    verified = _on_rank0(lambda: verify_checkpoint(path, verify))
    if not verified and log is not None:
        log(f"warning: checkpoint {path} has no {MANIFEST_FILE} (saved before checkpoints were verified): "
            "loading it after a structural check only")
    trainer = _on_rank0(lambda: read_trainer_state(path))
    state = _train_state_dicts(model, optimizer)
    _load_step(path, lambda: _check_covers(path, state["model"]))
    try:
        with _quiet_dcp():
            _dcp().load(state, checkpoint_id=str(path / STATE_DIR))
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise _damaged(path, STATE_DIR, f"cannot be loaded ({_first_line(exc)})") from None
    set_model_state_dict(model, state["model"], options=_options())
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_options())
    bad = first_nonfinite(model, optimizer)
    if bad is not None:
        raise _damaged(path, STATE_DIR, f"holds NaN or infinity ({bad})")
    rng_file = path / "rng" / f"rank{_rank():05d}.pt"
    if restore_rng and trainer.get("world_size") == _world():
        def read_rng() -> dict[str, Any] | None:
            if not rng_file.is_file():
                return None
            try:
                return torch.load(rng_file, weights_only=False)
            except Exception as exc:  # noqa: BLE001
                raise _damaged(path, f"rng/{rng_file.name}", f"cannot be loaded ({_first_line(exc)})") from None

        rng = _load_step(path, read_rng)
        if rng is not None:
            set_rng_state(rng)
    return trainer


def _load_step(path: Path, step: Callable[[], Any]) -> Any:
    """Run a local step of a load on every rank and agree on it: a :class:`CheckpointError`
    on any rank is raised on every rank with that rank's message (so
    :func:`load_newest_good` judges the checkpoint the same everywhere and moves on to
    the same older one, instead of the ranks parting ways in the next collective)."""
    try:
        result, exc = step(), None
    except CheckpointError as caught:
        result, exc = None, caught
    if _world() == 1:
        if exc is not None:
            raise exc
        return result
    failed = _agree_on_failure(exc, str)
    if failed is None:
        return result
    rank, text = failed
    raise CheckpointError(f"rank {rank} of {_world()}: {text}", path) from None


def load_newest_good(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     restore_rng: bool = True, verify: str = "checksum", log: Callable[[str], None] = print,
                     move_damaged: bool = False) -> tuple[Path | None, dict[str, Any] | None]:
    """Load the newest checkpoint that verifies and loads (a checkpoint folder: that one only).

    ``path`` is a checkpoint folder, a ``checkpoints`` folder or a run folder. Each
    checkpoint that fails is reported through ``log`` (one line naming it and the
    file) and the next older one is tried; a fallback is said loudly. With
    ``move_damaged`` the failed newer ones are renamed ``damaged-stepXXXXXXXX``
    (kept for inspection, no longer resumed from or pruned) and ``latest`` is
    pointed at the one loaded. Returns ``(None, None)`` when there is no
    checkpoint at all; raises :class:`CheckpointError` when there are some and
    none loads (never a silent start from scratch).
    """
    path = Path(path)
    if is_checkpoint(path):
        return path, load_checkpoint(path, model, optimizer, restore_rng, verify, log)
    root = checkpoint_root(path)
    if root is None:
        return None, None
    failed: list[tuple[Path, CheckpointError]] = []
    for _, candidate in reversed(list_checkpoints(root)):
        try:
            state = load_checkpoint(candidate, model, optimizer, restore_rng, verify, log)
        except CheckpointError as exc:
            log(f"error: {exc}")
            failed.append((candidate, exc))
            continue
        if failed:
            names = ", ".join(p.name for p, _ in failed)
            moved = ""
            if move_damaged:
                targets: list[Path] = []

                def move_aside() -> None:
                    if _rank() == 0:
                        targets.extend(_move_damaged(p) for p, _ in failed)
                        _write_text(root / LATEST, candidate.name + "\n")

                run_agreed(move_aside, f"moving the damaged checkpoints of {root} aside")
                # The names rank 0 chose (another rank looking for a free name would race its renames).
                moved = "; moved aside as " + ", ".join(_on_rank0(lambda: [t.name for t in targets]))
            log(f"WARNING: FELL BACK to {candidate} because the newer checkpoint(s) {names} failed verification"
                f"{moved}; the steps after {state['step']} will be trained again")
        return candidate, state
    raise CheckpointError(
        f"no checkpoint in {root} can be loaded ({len(failed)} tried; newest: {failed[0][1]}); refusing to start "
        f"from scratch: move the damaged checkpoints away, or train under another run_name ({root})", root)


def run_agreed(step: Callable[[], None], what: str) -> None:
    """Collective: run ``step`` on every rank (rank 0 may be the only one that acts, as
    in a write of shared files) and agree: when it raised on any rank, every rank raises
    the same one-line ``OSError`` naming ``what``, the rank and its error, instead of
    the others waiting in the next barrier until the process-group timeout. In one
    process the error is raised as it is."""
    try:
        step()
        exc = None
    except Exception as caught:  # noqa: BLE001 - agreed on below
        exc = caught
    if _world() == 1:
        if exc is not None:
            raise exc
        return
    failed = _agree_on_failure(exc, _first_line)
    if failed is not None:
        rank, text = failed
        raise OSError(f"{what} failed on rank {rank} of {_world()}: {text}")


def _move_damaged(path: Path) -> Path:
    """Rank 0: rename a checkpoint that failed to ``damaged-<name>`` (``.2``, ... when taken)."""
    target = path.with_name(DAMAGED_PREFIX + path.name)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}.{n}")
    os.replace(path, target)
    return target


def load_model_weights(path: str | os.PathLike, model: nn.Module, verify: str = "checksum",
                       log: Callable[[str], None] | None = None) -> None:
    """Only the model weights of a trainer checkpoint, into ``model`` (any sharding), verified."""
    load_checkpoint(path, model, optimizer=None, restore_rng=False, verify=verify, log=log)


def checkpoint_config(path: str | os.PathLike):
    """The resolved :class:`olmo2.train.config.TrainConfig` saved with a checkpoint."""
    from .config import ConfigError

    path = resolve_checkpoint(path)
    if not (path / CONFIG_FILE).is_file():
        raise _damaged(path, CONFIG_FILE, "is missing")
    try:
        return TrainConfig.load(path / CONFIG_FILE)
    except ConfigError as exc:
        raise _damaged(path, CONFIG_FILE, f"is not a valid config ({exc})") from None


def _stderr(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)


def load_model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                               dtype: torch.dtype | None = None, verify: str = "checksum",
                               log: Callable[[str], None] = _stderr):
    """An unsharded :class:`olmo2.Olmo2ForCausalLM` with the verified weights of a
    trainer checkpoint; given a run or ``checkpoints`` folder, of its newest
    checkpoint that loads (a fallback is reported through ``log``)."""
    path = Path(path)
    candidates = [resolve_checkpoint(path)] if is_checkpoint(path) else \
        [p for _, p in reversed(list_checkpoints(checkpoint_root(path) or path))]
    if not candidates:
        resolve_checkpoint(path)  # raises FileNotFoundError with the reason
    failed: list[CheckpointError] = []
    for candidate in candidates:
        try:
            config = checkpoint_config(candidate).model
            model = Olmo2ForCausalLM.from_config(config, device="meta")
            model.to_empty(device=device)
            load_model_weights(candidate, model, verify=verify, log=log)
        except CheckpointError as exc:
            if len(candidates) == 1:
                raise
            log(f"error: {exc}")
            failed.append(exc)
            continue
        if failed:
            log(f"WARNING: FELL BACK to {candidate}: {len(failed)} newer checkpoint(s) failed verification")
        if dtype is not None:
            model.to(dtype)
        return model
    raise CheckpointError(f"no checkpoint in {path} can be loaded ({len(failed)} tried; newest: {failed[0]})", path)


# ---------------------------------------------------------------------- HF export
def export_hf(model: nn.Module, out_dir: str | os.PathLike, tokenizer_json: str | None = None) -> Path | None:
    """Write the (possibly sharded) model in Hugging Face format to ``out_dir``
    (collective: gathers a full fp32 CPU state dict, rank 0 writes). Returns the
    folder on rank 0, None on the others."""
    config = model.config if hasattr(model, "config") else None
    if config is None:
        raise TypeError(f"export_hf: model must carry an Olmo2Config as .config, got {type(model).__name__}")
    full = model_state_dict(model, full=True)
    out = Path(out_dir)

    def write() -> None:
        if _rank() == 0:
            plain = Olmo2ForCausalLM.from_config(config, device="meta")
            plain.load_state_dict(full, assign=True)
            save_pretrained(plain, out)
            if tokenizer_json is not None:
                atomic_copy(tokenizer_json, out / "tokenizer.json")

    run_agreed(write, f"writing the Hugging Face export {out}")
    return out if _rank() == 0 else None


# ---------------------------------------------------------------------- the trainer's component
class Checkpointer:
    """When and where the trainer saves: every ``interval`` steps before the
    last, once at the end (``save_final``), keeping the newest ``keep_last``.

    ``state()`` gives the trainer state to store (step excluded),
    ``config_yaml`` is the resolved config saved beside each checkpoint,
    ``tokenizer_json`` the tokenizer copied into it, ``hold()`` says why no
    checkpoint may be saved now (steps being skipped as non-finite) or None,
    and ``log`` receives one line per checkpoint written or held back.

    With ``checkpoint.async_save`` (default: on when the model is on a GPU) the
    interval saves are written in the background (:func:`save_checkpoint_async`):
    at most one in flight, a new save waiting for the previous one; the final
    save, the save on a signal and :meth:`close` wait for it. :meth:`poll`
    (each step, from :meth:`maybe_save`) learns when it is done, and raises
    :class:`CheckpointError` on every rank at the same step when it failed on
    any (the previous checkpoint is intact). With several ranks the ranks agree
    through a small all-reduce on a gloo group of their own, once per step
    while a save is in flight; DCP's background collectives use another.
    """

    def __init__(self, root: str | os.PathLike, cfg: CheckpointConfig, max_steps: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer, state: Callable[[], dict[str, Any]], config_yaml: str,
                 log: Callable[[str], None] = print, tokenizer_json: str | os.PathLike | None = None,
                 hold: Callable[[], str | None] = lambda: None) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.max_steps = max_steps
        self.model = model
        self.optimizer = optimizer
        self.state = state
        self.config_yaml = config_yaml
        self.log = log
        self.tokenizer_json = tokenizer_json
        self.hold = hold
        self.last_saved: int | None = None
        self.async_save = cfg.async_save if cfg.async_save is not None else _on_gpu(model)
        self.pending: AsyncSave | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._write_group = self._poll_group = None
        if self.async_save and _world() > 1:
            # Collective: every rank builds its Checkpointer at the same point.
            self._write_group = dist.new_group(backend="gloo")
            self._poll_group = dist.new_group(backend="gloo")

    def save(self, step: int) -> Path:
        """Save step ``step`` now and wait for it (after any save in flight)."""
        self.wait()
        path = save_checkpoint(self.root, step, self.model, self.optimizer, self.state(),
                               config_yaml=self.config_yaml, keep_last=self.cfg.keep_last,
                               tokenizer_json=self.tokenizer_json)
        self.last_saved = step
        self.log(f"step {step}: checkpoint {path}")
        return path

    def start_save(self, step: int) -> Path:
        """Save step ``step`` in the background (after any save in flight); its final folder."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="olmo2-checkpoint")
        self.pending = save_checkpoint_async(self.root, step, self.model, self.optimizer, self.state(),
                                             self._executor, config_yaml=self.config_yaml,
                                             keep_last=self.cfg.keep_last, tokenizer_json=self.tokenizer_json,
                                             process_group=self._write_group)
        self.last_saved = step
        return self.pending.final

    def _agree(self, done: bool, failed: bool) -> tuple[bool, bool]:
        """(every rank done, some rank failed)."""
        if self._poll_group is None:
            return done, failed
        flags = torch.tensor([int(done), int(failed)], dtype=torch.int64)
        dist.all_reduce(flags, group=self._poll_group)
        return int(flags[0]) == _world(), int(flags[1]) > 0

    def _fail(self, pending: AsyncSave) -> None:
        self.pending = None
        try:
            pending.future.result()
            cause = "it failed on another rank"
        except CheckpointError as exc:  # agreed on by the ranks: the same text on each
            cause = str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported as one line below
            cause = _first_line(exc)
        raise CheckpointError(
            f"step {pending.step}: saving checkpoint {pending.final.name} in the background failed ({cause}); "
            f"stopping; the newest complete checkpoint is {self.newest()} ({pending.tmp})", pending.final)

    def _finished(self, pending: AsyncSave) -> None:
        self.pending = None
        self.log(f"step {pending.step}: checkpoint {pending.final} (written in the background)")

    def poll(self) -> None:
        """Collective while a save is in flight: note it done, or raise when it failed."""
        pending = self.pending
        if pending is None:
            return
        all_done, failed = self._agree(pending.done(), pending.failed())
        if failed:
            self._fail(pending)
        if all_done:
            self._finished(pending)

    def wait(self) -> None:
        """Collective: wait for the save in flight; raise (every rank) when it failed."""
        pending = self.pending
        if pending is None:
            return
        futures_wait([pending.future])
        _, failed = self._agree(True, pending.failed())
        if failed:
            self._fail(pending)
        self._finished(pending)

    def close(self) -> None:
        """Local, for shutdown (also after an error; no collective): wait for the save in
        flight, saying how it ended."""
        pending, self.pending = self.pending, None
        if pending is not None:
            futures_wait([pending.future])
            if pending.failed():
                self.log(f"error: step {pending.step}: saving checkpoint {pending.final.name} in the background "
                         f"failed ({_first_line(pending.future.exception())}); the newest complete checkpoint is "
                         f"{self.newest()}")
            else:
                self.log(f"step {pending.step}: checkpoint {pending.final} (written in the background)")
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def newest(self) -> Path | None:
        found = list_checkpoints(self.root)
        return found[-1][1] if found else None

    def maybe_save(self, step: int) -> Path | None:
        """Save at the interval's steps (the last step is left to :meth:`save_final`),
        unless :attr:`hold` says not now; in the background with ``async_save``.
        First learns whether a save in flight has finished (:meth:`poll`)."""
        self.poll()
        if self.cfg.interval and step % self.cfg.interval == 0 and step < self.max_steps:
            reason = self.hold()
            if reason is not None:
                self.log(f"step {step}: checkpoint not saved: {reason} (newest: {self.newest()})")
                return None
            return self.start_save(step) if self.async_save else self.save(step)
        return None

    def save_now(self, step: int) -> Path | None:
        """Save step ``step`` unless it was just saved or :attr:`hold` forbids it (then None)."""
        self.wait()
        if step == 0 or self.hold() is not None:
            return None
        if self.last_saved == step:
            return self.root / step_dirname(step)
        return self.save(step)

    def save_final(self, step: int) -> Path | None:
        """The checkpoint of the last step (saved unless it already exists); None when disabled.
        Raises :class:`olmo2.train.stability.NonFiniteLossError` when the last steps were
        non-finite (nothing is saved from them)."""
        self.wait()
        if not self.cfg.save_final or step == 0:
            return None
        reason = self.hold()
        if reason is not None:
            from .stability import NonFiniteLossError

            raise NonFiniteLossError(f"step {step}: no final checkpoint saved: {reason} "
                                     f"(newest good checkpoint: {self.newest()})")
        have = list_checkpoints(self.root)
        if not have or have[-1][0] != step:
            return self.save(step)
        return self.root / step_dirname(step)


def _on_gpu(model: nn.Module) -> bool:
    param = next(model.parameters(), None)
    return param is not None and param.device.type == "cuda"
