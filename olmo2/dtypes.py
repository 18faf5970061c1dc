"""Names of torch dtypes, as command lines, config files and ``config.json`` spell them."""
from __future__ import annotations

import torch

# The floating dtypes a model is loaded, trained or saved in, by name.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Name of a dtype in config.json (float64 appears in tests and conversions).
DTYPE_NAMES: dict[torch.dtype, str] = {**{v: k for k, v in DTYPES.items()}, torch.float64: "float64"}
# Token id tensors.
INDEX_DTYPES = (torch.int64, torch.int32)
