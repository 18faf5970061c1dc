"""olmo2: the OLMo 2 model, trainer and tools, on olmo2_kernels."""
