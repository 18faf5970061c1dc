"""Model souping: average the weights of several checkpoints (the command is
:mod:`olmo2.cli.soup`: ``olmo2-soup runs/anneal-a runs/anneal-b --out runs/soup``).

OLMo 2's final models are the plain mean of the weights of several stage-2
(annealing) runs. Each input is a trainer checkpoint (a ``stepXXXXXXXX``
folder, a ``checkpoints`` folder or a run folder: its ``latest``) or a Hugging
Face checkpoint folder (``config.json`` + safetensors). Every input must have
the same architecture; tensors are summed in fp32, one checkpoint in memory at
a time, divided by their number, and written in Hugging Face format (the
dtype of the first input unless ``--dtype`` says otherwise) to a temporary
folder that is then renamed to ``--out``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint_hf import load_pretrained, save_pretrained
from .files import atomic_copy
from .model import Olmo2ForCausalLM
from .train.checkpoint import load_model_from_checkpoint

def _is_hf(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_weights(path: str | os.PathLike):
    """``(config, state_dict)`` of a trainer or Hugging Face checkpoint, on CPU."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"olmo2-soup: checkpoint {p} does not exist")
    model = load_pretrained(p) if _is_hf(p) else load_model_from_checkpoint(p)
    return model.config, {k: v.detach() for k, v in model.state_dict().items()}


def _architecture(config) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim")
    return {k: getattr(config, k) for k in keys}


def soup(paths: Sequence[str | os.PathLike], out: str | os.PathLike, dtype: torch.dtype | None = None,
         tokenizer: str | os.PathLike | None = None) -> Path:
    """Average the checkpoints ``paths`` into a Hugging Face checkpoint at ``out``."""
    if len(paths) < 1:
        raise ValueError("olmo2-soup: give at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    first_config = None
    first_dtypes: dict[str, torch.dtype] = {}
    for i, path in enumerate(paths):
        config, state = load_weights(path)
        if first_config is None:
            first_config = config
            first_dtypes = {k: v.dtype for k, v in state.items()}
            total = {k: v.to(torch.float32).clone() for k, v in state.items()}
            continue
        if _architecture(config) != _architecture(first_config):
            raise ValueError(
                f"olmo2-soup: {path} has architecture {_architecture(config)}, "
                f"but {paths[0]} has {_architecture(first_config)}"
            )
        if set(state) != set(total):
            raise ValueError(f"olmo2-soup: {path} has tensors {sorted(set(state) ^ set(total))[:5]} that "
                             f"{paths[0]} does not (or the reverse)")
        for k, v in state.items():
            total[k].add_(v.to(torch.float32))
        del state
    n = float(len(paths))
    averaged = {k: (v / n).to(dtype or first_dtypes[k]) for k, v in total.items()}
    model = Olmo2ForCausalLM.from_config(first_config, device="meta")
    model.load_state_dict(averaged, assign=True)

    out = Path(out)
    # A Hugging Face input's tokenizer, or the one a run exported next to its weights.
    candidates = [Path(p) / name for p in paths for name in ("tokenizer.json", "hf/tokenizer.json")]
    tok = Path(tokenizer) if tokenizer else next((c for c in candidates if c.is_file()), None)
    save_pretrained(model, out)
    if tok is not None:
        if not tok.is_file():
            raise FileNotFoundError(f"olmo2-soup: --tokenizer {tok} does not exist")
        atomic_copy(tok, out / "tokenizer.json")
    return out
