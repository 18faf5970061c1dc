"""The model benchmark: forward+backward steps of an OLMo 2 preset.

Implementations, all on the same weights and batch:

* ``kernels``: :class:`olmo2.Olmo2ForCausalLM` with backend ``auto`` (the
  fused kernels where available; which backend ran each op is recorded).
* ``eager``: the same model under ``use_backend("torch")``: every op eager.
* ``compile``: ``torch.compile`` (default inductor) of the eager model.
* ``kernels+compile``: ``torch.compile`` of the model with the kernels (they
  are custom ops, so the compiler keeps them and fuses what is between).
* ``transformers``: ``transformers.Olmo2ForCausalLM`` (attention as below) with
  the weights copied over; its loss has no z-loss.

Attention (``--attn-backend``), the same for every implementation: ``sdpa``
(``scaled_dot_product_attention``, torch picks its kernel), ``sdpa-flash``
(SDPA restricted to its FlashAttention kernel with
``torch.nn.attention.sdpa_kernel``), ``flash_attn`` (the flash-attn package:
our model's ``attn_backend="flash_attn"``, transformers'
``flash_attention_2``; every row skipped when it is not importable) or
``eager`` (our fp32 spec attention; transformers' eager).

A step is ``model(input_ids, labels=...).loss.backward()`` with gradients
set to None before each step, outside the timed region; no optimizer.
Reported: tokens/s, MFU (``olmo2.config.flops_per_token`` over the device's
dense bf16 peak from :mod:`olmo2.hardware`, the trainer's table, where known,
else the measured matmul rate), the
cross-entropy of the first step (all implementations see the same weights and
tokens, so these agree to rounding), and peak memory.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import time
import traceback

import torch

import olmo2_kernels
from olmo2 import Olmo2ForCausalLM
from olmo2.config import Olmo2Config, flops_per_token
from olmo2.hardware import peak_flops as datasheet_peak_flops

from . import harness, report
from .specs import Z_LOSS, canonical_preset

IMPL_NAMES = ("kernels", "eager", "compile", "kernels+compile", "transformers")
ATTN_CHOICES = ("sdpa", "sdpa-flash", "flash_attn", "eager")
# attention implementation per --attn-backend: (ours, transformers')
_ATTN_IMPLS = {"sdpa": ("sdpa", "sdpa"), "sdpa-flash": ("sdpa", "sdpa"),
               "flash_attn": ("flash_attn", "flash_attention_2"), "eager": ("eager", "eager")}
DESCRIPTIONS = {
    "kernels": "olmo2.Olmo2ForCausalLM, backend auto (fused kernels where available)",
    "eager": "olmo2.Olmo2ForCausalLM under use_backend('torch'): eager PyTorch ops",
    "compile": "torch.compile (inductor) of olmo2.Olmo2ForCausalLM under use_backend('torch')",
    "kernels+compile": "torch.compile (inductor) of olmo2.Olmo2ForCausalLM with the fused kernels",
    "transformers": "transformers.Olmo2ForCausalLM, attention per --attn-backend, same weights; loss without z-loss",
}

def peak_flops(device: torch.device, dtype: torch.dtype, measured_tflops: float | None) -> tuple[float | None, str]:
    """(FLOP/s, where it comes from): the datasheet peak the trainer's MFU uses
    (:func:`olmo2.hardware.peak_flops`), else the matmul rate measured in this run."""
    name = report.device_name(device)
    value = datasheet_peak_flops(device, dtype)
    if value is not None:
        return value, f"{name} dense {str(dtype).replace('torch.', '')} peak {value / 1e12:.1f} TFLOP/s"
    if measured_tflops:
        return measured_tflops * 1e12, f"measured matmul rate {measured_tflops:.3g} TFLOP/s (no datasheet peak for this device/dtype)"
    return None, "n/a"


def _defaults(args, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return {
        "preset": canonical_preset(args.preset or ("olmo2-1b" if gpu else "olmo2-tiny")),
        "seq_len": args.seq_len or (4096 if gpu else (64 if args.quick else 128)),
        "batch_size": args.batch_size or (4 if gpu else (1 if args.quick else 2)),
        "steps": args.steps or (3 if args.quick else (10 if gpu else 5)),
    }


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_model_benchmark(args, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = _defaults(args, device)
    attn = getattr(args, "attn_backend", None) or "sdpa"
    if attn not in ATTN_CHOICES:
        raise ValueError(f"attn_backend must be one of {ATTN_CHOICES}, got {attn!r}")
    doc = {
        "schema": report.SCHEMA_VERSION,
        "kind": "model",
        "env": report.environment(device),
        "config": {**cfg, "dtype": str(dtype).replace("torch.", ""), "quick": args.quick, "seed": args.seed,
                   "z_loss_coef": Z_LOSS, "impls": list(args.impls), "attn_backend": attn,
                   "impl_descriptions": {n: DESCRIPTIONS[n] for n in args.impls}},
        "rows": [],
    }
    missing = _missing_flash_attn() if attn == "flash_attn" else None
    if missing:
        print(f"[bench] model benchmark skipped: {missing}")
        doc["rows"] = [{"impl": n, "status": "skipped", "reason": missing} for n in args.impls]
        return doc

    overrides = {"attn_backend": _ATTN_IMPLS[attn][0]}
    model_cfg = Olmo2Config.preset(cfg["preset"], **overrides)
    if cfg["seq_len"] > model_cfg.max_position_embeddings:
        model_cfg = Olmo2Config.preset(cfg["preset"], max_position_embeddings=cfg["seq_len"], **overrides)
    ceilings = harness.measure_ceilings(device, dtype)
    peak, peak_source = peak_flops(device, dtype, ceilings.get("matmul_TFLOPs"))
    fpt = flops_per_token(model_cfg, cfg["seq_len"])
    doc.update(ceilings=ceilings, peak_flops=peak, peak_flops_source=peak_source, flops_per_token=fpt,
               model_config=model_cfg.to_dict(), num_parameters=None)
    print(f"[bench] model {cfg['preset']} batch {cfg['batch_size']} x {cfg['seq_len']} {dtype} on "
          f"{report.device_name(device)}, attention {attn}; MFU against {peak_source}")

    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    input_ids = torch.randint(0, model_cfg.vocab_size, (cfg["batch_size"], cfg["seq_len"]), device=device, generator=gen)
    labels = input_ids.clone()
    tokens = cfg["batch_size"] * cfg["seq_len"]
    timing = harness.TimingConfig(warmup_calls=2 if args.quick else 3, warmup_s=0.0, budget_s=0.0,
                                  min_repeats=cfg["steps"], max_repeats=cfg["steps"])

    ours = None
    for impl in args.impls:
        row = {"impl": impl, "description": DESCRIPTIONS[impl], "status": "ok", "reason": None}
        doc["rows"].append(row)
        if impl in ("compile", "kernels+compile") and args.quick:
            row.update(status="skipped", reason="--quick skips torch.compile (compiling a model takes minutes)")
            continue
        if impl == "transformers":
            try:
                import transformers  # noqa: F401
            except Exception as exc:  # noqa: BLE001
                row.update(status="skipped", reason=f"transformers not importable ({type(exc).__name__}: {exc})")
                continue
        start = time.perf_counter()
        try:
            if ours is None:
                init = torch.Generator(device=device)
                init.manual_seed(args.seed)
                ours = Olmo2ForCausalLM.from_config(model_cfg, device=device, dtype=dtype, generator=init)
                ours.train()
                doc["num_parameters"] = ours.num_parameters()
            model, backend, note = _variant(impl, ours, model_cfg, device, dtype, olmo2_kernels, attn)
            row["note"] = note
            row["attn_backend"] = attn
            _measure(row, model, backend, input_ids, labels, tokens, fpt, peak, ceilings, device, timing, olmo2_kernels,
                     attn)
        except Exception as exc:  # noqa: BLE001
            oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
            if oom:
                row.update(status="skipped", reason=f"out of memory at batch {cfg['batch_size']} x {cfg['seq_len']} "
                                                   "(try --batch-size)")
            elif impl in ("compile", "kernels+compile"):
                row.update(status="skipped", reason=f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            else:
                row.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                           traceback=traceback.format_exc(limit=8))
        finally:
            model = None
            if ours is not None:
                ours.zero_grad(set_to_none=True)
            _free(device)
        row["wall_s"] = time.perf_counter() - start
        if row["status"] == "ok":
            print(f"[bench] {impl}: {row['tokens_per_s']:.0f} tokens/s"
                  + (f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "")
                  + f" ({row['wall_s']:.0f} s)")
        else:
            print(f"[bench] {impl}: {row['status']}: {row['reason']}")
    return doc


def _missing_flash_attn() -> str | None:
    try:
        importlib.import_module("flash_attn")
    except Exception as exc:  # noqa: BLE001
        return f"--attn-backend flash_attn: flash_attn not importable ({type(exc).__name__}: {exc})"
    return None


def _attention_context(attn: str):
    """SDPA restricted to its FlashAttention kernel for ``sdpa-flash``; else nothing."""
    if attn != "sdpa-flash":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def _auto_backends(olmo2_kernels, device, dtype) -> dict[str, str]:
    """The backend ``auto`` runs each op on for this device and dtype."""
    with olmo2_kernels.use_backend("auto"):
        return {op: olmo2_kernels.selected_backend(op, device, dtype) for op in _OPS}


def _variant(impl, ours, model_cfg, device, dtype, olmo2_kernels, attn="sdpa"):
    """(callable model, backend name for use_backend, note)."""
    if impl == "kernels":
        chosen = _auto_backends(olmo2_kernels, device, dtype)
        return ours, "auto", "backends: " + ", ".join(f"{op}={b}" for op, b in chosen.items())
    if impl == "eager":
        return ours, "torch", None
    if impl == "compile":
        torch._dynamo.reset()
        return torch.compile(ours), "torch", None
    if impl == "kernels+compile":
        torch._dynamo.reset()
        chosen = _auto_backends(olmo2_kernels, device, dtype)
        return torch.compile(ours), "auto", "backends: " + ", ".join(f"{op}={b}" for op, b in chosen.items())
    if impl == "transformers":
        import transformers

        hf_cfg = transformers.Olmo2Config.from_dict(model_cfg.to_hf())
        hf_cfg._attn_implementation = _ATTN_IMPLS[attn][1]
        with torch.device(device):
            hf = transformers.Olmo2ForCausalLM(hf_cfg)
        hf.to(dtype)
        hf.load_state_dict(ours.state_dict(), strict=True)
        hf.train()
        return _HFWrapper(hf), "torch", f"transformers {transformers.__version__}, {hf_cfg._attn_implementation} attention"
    raise ValueError(f"model impl must be one of {IMPL_NAMES}, got {impl!r}")


_OPS = ("rms_norm", "qk_norm_rope", "swiglu", "linear_cross_entropy")


class _HFWrapper:
    """Gives the transformers model our call convention: (input_ids, labels, z_loss_coef)."""

    def __init__(self, hf) -> None:
        self.hf = hf

    def __call__(self, input_ids, labels=None, z_loss_coef=0.0):
        out = self.hf(input_ids=input_ids, labels=labels)
        out.ce_loss = out.loss
        return out

    def zero_grad(self, set_to_none=True):
        self.hf.zero_grad(set_to_none=set_to_none)


def _measure(row, model, backend, input_ids, labels, tokens, fpt, peak, ceilings, device, timing, olmo2_kernels,
             attn="sdpa"):
    zero = model.zero_grad
    first_loss = {}

    def prepare(_):
        zero(set_to_none=True)

    def step(_):
        with olmo2_kernels.use_backend(backend), _attention_context(attn):
            out = model(input_ids, labels=labels, z_loss_coef=Z_LOSS)
        if not first_loss:
            first_loss["loss"] = out.loss.detach()
            first_loss["ce"] = out.ce_loss.detach()
        out.loss.backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = harness.time_calls(step, [None], device, timing, prepare=prepare)
    row["step"] = t.as_dict()
    row["tokens_per_s"] = tokens / (t.median_ms * 1e-3)
    row["achieved_TFLOPs"] = row["tokens_per_s"] * fpt / 1e12
    row["mfu"] = row["tokens_per_s"] * fpt / peak if peak else None
    if ceilings.get("matmul_TFLOPs"):
        row["frac_of_measured_matmul"] = row["achieved_TFLOPs"] / ceilings["matmul_TFLOPs"]
    row["loss"] = float(first_loss["loss"])
    row["ce_loss"] = float(first_loss["ce"])
    if device.type == "cuda":
        row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        prepare(None)
        extra, why = harness.peak_memory(lambda: step(None), device)
        params = sum(p.numel() * p.element_size() for p in (getattr(model, "hf", None) or model).parameters())
        row["peak_mem_bytes"] = None if extra is None else params + extra
        if why:
            row["peak_mem_note"] = why
    zero(set_to_none=True)
