"""FP8 linear layers for the DiT blocks: an opt-in, experimental path whose frames differ slightly from bf16.

torchao (optional package) stores each block's linear weights in float8 with one scale per output
row and scales the activations per token at run time, so the blocks' matrix products run on the
GPU's FP8 tensor cores (compute capability 8.9+, twice the bf16 rate). The embedders and the output
projection are small and feed every token, so they stay in bf16. Measured on an H100 it is not yet
faster: uncompiled, the per-call quantization and tensor-subclass dispatch cost more than the FP8
GEMMs save (bench/results/h100_eager_bf16_vs_fp8.json).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)


class FP8Error(RuntimeError):
    """FP8 cannot run here; the message says what is missing."""


def fp8_problem(device: torch.device) -> str | None:
    """Why FP8 matrix products cannot run on `device`; None when they can."""
    if device.type != "cuda":
        return "FP8 linear layers need a CUDA GPU"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return f"FP8 linear layers need compute capability 8.9 or newer (Ada, Hopper, Blackwell), not " \
               f"{torch.cuda.get_device_name(device)}"
    return None


def is_block_linear(module: nn.Module, name: str) -> bool:
    """The linears converted: those inside the transformer blocks."""
    return isinstance(module, nn.Linear) and name.startswith("blocks.")


def quantize_blocks_fp8(generator: nn.Module) -> int:
    """Converts the generator's block linears to FP8 in place; returns how many. Raises FP8Error."""
    problem = fp8_problem(generator.patch_embedding.weight.device)
    if problem is not None:
        raise FP8Error(f"--fp8: {problem}.")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as err:
        raise FP8Error("--fp8 needs torchao: pip install torchao") from err
    count = sum(is_block_linear(module, name) for name, module in generator.named_modules())
    quantize_(generator, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=is_block_linear)
    for block in generator.blocks:
        block.ffn.gelu_epilogue = False
    log.info("%d block linear layers in FP8 (torchao, per-row scales)", count)
    return count
