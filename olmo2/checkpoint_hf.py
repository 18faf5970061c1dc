"""Hugging Face checkpoint folders: load and save OLMo 2 in the layout
``transformers.Olmo2ForCausalLM`` reads and writes.

A folder holds ``config.json``, ``generation_config.json`` (the special token
ids, as ``transformers`` writes it; OLMo-core's ``load_hf_model`` requires it)
and either ``model.safetensors`` or shards ``model-00001-of-0000N.safetensors``
with ``model.safetensors.index.json``.
Tensor names are those of ``transformers.Olmo2ForCausalLM``, which are also
our parameter names.

Loading reads every shard's header first and checks names and shapes against
the config before any weight is read; then it builds the model on the meta
device and loads one tensor at a time straight into place, so memory peaks at
the model plus one tensor, never twice the model.

Saving writes into a temporary sibling folder and renames it into place: a
reader sees the old checkpoint or the new one, never a mix. Files in an
existing target folder that are not part of a checkpoint (``tokenizer.json``,
a README, ...) are carried over (hard-linked when possible).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .config import Olmo2Config
from .dtypes import DTYPE_NAMES
from .files import atomic_write
from .model import Olmo2ForCausalLM

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
# Files that belong to a checkpoint's weights: replaced, never carried over.
_CHECKPOINT_FILE_RE = re.compile(
    r"^(config\.json|generation_config\.json|model\.safetensors|model\.safetensors\.index\.json"
    r"|model-\d{5}-of-\d{5}\.safetensors|pytorch_model.*\.bin(\.index\.json)?)$"
)
# Non-persistent buffers that some exporters wrote; they hold no weights.
_IGNORED_KEY_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------- which config field sets a dim
def _dim_fields(name: str) -> tuple[str, ...] | None:
    """The config fields that set each dim of tensor ``name`` (for error messages)."""
    q, kv = "num_attention_heads * head_dim", "num_key_value_heads * head_dim"
    table = {
        "model.embed_tokens.weight": ("vocab_size", "hidden_size"),
        "lm_head.weight": ("vocab_size", "hidden_size"),
        "model.norm.weight": ("hidden_size",),
        "self_attn.q_proj.weight": (q, "hidden_size"),
        "self_attn.k_proj.weight": (kv, "hidden_size"),
        "self_attn.v_proj.weight": (kv, "hidden_size"),
        "self_attn.o_proj.weight": ("hidden_size", q),
        "self_attn.q_norm.weight": (q,),
        "self_attn.k_norm.weight": (kv,),
        "mlp.gate_proj.weight": ("intermediate_size", "hidden_size"),
        "mlp.up_proj.weight": ("intermediate_size", "hidden_size"),
        "mlp.down_proj.weight": ("hidden_size", "intermediate_size"),
        "post_attention_layernorm.weight": ("hidden_size",),
        "post_feedforward_layernorm.weight": ("hidden_size",),
    }
    if name in table:
        return table[name]
    match = re.match(r"^model\.layers\.\d+\.(.+)$", name)
    return table.get(match.group(1)) if match else None


def _shape_mismatch(name: str, found: tuple, expected: tuple, config: Olmo2Config) -> str:
    msg = f"{name}: checkpoint shape {found}, config expects {expected}"
    fields = _dim_fields(name)
    if fields and len(found) == len(expected):
        hints = []
        for dim, (f, e, field_names) in enumerate(zip(found, expected, fields)):
            if f != e:
                hints.append(f"dim {dim} is {field_names} = {e} in config.json, {f} in the weights")
        if hints:
            msg += " (" + "; ".join(hints) + ")"
    return msg


def _layer_hint(names: list[str], config: Olmo2Config, present: bool) -> str:
    layers = sorted({int(m.group(1)) for n in names if (m := re.match(r"^model\.layers\.(\d+)\.", n))})
    if not layers:
        return ""
    where = "the checkpoint has" if present else "the checkpoint lacks"
    return f" ({where} layers {layers[0]}..{layers[-1]}; config.json says num_hidden_layers = {config.num_hidden_layers})"


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# --------------------------------------------------------------------------- loading
def _weight_files(folder: Path) -> dict[str, list[str]]:
    """Shard file name -> the tensor names the index assigns to it."""
    index_path = folder / SAFE_INDEX_NAME
    if index_path.is_file():
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ValueError(f"load_pretrained: {SAFE_INDEX_NAME} is not a valid index ({exc}) ({index_path})") \
                from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"load_pretrained: {index_path} has no 'weight_map' object")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        return files
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return {SAFE_WEIGHTS_NAME: []}
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"load_pretrained: {folder} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME} "
        f"(only safetensors checkpoints are read); it contains: {present}"
    )


def read_headers(folder: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Tensor name -> (shard file, shape, safetensors dtype), from the headers only."""
    from safetensors import safe_open

    folder = Path(folder)
    headers: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for file, indexed in _weight_files(folder).items():
        path = folder / file
        if not path.is_file():
            raise FileNotFoundError(f"load_pretrained: {SAFE_INDEX_NAME} names shard {file}, which is missing from {folder}")
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for name in keys:
                sl = f.get_slice(name)
                headers[name] = (file, tuple(sl.get_shape()), sl.get_dtype())
        lost = sorted(set(indexed) - keys)
        if lost:
            raise ValueError(f"load_pretrained: {SAFE_INDEX_NAME} places {_listing(lost)} in {file}, which lacks them")
    return headers


