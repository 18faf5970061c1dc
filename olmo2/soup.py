"""Model souping: average the weights of several checkpoints (the command is
:mod:`olmo2.cli.soup`: ``olmo2-soup runs/anneal-a runs/anneal-b --out runs/soup``).

OLMo 2's final models are the plain mean of the weights of several stage-2
(annealing) runs. Each input is a trainer checkpoint (a ``stepXXXXXXXX``
folder, a ``checkpoints`` folder or a run folder: its ``latest``) or a Hugging
Face checkpoint folder (``config.json`` + safetensors). Every input must have
the same architecture; tensors are summed in fp32, one checkpoint in memory at
a time, divided by their number, and written in Hugging Face format (the
dtype of the first input unless ``--dtype`` says otherwise) to a temporary
folder that is then renamed to ``--out``. ``--out`` may not be an input, lie
inside one, or hold one. Trainer checkpoints are verified as the trainer
verifies them (a run folder falls back past damaged checkpoints, saying so).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoint_hf import load_pretrained, save_pretrained
from .files import atomic_copy
from .model import Olmo2ForCausalLM
from .train.checkpoint import TOKENIZER_FILE, load_model_from_checkpoint, resolve_checkpoint


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

def _is_hf(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_weights(path: str | os.PathLike, log: Callable[[str], None] = _stderr):
    """``(config, state_dict)`` of a trainer or Hugging Face checkpoint, on CPU."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist ({p})")
    model = load_pretrained(p) if _is_hf(p) else load_model_from_checkpoint(p, log=log)
    return model.config, {k: v.detach() for k, v in model.state_dict().items()}


def _architecture(config) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim")
    return {k: getattr(config, k) for k in keys}


def check_out(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> None:
    """Refuse an ``out`` that is an input, lies inside one or holds one (it would be overwritten)."""
    target = Path(out).resolve()
    for path in paths:
        source = Path(path).resolve()
        if target == source or source in target.parents or target in source.parents:
            how = "is" if target == source else ("lies inside" if source in target.parents else "holds")
            raise ValueError(f"--out {out} {how} the input {path}: writing it would overwrite that input; "
                             f"choose another folder ({target})")


def soup(paths: Sequence[str | os.PathLike], out: str | os.PathLike, dtype: torch.dtype | None = None,
         tokenizer: str | os.PathLike | None = None, log: Callable[[str], None] = _stderr) -> Path:
    """Average the checkpoints ``paths`` into a Hugging Face checkpoint at ``out``
    (one path: a copy of it, in ``dtype``)."""
    if len(paths) < 1:
        raise ValueError("give at least one checkpoint")
    check_out(paths, out)
    total: dict[str, torch.Tensor] = {}
    first_config = None
    first_dtypes: dict[str, torch.dtype] = {}
    for i, path in enumerate(paths):
        config, state = load_weights(path, log)
        if first_config is None:
            first_config = config
            first_dtypes = {k: v.dtype for k, v in state.items()}
            total = {k: v.to(torch.float32).clone() for k, v in state.items()}
            continue
        if _architecture(config) != _architecture(first_config):
            raise ValueError(
                f"{path} has architecture {_architecture(config)}, "
                f"but {paths[0]} has {_architecture(first_config)} ({path})"
            )
        if set(state) != set(total):
            raise ValueError(f"{path} has tensors {sorted(set(state) ^ set(total))[:5]} that "
                             f"{paths[0]} does not (or the reverse) ({path})")
        for k, v in state.items():
            total[k].add_(v.to(torch.float32))
        del state
    n = float(len(paths))
    averaged = {k: (v / n).to(dtype or first_dtypes[k]) for k, v in total.items()}
    model = Olmo2ForCausalLM.from_config(first_config, device="meta")
    model.load_state_dict(averaged, assign=True)

    out = Path(out)
    tok = Path(tokenizer) if tokenizer else next((c for c in _tokenizer_candidates(paths) if c.is_file()), None)
    if tok is not None and not tok.is_file():
        raise FileNotFoundError(f"--tokenizer {tok} does not exist ({tok})")
    save_pretrained(model, out)
    if tok is not None:
        atomic_copy(tok, out / "tokenizer.json")
    return out


def _tokenizer_candidates(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """A Hugging Face input's tokenizer, the one a run exported next to its weights,
    or the one a trainer checkpoint carries."""
    out = []
    for p in map(Path, paths):
        out += [p / "tokenizer.json", p / "hf" / "tokenizer.json"]
        if not _is_hf(p):
            try:
                out.append(resolve_checkpoint(p) / TOKENIZER_FILE)
            except FileNotFoundError:
                pass
    return out
