"""The generator and how it runs: the causal Wan transformer, RoPE, the KV cache and its attention window,
attention kernels, FP8 linears, compilation and its cache."""
