"""How a built pipeline runs, decided once before it is constructed.

The memory planner (memory.configure_memory) decides the KV-cache budget and precision and the decode mode;
the builder adds the kernels it could enable and whether the models were compiled. The pipeline receives the
result whole at construction and never changes it: a new memory profile builds new settings and a new
pipeline over the same weights (StreamingVideoPipeline.with_settings).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loading.tiny_decoder import TinyVideoDecoder


@dataclass(frozen=True)
class RuntimeSettings:
    kv_cache_budget: int | None = None  # bytes per KV cache (None: unconstrained); past it the window narrows
    kv_cache_fp8: bool = False  # FP8 keys/values, when bf16 does not fit: frames differ slightly
    decode_frame_by_frame: bool = False  # smaller VAE working set, same frames
    fp8_linears: bool = False  # block linears in FP8 (fp8.py, experimental): frames differ slightly from bf16
    attention: str = "sdpa"  # the inference attention kernels in use (attention_kernels.py)
    compiled: bool = False  # the generator and the VAE decoder run through torch.compile
    fast_decoder: "TinyVideoDecoder | None" = None  # TAEHV, when taew2_1 is in the weights folder (fast_decode)

    def differences(self, fast_decode: bool) -> list[str]:
        """What makes a request's frames differ from the exact bf16 path."""
        parts = ["FP8 linear layers (experimental)"] if self.fp8_linears else []
        return parts + (["fast TAEHV decoder"] if fast_decode else [])
