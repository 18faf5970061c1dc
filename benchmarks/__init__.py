"""Benchmarks of the olmo2_kernels ops and of the OLMo 2 model: numerics against
the float64 spec, time, achieved bandwidth or FLOP/s against the device's
measured ceilings, and peak memory, with eager PyTorch, torch.compile and
Liger-Kernel measured in the same run.

Entry point: ``olmo2-bench`` (:func:`benchmarks.cli.main`). Modules:
``specs`` (shapes and byte/FLOP counts per op), ``impls`` (what runs an op),
``harness`` (timing, memory, numerics, ceilings), ``kernels`` (the per-op
benchmark), ``model`` (the model step benchmark), ``report`` (JSON and
tables), ``plots``.
"""
