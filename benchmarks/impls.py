"""What runs each op in a benchmark: our backends and the baselines.

* ``torch``, ``triton``, ``cuda``, ``cpu``: the public op under
  :func:`olmo2_kernels.use_backend`. ``torch`` is the eager spec, the
  denominator of every speedup.
* ``compile``: ``torch.compile`` (default inductor) of the spec function,
  compiled per shape (``dynamic=False``).
* ``liger``: Liger-Kernel's op where it computes the same function (see
  :class:`LigerImpl` for the settings chosen).
* ``unfused`` (linear_cross_entropy only): ``hidden @ weight.T`` in the input
  dtype, then the spec's cross-entropy: what a model without a fused loss runs
  (logits materialized, the matmul on bf16 tensor cores).

Each implementation builds a *runner* per (op, shape): a function from the
spec's named inputs to named outputs (see :class:`~.specs.OpSpec`).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch

import olmo2_kernels
from olmo2_kernels import reference

from .specs import EPS, IGNORE_INDEX, Z_LOSS, OpSpec

Runner = Callable[[dict], dict]


class Impl:
    name = ""
    description = ""
    baseline = False
    # Input names the implementation overwrites: restored from a pristine copy
    # before each timed call, outside the timed region.
    mutates: dict = {}
    # A failure while running (not a wrong result) means "this baseline cannot
    # run here", reported as a skip with the reason, not as an error.
    failure_is_skip = False

    def unavailable(self, op: str, device: torch.device, dtype: torch.dtype, quick: bool) -> str | None:
        return None

    def build(self, spec: OpSpec, dims: dict) -> Runner:
        raise NotImplementedError


class BackendImpl(Impl):
    def __init__(self, name: str) -> None:
        self.name = name
        self.description = {
            "torch": "eager PyTorch: the spec in olmo2_kernels.reference, autograd backward",
            "triton": "olmo2_kernels Triton kernels",
            "cuda": "olmo2_kernels compiled CUDA kernels",
            "cpu": "olmo2_kernels compiled C++ CPU kernels",
        }[name]

    def unavailable(self, op, device, dtype, quick):
        if self.name == "triton" and device.type == "cpu":
            return "Triton runs CPU tensors only under its interpreter, which exists for tests; never benchmarked"
        return olmo2_kernels.backend_unavailable_reason(self.name, device, op, dtype)

    def build(self, spec, dims):
        fn = getattr(olmo2_kernels, spec.name)
        name = self.name

        def run(inputs: dict) -> dict:
            with olmo2_kernels.use_backend(name):
                return spec.call(fn, inputs)

        return run


class CompileImpl(Impl):
    name = "compile"
    description = "torch.compile (default inductor, dynamic=False) of the spec function"
    baseline = True
    failure_is_skip = True

    def unavailable(self, op, device, dtype, quick):
        if quick:
            return "--quick skips torch.compile (compiling takes seconds per op and shape)"
        return None

    def build(self, spec, dims):
        # A fresh compile per shape: no recompile limit is reached across the
        # many shapes of a run, and no shape runs a dynamic-shape graph.
        torch._dynamo.reset()
        fn = torch.compile(getattr(reference, spec.name), dynamic=False)

        def run(inputs: dict) -> dict:
            return spec.call(fn, inputs)

        return run


def _liger_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001
        return None


def _call_with_supported(fn, *args, **kwargs):
    """Call ``fn`` with the keyword arguments its signature accepts (Liger's
    functional signatures grew over releases)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _liger_losses(result) -> dict:
    """Liger's loss includes the z-loss; it returns a tensor, a (loss, z) tuple
    or an object with ``.loss``/``.z_loss`` depending on the release."""
    if isinstance(result, torch.Tensor):
        return {"loss": result}
    if isinstance(result, (tuple, list)):
        loss, z = result[0], result[1] if len(result) > 1 else None
    else:
        loss, z = result.loss, getattr(result, "z_loss", None)
    out = {"loss": loss}
    if isinstance(z, torch.Tensor):
        out["z"] = z
        out["ce"] = loss.detach() - z.detach()
    return out


