"""The memory profiles and the other start-up choices, in one list that the planner, the CLIs and the UI read.

Kept free of torch imports so that command-line parsing (`--help`) stays instant.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class MemoryProfile:
    name: str
    stream_text_encoder: bool
    stream_generator: bool
    description: str


# Most resident first: "auto" takes the first one that fits.
PROFILES: dict[str, MemoryProfile] = {
    "high": MemoryProfile("high", False, False, "all weights resident on the GPU"),
    "medium": MemoryProfile("medium", True, False, "text encoder streamed per layer, leaves the GPU after each prompt"),
    "low": MemoryProfile("low", True, True, "text encoder and generator blocks streamed from pinned CPU memory"),
}
PROFILE_CHOICES: list[str] = ["auto", *PROFILES]
# KV cache storage: auto keeps bf16 whenever it fits and falls back to FP8 before narrowing the window.
KV_CACHE_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp8")
# Inference attention kernels (attention_kernels.py): auto uses FlashAttention-4 where installed and faster.
ATTENTION_CHOICES: tuple[str, ...] = ("auto", "sdpa", "flash4")
