"""Inference self-attention kernels: PyTorch's SDPA always, FlashAttention-4 when it is installed.

FlashAttention-4 (the optional package flash-attn-4, Hopper/Blackwell, bf16/fp16) beats cuDNN's
SDPA over the longer KV caches of a streamed video but not over the first blocks' (its Python-side
launch costs more there), so the first call of each shape times both, launch included, and keeps
the faster one (as cudnn.benchmark does for convolutions). That first call also checks that the two
agree to bf16 rounding; a kernel that does not is never used there. Without the package, or on the
CPU, nothing here is used and the model calls SDPA as before.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..memory.profiles import ATTENTION_CHOICES

log = logging.getLogger(__name__)

FLASH4_HEAD_DIMS = (64, 96, 128)
TIMED_CALLS = 10  # per kernel and shape, once: ~20 ms at the longest 832x480 cache
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # q/k/v [B, L, H, D] -> [B, L, H, D]


class AttentionKernelError(RuntimeError):
    """The requested attention kernel cannot run here (message says what to install or change)."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def load_flash4() -> Kernel | None:
    """FlashAttention-4's forward as a Kernel, or None when flash-attn-4 is not installed."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return None

    def flash4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attn_func(q, k, v)[0]

    return flash4


def flash4_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FlashAttention-4 cannot run this model here; None when it can."""
    if device.type != "cuda":
        return "FlashAttention-4 runs on CUDA GPUs only"
    if torch.cuda.get_device_capability(device)[0] < 9:
        return f"FlashAttention-4 needs a Hopper or Blackwell GPU, not {torch.cuda.get_device_name(device)}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"FlashAttention-4 needs bf16 or fp16 weights, not {dtype}"
    if head_dim not in FLASH4_HEAD_DIMS:
        return f"FlashAttention-4 supports head sizes {FLASH4_HEAD_DIMS}, not {head_dim}"
    return None


def agree(candidate: torch.Tensor, reference: torch.Tensor) -> bool:
    """Equal up to bf16 rounding of the output (1/128 of its largest value, plus an absolute floor)."""
    return bool((candidate.float() - reference.float()).abs().max() <= reference.abs().max().float() / 128 + 1e-3)


def time_kernel(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """Milliseconds a call costs: its GPU time plus the host time its launch takes, after one untimed
    call (which compiles a JIT kernel). The first blocks of a video are short and launch-bound: there
    a kernel with a slower Python launch loses what its GPU time gains."""
    kernel(q, k, v)
    torch.cuda.synchronize(q.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch_start = time.perf_counter()
    for _ in range(TIMED_CALLS):
        kernel(q, k, v)
    launch_ms = (time.perf_counter() - launch_start) * 1e3
    end.record()
    end.synchronize()
    return (start.elapsed_time(end) + launch_ms) / TIMED_CALLS


class ShapeTunedAttention:
    """Runs, for each q/k/v shape, whichever candidate kernel was fastest on its first call.

    `sdpa` is the reference: a candidate whose output differs from it beyond rounding is dropped for
    that shape. The table only holds kernel choices, never request data, so one per model serves
    every session (the way cuDNN's autotuning cache does).
    """

    def __init__(self, candidates: dict[str, Kernel], timer: Callable[..., float] = time_kernel) -> None:
        self.candidates = {"sdpa": sdpa, **candidates}
        self.timer = timer
        self.choice: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device)
        name = self.choice.get(key)
        if name is None:
            with self._lock:
                name = self.choice.get(key) or self._tune(key, q, k, v)
        return self.candidates[name](q, k, v)

    def _tune(self, key: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
        reference = sdpa(q, k, v)
        timings = {}
        for name, kernel in self.candidates.items():
            if name != "sdpa" and not agree(kernel(q, k, v), reference):
                log.warning("attention kernel %s disagrees with SDPA at q%s k%s: not used there", name,
                            tuple(q.shape), tuple(k.shape))
                continue
            timings[name] = self.timer(kernel, q, k, v)
        best = min(timings, key=timings.get)
        self.choice[key], self.timings[key] = best, timings
        log.info("attention q%s k%s: %s (%s)", tuple(q.shape), tuple(k.shape), best,
                 ", ".join(f"{n} {t:.3f} ms" for n, t in timings.items()))
        return best


def enable_attention_kernels(model: torch.nn.Module, device: torch.device, choice: str = "auto") -> str:
    """Routes the generator's inference self-attention through the kernels `choice` allows; returns
    which ("sdpa" or "sdpa+flash4").

    auto uses FlashAttention-4 where it is installed and supported and SDPA otherwise; flash4 raises
    AttentionKernelError with what is missing; sdpa leaves the model as it is.
    """
    if choice not in ATTENTION_CHOICES:
        raise AttentionKernelError(f"Unknown attention kernel {choice!r}; choose one of {ATTENTION_CHOICES}.")
    model.set_attention_kernel(None)
    if choice == "sdpa":
        return "sdpa"
    problem = flash4_problem(device, model.patch_embedding.weight.dtype, model.head_dim)
    flash4 = load_flash4() if problem is None else None
    if problem is None and flash4 is None:
        problem = "flash-attn-4 is not installed (pip install flash-attn-4)"
    if problem is not None:
        if choice == "flash4":
            raise AttentionKernelError(f"--attention flash4: {problem}.")
        log.info("attention: SDPA (%s)", problem)
        return "sdpa"
    model.set_attention_kernel(ShapeTunedAttention({"flash4": flash4}))
    log.info("self-attention: FlashAttention-4 or SDPA per shape, whichever is faster")
    return "sdpa+flash4"