def check_tensors(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], config: Olmo2Config
) -> None:
    """Raise one ValueError naming every missing, unexpected or misshapen tensor."""
    found = {k: v for k, v in found.items() if not _IGNORED_KEY_RE.search(k)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        _shape_mismatch(n, tuple(found[n]), tuple(expected[n]), config)
        for n in expected
        if n in found and tuple(found[n]) != tuple(expected[n])
    ]
    problems = []
    if missing:
        hint = _layer_hint(missing, config, present=False)
        if missing == ["lm_head.weight"]:
            hint = " (a tied-embedding checkpoint? OLMo 2 has an untied lm_head)"
        problems.append(f"missing tensors: {_listing(missing)}{hint}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}{_layer_hint(unexpected, config, present=True)}")
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong[:8]) + (f"; ... ({len(wrong)} in all)" if len(wrong) > 8 else ""))
    if problems:
        raise ValueError("load_pretrained: the checkpoint does not match its config: " + " | ".join(problems))


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attn_backend: str | None = None,
) -> Olmo2ForCausalLM:
    """Load a Hugging Face OLMo 2 folder into :class:`Olmo2ForCausalLM`.

    ``dtype`` None keeps the stored dtype; ``device`` defaults to CPU (tensors
    are read straight onto it). ``attn_backend`` overrides the config's.
    """
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"load_pretrained: path {folder} is not a folder")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"load_pretrained: dtype must be a floating torch.dtype or None, got {dtype!r}")
    overrides = {} if attn_backend is None else {"attn_backend": attn_backend}
    config = Olmo2Config.from_hf(folder, **overrides)
    device = torch.device("cpu" if device is None else device)

    headers = read_headers(folder)
    with torch.device("meta"):
        model = Olmo2ForCausalLM(config)
    if attn_backend is not None:
        model.set_attn_backend(attn_backend)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    check_tensors({n: h[1] for n, h in headers.items()}, expected, config)

    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(headers[name][0], []).append(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    target = str(device)
    for file, names in by_file.items():
        with safe_open(str(folder / file), framework="pt", device=target) as f:
            for name in names:
                tensor = f.get_tensor(name)
                if dtype is not None and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                _assign(model, name, tensor)
    return model


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


# --------------------------------------------------------------------------- saving
def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"save_pretrained: max_shard_size must be positive, got {size}")
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if m:
            unit = (m.group(2) or "B").upper()
            scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                     "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
            value = int(float(m.group(1)) * scale)
            if value > 0:
                return value
    raise ValueError(f"save_pretrained: max_shard_size must be a positive int or a size like '5GB', got {size!r}")


def _plan_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _fsync(path: Path) -> None:
    """Persist a file another library wrote (safetensors streams shards itself)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: object) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def generation_config(config: Olmo2Config) -> dict:
    """The ``generation_config.json`` of a checkpoint: its special token ids (those
    that are set), as ``transformers`` derives it from the model config."""
    out: dict = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key) is not None:
            out[key] = getattr(config, key)
    return out


def tokenizer_config(chat_template: str) -> dict:
    """The ``tokenizer_config.json`` that carries a chat template (with the
    bos/eos/pad tokens it names), read by ``transformers.AutoTokenizer`` beside a
    ``tokenizer.json``; as OLMo 2 Instruct's, bos and eos are ``<|endoftext|>``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }


def save_pretrained(
    model: Olmo2ForCausalLM,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    chat_template: str | None = None,
) -> None:
    """Write ``model`` as a Hugging Face OLMo 2 folder at ``path``.

    With ``chat_template`` (e.g. :data:`olmo2.chat.CHAT_TEMPLATE`), also a
    ``tokenizer_config.json`` holding it (the tokenizer.json is written by
    :func:`olmo2.tokenizers.save_tokenizer`).

    Shards of at most ``max_shard_size`` bytes (one tensor larger than that
    gets a shard of its own). Tensors are copied to CPU one shard at a time.
    The model must hold full (unsharded) tensors.
    """
    from safetensors.torch import save_file

    if not isinstance(model, Olmo2ForCausalLM):
        raise TypeError(f"save_pretrained: model must be an Olmo2ForCausalLM, got {type(model).__name__}")
    limit = parse_size(max_shard_size)
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_pretrained: path {target} exists and is not a folder")
    state = {name: p.detach() for name, p in model.named_parameters()}
    meta = [n for n, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"save_pretrained: tensors on the meta device have no values: {_listing(meta)}")
    sizes = {name: t.numel() * t.element_size() for name, t in state.items()}
    shards = _plan_shards(sizes, limit)
    dtypes = Counter(t.dtype for t in state.values())
    dtype_name = DTYPE_NAMES.get(dtypes.most_common(1)[0][0])

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_json(tmp / CONFIG_NAME, model.config.to_hf(dtype=dtype_name))
        _write_json(tmp / GENERATION_CONFIG_NAME, generation_config(model.config))
        if chat_template is not None:
            _write_json(tmp / "tokenizer_config.json", tokenizer_config(chat_template))
        # safetensors may create files owner-only; give shards the mode that
        # plain open() gave config.json under the user's umask.
        file_mode = (tmp / CONFIG_NAME).stat().st_mode & 0o777
        weight_map = {}
        for i, names in enumerate(shards):
            file = SAFE_WEIGHTS_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: state[n].to("cpu").contiguous() for n in names}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
            os.chmod(tmp / file, file_mode)
            _fsync(tmp / file)
            weight_map.update({n: file for n in names})
        if len(shards) > 1:
            _write_json(tmp / SAFE_INDEX_NAME, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``, keeping target's other files."""
    if not target.exists():
        os.replace(tmp, target)
        return
    for entry in target.iterdir():
        if _CHECKPOINT_FILE_RE.match(entry.name) or (tmp / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), tmp / entry.name)
        else:
            _link_or_copy(str(entry), str(tmp / entry.name))
    backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, backup)
    os.replace(tmp, target)
    shutil.rmtree(backup, ignore_errors=True)
