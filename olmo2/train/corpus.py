"""The built-in demo corpus: the Python standard library's own source, as byte
tokens, so ``olmo2-train`` with no arguments trains on any machine without a
download (see :func:`stdlib_corpus`)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np

from ..byte_tokenizer import ByteTokenizer
from ..files import atomic_write


def default_cache_dir() -> Path:
    """``$OLMO2_CACHE_DIR``, else ``~/.cache/olmo2``."""
    env = os.environ.get("OLMO2_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "olmo2"


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(
        (p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts) and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    return root, files


def stdlib_corpus(cache_dir: str | os.PathLike | None = None, val_every: int = 50) -> dict[str, str]:
    """The built-in demo corpus: the Python standard library's own ``*.py`` files
    (tests and installed packages excluded), one document per file, as byte
    tokens (:class:`olmo2.byte_tokenizer.ByteTokenizer`, EOS 256) in ``uint32``.

    Every ``val_every``-th file (in sorted path order) goes to the validation
    file. Built once per Python installation under ``cache_dir`` (default
    :func:`default_cache_dir`), written to a temporary folder then renamed.
    Returns ``{"train": path, "val": path, "dir": folder}``.
    """
    root, files = _stdlib_files()
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library folder {root}")
    digest = hashlib.sha256()
    digest.update(f"{sys.version_info[:3]}|{val_every}|v1".encode())
    for p in files:
        digest.update(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}\n".encode())
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = base / "corpus" / f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}-{digest.hexdigest()[:12]}"
    out = {"train": str(folder / "train.npy"), "val": str(folder / "val.npy"), "dir": str(folder)}
    if (folder / "meta.json").is_file():
        return out

    eos = np.array([ByteTokenizer.eos_token_id], dtype=np.uint32)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    counts = {"train": [0, 0], "val": [0, 0]}
    with open(tmp / "train.npy", "wb") as train_f, open(tmp / "val.npy", "wb") as val_f:
        for i, path in enumerate(files):
            split = "val" if i % val_every == val_every - 1 else "train"
            data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint32)
            f = val_f if split == "val" else train_f
            data.tofile(f)
            eos.tofile(f)
            counts[split][0] += 1
            counts[split][1] += len(data) + 1
    meta = {
        "source": str(root),
        "tokenizer": "byte",
        "eos_token_id": ByteTokenizer.eos_token_id,
        "dtype": "uint32",
        "documents": {k: v[0] for k, v in counts.items()},
        "tokens": {k: v[1] for k, v in counts.items()},
    }
    with atomic_write(tmp / "meta.json") as f:
        json.dump(meta, f, indent=2)
    try:
        os.replace(tmp, folder)
    except OSError:
        # Another process built it first (the folder exists and is not empty).
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():
            raise
    return out
