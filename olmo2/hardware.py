"""Peak FLOP/s of accelerators: the denominator of MFU, in one table.

Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets,
the numbers MFU conventions use (OLMo-core, torchtitan: 989.5 TFLOP/s for an
H100 SXM). Matched by substring of ``torch.cuda.get_device_name()``, the
longest key first, so "H100 PCIe" wins over "H100" and "GH200" over "H200".
The trainer and the benchmarks both read it, so their MFU agree on one GPU.
"""
from __future__ import annotations

import torch

PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989.5e12,  # SXM (HBM3)
    "H200": 989.5e12,
    "H800": 989.5e12,
    "GH200": 989.5e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362.05e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165.2e12,
}
# Half-precision tensor-core peaks are the same for bf16 and fp16 on these parts.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def peak_flops_for_name(name: str) -> float | None:
    """Dense bf16 peak of the device called ``name``, or None when the table lacks it."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense peak FLOP/s of ``device`` in ``dtype`` (bf16/fp16), or None: on CPU, for other
    dtypes, or for a GPU not in :data:`PEAK_BF16_FLOPS` (MFU is then not reported)."""
    if device.type != "cuda" or dtype not in HALF_DTYPES:
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))
