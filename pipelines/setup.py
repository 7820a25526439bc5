"""Building a ready pipeline as every entry point does: weights into CPU memory, a memory plan
decides what moves to the device, then the speed settings that plan allows."""
from __future__ import annotations

from pathlib import Path

import torch

from .acceleration import accelerate
from .config import PipelineConfig
from .core import StreamingVideoPipeline
from .memory import GIB, MemoryPlan, configure_memory
from .weights import load_components


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def vram_bytes(vram_gb: float | None) -> int | None:
    """A --vram-gb figure (GiB) as bytes; None means 'measure the free memory'."""
    return int(vram_gb * GIB) if vram_gb else None


def build_pipeline(config: PipelineConfig, weights_dir: str | Path | None, device: str,
                   memory_profile: str = "auto", vram: int | None = None,
                   compile_models: bool = False) -> tuple[StreamingVideoPipeline, MemoryPlan]:
    """Loads the weights (raising WeightsError with a user-facing message) and places them."""
    components = load_components(config, weights_dir, "cpu")
    pipeline = StreamingVideoPipeline(components, config, device)
    plan = configure_memory(pipeline, memory_profile, vram)
    # Compiled blocks would be re-traced as streamed weights move, so streaming runs eager.
    accelerate(components, compile_models=compile_models and not plan.profile.stream_generator)
    return pipeline, plan
