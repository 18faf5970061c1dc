"""olmo2: the OLMo 2 model, trainer and tools, on olmo2_kernels.

The model half: :class:`Olmo2Config` (presets, Hugging Face ``config.json``),
:class:`Olmo2ForCausalLM` (Hugging Face parameter names, fused kernels,
``from_pretrained``/``save_pretrained``, ``generate``), and the counts used for
MFU, :func:`num_parameters` and :func:`flops_per_token`.
"""
from .config import PRESETS, Olmo2Config, flops_per_token, num_parameters
from .model import KVCache, Olmo2ForCausalLM, Olmo2Output

__all__ = [
    "PRESETS",
    "KVCache",
    "Olmo2Config",
    "Olmo2ForCausalLM",
    "Olmo2Output",
    "flops_per_token",
    "num_parameters",
]
