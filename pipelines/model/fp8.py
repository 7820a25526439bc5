"""FP8 arithmetic: per-row e4m3 quantization (also the low-VRAM KV cache's) and the opt-in FP8 block linears.

With --fp8 each transformer block's linear keeps its weight in float8 with one scale per output
row and quantizes its input per token at run time, so the matrix products run on the GPU's FP8
tensor cores (compute capability 8.9+, twice the bf16 rate) through torch._scaled_mm. The frames
differ slightly from bf16. The embedders and the output projection are small and feed every token,
so they stay in bf16.

The layer is plain tensors and one aten op, so torch.compile fuses each input's quantization into
the kernel that produces it. torchao's float8 tensor subclass computes the same product, but its
compiled blocks did not finish warming up within 13 minutes on an H100, and uncompiled its per-call
dispatch made the blocks slower than bf16 (bench/results/NOTES.md).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
MIN_CAPABILITY = (8, 9)


class FP8Error(RuntimeError):
    """FP8 cannot run here; the message says what is missing."""


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 values, power-of-two scales [..., 1] in x's dtype) with values * scales ~= x.

    Power-of-two scales make the dequantisation exact in bf16 (no extra rounding) and keep every
    vector's largest entry in the top binade of e4m3."""
    amax = x.float().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    # (scales below x's smallest normal number would vanish when stored in x's dtype)
    scales = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX))).clamp_min(torch.finfo(x.dtype).tiny)
    return (x.float() / scales).to(FP8), scales.to(x.dtype)


class Float8Linear(nn.Module):
    """A frozen nn.Linear whose product runs in FP8: weight rows and input tokens each scaled to e4m3."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight, scales = quantize_fp8(linear.weight.detach())
        self.register_buffer("weight_fp8", weight)  # [out, in]
        self.register_buffer("weight_scales", scales.float().t().contiguous())  # [1, out]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, scales = quantize_fp8(x.flatten(0, -2))
        out = torch._scaled_mm(values, self.weight_fp8.t(), scale_a=scales.float(), scale_b=self.weight_scales,
                               bias=self.bias, out_dtype=x.dtype, use_fast_accum=True)
        return out.unflatten(0, x.shape[:-1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fp8_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why FP8 matrix products cannot run on `device` for a model in `dtype`; None when they can."""
    if device.type != "cuda":
        return "FP8 linear layers need a CUDA GPU"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return f"FP8 linear layers need compute capability 8.9 or newer (Ada, Hopper, Blackwell), not " \
               f"{torch.cuda.get_device_name(device)}"
    if dtype != torch.bfloat16:  # the GPU's row-scaled FP8 products write bf16
        return f"FP8 linear layers need a bfloat16 model, not {dtype} (set dtype: bfloat16 in the config)"
    return None


def is_block_linear(module: nn.Module, name: str) -> bool:
    """The linears converted: those inside the transformer blocks (whose sizes FP8 GEMMs take: multiples of 16)."""
    return isinstance(module, nn.Linear) and name.startswith("blocks.") and \
        module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_block_linears(generator: nn.Module) -> int:
    """Replaces the generator's block linears by Float8Linear in place; returns how many."""
    chosen = [name for name, module in generator.named_modules() if is_block_linear(module, name)]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = generator.get_submodule(parent_name)
        setattr(parent, child, Float8Linear(getattr(parent, child)))
    return len(chosen)


def quantize_blocks_fp8(generator: nn.Module) -> int:
    """FP8 block linears where the GPU has FP8 tensor cores; returns how many. Raises FP8Error."""
    problem = fp8_problem(generator.patch_embedding.weight.device, generator.patch_embedding.weight.dtype)
    if problem is not None:
        raise FP8Error(f"--fp8: {problem}.")
    count = convert_block_linears(generator)
    log.info("%d block linear layers in FP8 (per-row weight scales, per-token input scales)", count)
    return count
