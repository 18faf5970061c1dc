"""olmo2: the OLMo 2 model, trainer and tools, on olmo2_kernels.

The model half: :class:`Olmo2Config` (presets, Hugging Face ``config.json``),
:class:`Olmo2ForCausalLM` (Hugging Face parameter names, fused kernels), the
counts used for MFU (:func:`num_parameters`, :func:`flops_per_token`), and
the functions around the model: :func:`load_pretrained` /
:func:`save_pretrained` (Hugging Face folders, :mod:`olmo2.checkpoint_hf`),
:func:`generate` and :func:`sample` (KV-cache generation; k samples per prompt
with their log-probs for RL; :mod:`olmo2.generation`) and
:func:`load_tokenizer` (OLMo 2's own "dolma2" tokenizer, shipped in the
package, or any ``tokenizer.json``; :mod:`olmo2.tokenizers`).

Layers import one way: ``config`` <- ``model`` <- ``checkpoint_hf``,
``generation`` <- ``train`` (the trainer sub-package), ``soup``,
``tokenize`` <- ``cli`` (the commands). The model never imports I/O or
generation; nothing here imports the trainer.
"""
from .checkpoint_hf import load_pretrained, save_pretrained
from .config import FLOPS_CONVENTION, PRESETS, Olmo2Config, flops_per_token, num_parameters
from .generation import Samples, generate, sample
from .model import KVCache, Olmo2ForCausalLM, Olmo2Output
from .tokenizers import load_tokenizer

__all__ = [
    "FLOPS_CONVENTION",
    "PRESETS",
    "KVCache",
    "Olmo2Config",
    "Olmo2ForCausalLM",
    "Olmo2Output",
    "Samples",
    "flops_per_token",
    "generate",
    "load_pretrained",
    "load_tokenizer",
    "num_parameters",
    "sample",
    "save_pretrained",
]
