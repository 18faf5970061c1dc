"""The OLMo 2 trainer.

Modules: :mod:`.config` (the typed config, presets, overrides),
:mod:`.trainer` (the loop and one optimizer step), :mod:`.data` (token files,
the seeded resumable data mix), :mod:`.corpus` (the built-in demo corpus),
:mod:`.optim` (AdamW groups, schedules, clipping), :mod:`.stability` (when a
step is skipped), :mod:`.metrics` (step results, MFU, loggers),
:mod:`.checkpoint` (exact-resume checkpoints, HF export), :mod:`.parallel`
(process groups, FSDP2/DDP, activation checkpointing, compile).
``python -m olmo2.train`` runs the ``olmo2-train`` command.
"""
from .config import ConfigError, TrainConfig
from .trainer import Trainer

__all__ = ["ConfigError", "TrainConfig", "Trainer"]
