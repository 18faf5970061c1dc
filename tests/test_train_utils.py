"""Helpers shared by the trainer tests: a synthetic token file and tiny configs.

The synthetic corpus is a stream of 60 random "words" (3 to 8 byte tokens)
drawn with Zipf frequencies, separated by a space token, with an EOS now and
then: structured enough that the ``olmo2-test`` model's loss falls within a
few dozen steps, and generated in milliseconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from omegaconf import OmegaConf

from olmo2.train.config import TrainConfig, resolve

EOS = 256
SPACE = 32


def synthetic_tokens(path: Path, n_tokens: int = 60_000, seed: int = 0, dtype=np.uint32) -> Path:
    rng = np.random.default_rng(seed)
    words = [rng.integers(33, 127, size=int(rng.integers(3, 9))) for _ in range(60)]
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    out: list[int] = []
    choices = rng.choice(len(words), size=n_tokens, p=p)
    i = 0
    while len(out) < n_tokens:
        out.extend(words[choices[i]].tolist())
        out.append(SPACE)
        if rng.random() < 0.02:
            out.append(EOS)
        i += 1
    np.asarray(out[:n_tokens], dtype=dtype).tofile(path)
    return path


def make_config(tmp_path: Path, data: Path | list | None = None, **overrides) -> TrainConfig:
    """The ``test`` preset in ``tmp_path`` on ``data`` (default: a synthetic file), with
    overrides as a nested dict (``optim={"lr": 0.1}``) or dotted keys (``**{"optim.lr": 0.1}``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = tmp_path / "syn.npy"
        if not data.exists():
            synthetic_tokens(data)
    sources = data if isinstance(data, list) else [{"paths": [str(data)]}]
    layers = [OmegaConf.create({"out_dir": str(tmp_path / "runs"), "data": {"sources": sources}})]
    for key, value in overrides.items():
        layer = OmegaConf.create()
        OmegaConf.update(layer, key, value)
        layers.append(layer)
    return resolve(preset="test", overrides=OmegaConf.merge(*layers))


def params(model) -> dict:
    """Plain full-precision copies of the (unsharded) model's parameters by name."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