class LigerImpl(Impl):
    """Liger-Kernel, where it computes the spec's function.

    * rms_norm: ``casting_mode="gemma"`` (x, rstd and weight all in fp32, one
      rounding at the end), which is OLMo 2's and our spec's order. Liger's own
      OLMo 2 patch uses ``"llama"``, which rounds ``x * rstd`` to the input
      dtype before the weight multiply. ``in_place=False``: in place, its
      backward overwrites dY, which OLMo 2's post-norm residual still reads.
    * swiglu: ``LigerSiLUMulFunction`` (rounds silu(gate) to the input dtype
      before the product).
    * cross_entropy / linear_cross_entropy: ``lse_square_scale`` = z-loss
      coefficient, ``reduction="mean"``, ``return_z_loss=True``; Liger's loss
      is ce + z (Liger's cross-entropy returns its losses in the logits' dtype).
      Fused linear cross-entropy with ``accum_dtype=float32`` where
      the release has it (gradients accumulated in fp32, as ours). Liger's
      cross-entropy writes the logits' gradient into the logits tensor in the
      forward: the harness restores the logits before each timed call. Both
      compute the backward inside the forward, so their forward time includes
      it.
    * qk_norm_rope: skipped: Liger's RoPE rotates only; it has no RMSNorm over
      the whole q/k projection fused with it.

    Keyword arguments a release does not take are dropped (the signatures
    here are those of liger-kernel 0.8.5).
    """

    name = "liger"
    baseline = True
    failure_is_skip = True

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"Liger-Kernel {_liger_version() or '(not installed)'}"

    def unavailable(self, op, device, dtype, quick):
        if op == "qk_norm_rope":
            return "Liger's RoPE does not include OLMo 2's RMSNorm over the whole q/k projection: not the same function"
        try:
            importlib.import_module("liger_kernel")
        except Exception as exc:  # noqa: BLE001
            return f"liger_kernel not importable ({type(exc).__name__}: {exc}); pip install liger-kernel"
        if device.type != "cuda":
            return "Liger's kernels run CUDA tensors only"
        return None

    @property
    def mutates(self) -> dict:  # type: ignore[override]
        return {"cross_entropy": ("logits",)}

    def build(self, spec, dims):
        op = spec.name
        if op == "rms_norm":
            from liger_kernel.transformers.functional import liger_rms_norm

            def run(inputs):
                y = _call_with_supported(liger_rms_norm, inputs["x"], inputs["weight"], EPS,
                                         offset=0.0, casting_mode="gemma", in_place=False)
                return {"y": y}
        elif op == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            def run(inputs):
                return {"y": LigerSiLUMulFunction.apply(inputs["gate"], inputs["up"])}
        elif op == "cross_entropy":
            from liger_kernel.transformers.functional import liger_cross_entropy

            def run(inputs):
                return _liger_losses(_call_with_supported(
                    liger_cross_entropy, inputs["logits"], inputs["labels"], ignore_index=IGNORE_INDEX,
                    lse_square_scale=Z_LOSS, reduction="mean", return_z_loss=True))
        elif op == "linear_cross_entropy":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            def run(inputs):
                return _liger_losses(_call_with_supported(
                    liger_fused_linear_cross_entropy, inputs["hidden"], inputs["weight"], inputs["labels"],
                    ignore_index=IGNORE_INDEX, lse_square_scale=Z_LOSS, reduction="mean",
                    return_z_loss=True, accum_dtype=torch.float32))
        else:
            raise ValueError(f"liger: no adapter for {op}")
        return run


class UnfusedImpl(Impl):
    name = "unfused"
    description = "hidden @ weight.T in the input dtype (logits materialized), then the spec's cross-entropy"
    baseline = True

    def unavailable(self, op, device, dtype, quick):
        if op != "linear_cross_entropy":
            return "only for linear_cross_entropy"
        return None

    def build(self, spec, dims):
        def run(inputs):
            logits = inputs["hidden"] @ inputs["weight"].T
            return spec.call(
                lambda h, w, labels, ii, z, red: reference.cross_entropy(logits, labels, ii, z, red), inputs
            )

        return run


IMPLS: dict[str, Impl] = {
    impl.name: impl
    for impl in (
        BackendImpl("torch"),
        BackendImpl("triton"),
        BackendImpl("cuda"),
        BackendImpl("cpu"),
        CompileImpl(),
        LigerImpl(),
        UnfusedImpl(),
    )
}
BASELINE = "torch"


def liger_version() -> str | None:
    return _liger_version()
