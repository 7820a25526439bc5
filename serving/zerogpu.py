"""Running on a ZeroGPU Hugging Face Space, where a GPU exists only inside `spaces.GPU` functions.

On such a Space the main process has no CUDA device: the weights are moved "to cuda" at start
(the `spaces` package defers that), every generation runs inside a `spaces.GPU` function with a
duration that fits the requested length, and nothing is compiled ahead (no AoT set-up here).
Locally and on ordinary GPU Spaces nothing of this applies.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

ZERO_GPU_VRAM_GB = 70.0  # the H200 slice a ZeroGPU call gets
MAX_DURATION_S = 120
T = TypeVar("T")


def on_zero_gpu() -> bool:
    """ZeroGPU Spaces set SPACES_ZERO_GPU=true."""
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in {"1", "true", "yes"}


def adapt_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Start-up settings ZeroGPU needs: weights go 'to cuda' (deferred by spaces), all resident, and
    the memory plan uses the slice's size because the main process cannot query a GPU."""
    if not on_zero_gpu():
        return args
    if args.compile:
        log.warning("ZeroGPU: --compile ignored (its warm-up needs a GPU at start; ZeroGPU has none there)")
    args.compile = False
    if args.fp8 or args.attention == "flash4":
        log.warning("ZeroGPU: --fp8 / --attention flash4 ignored (both check the GPU at start; ZeroGPU has none there)")
    args.fp8, args.attention = False, "sdpa"
    args.device = args.device or "cuda"
    args.memory_profile = "high"
    args.vram_gb = args.vram_gb or ZERO_GPU_VRAM_GB
    log.info("ZeroGPU Space: device %s, profile high, planned for %.0f GiB", args.device, args.vram_gb)
    return args


def duration_for(num_blocks: int, seconds_per_block: float = 3.0, overhead_s: float = 15.0) -> int:
    """Seconds of GPU to ask for: text encoding and start-up, then each block (with margin)."""
    return int(min(MAX_DURATION_S, overhead_s + seconds_per_block * num_blocks))


def gpu_generator(fn: Callable[..., Iterator[T]], num_blocks_of: Callable[..., int]) -> Callable[..., Iterator[T]]:
    """fn wrapped in spaces.GPU on a ZeroGPU Space (duration from the request), fn itself elsewhere."""
    if not on_zero_gpu():
        return fn
    import spaces

    return spaces.GPU(duration=lambda *args, **kwargs: duration_for(num_blocks_of(*args, **kwargs)))(fn)
