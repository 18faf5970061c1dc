"""olmo2_kernels: fused kernels for OLMo 2 (RMSNorm, QK-norm + RoPE, SwiGLU,
cross-entropy with z-loss, fused linear + cross-entropy).

Each op is a drop-in function with forward and backward, registered as a
``torch.library`` custom op so ``torch.compile`` traces through it. The backend
(``torch`` reference, ``triton``, compiled ``cuda``/``cpu``) is chosen per call
by :func:`use_backend`, the ``OLMO2_KERNELS_BACKEND`` variable, or ``auto``.
"""
from . import _validate as checks  # input checks (range_checks_enabled, ...), public for the model package
from ._backend import (
    BACKENDS,
    OPS,
    BackendUnavailableError,
    backend_info,
    backend_unavailable_reason,
    selected_backend,
    use_backend,
)
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .qk_norm_rope import qk_norm_rope, rope_cos_sin
from .rms_norm import RMSNorm, rms_norm
from .swiglu import swiglu

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "OPS",
    "RMSNorm",
    "backend_info",
    "backend_unavailable_reason",
    "checks",
    "cross_entropy",
    "linear_cross_entropy",
    "qk_norm_rope",
    "rms_norm",
    "rope_cos_sin",
    "selected_backend",
    "swiglu",
    "use_backend",
]
