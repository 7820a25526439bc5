"""Building a ready pipeline as every entry point does: weights into CPU memory, a memory plan
decides what moves to the device, then the speed settings that plan allows."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .config import PipelineConfig
from .core import GenerationRequest, StreamingVideoPipeline
from .loading.weights import WeightsError, load_components
from .memory.planner import GIB, MemoryPlan, configure_memory
from .model import compile_cache as compile_cache_store
from .model.acceleration import accelerate
from .model.attention_kernels import AttentionKernelError, enable_attention_kernels
from .model.fp8 import FP8Error, quantize_blocks_fp8
from .settings import RuntimeSettings

if TYPE_CHECKING:
    from .loading.tiny_decoder import TinyVideoDecoder

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def vram_bytes(vram_gb: float | None) -> int | None:
    """A --vram-gb figure (GiB) as bytes; None means 'measure the free memory'."""
    return int(vram_gb * GIB) if vram_gb else None


def build_pipeline(config: PipelineConfig, weights_dir: str | Path | None, device: str,
                   memory_profile: str = "auto", vram: int | None = None,
                   compile_models: bool = False, warm: bool = False, kv_cache: str = "auto",
                   compile_cache: str | Path | None = None, attention: str = "auto",
                   fp8: bool = False) -> tuple[StreamingVideoPipeline, MemoryPlan]:
    """Loads the weights (raising WeightsError with a user-facing message) and places them.

    warm: when the models were compiled or FlashAttention-4 is in use, run warm_up() so no user waits
    for a compiler.
    compile_cache: a folder that keeps compilation results between starts (pipelines/model/compile_cache.py).
    attention: inference attention kernels (memory_profiles.ATTENTION_CHOICES, attention_kernels.py).
    fp8: the experimental FP8 block linears (fp8.py; needs the generator resident on the GPU).
    """
    components = load_components(config, weights_dir, "cpu")
    device = torch.device(device)
    fast_decoder = load_tiny_decoder(Path(weights_dir) if weights_dir else None, device, config.torch_dtype)
    planned = RuntimeSettings(fp8_linears=fp8, fast_decoder=fast_decoder)  # FP8 weights stay resident
    compile_models = compile_models and device.type == "cuda"
    try:
        plan, settings = configure_memory(components, config, device, memory_profile, vram, kv_cache, planned,
                                          compile_models=compile_models)
    except ValueError as err:
        raise WeightsError(str(err)) from err
    # Compiled blocks would be re-traced as streamed weights move, so streaming runs eager.
    compiling = compile_models and not plan.profile.stream_generator
    cache = Path(compile_cache).expanduser() if compile_cache and compiling else None
    if cache is not None:
        compile_cache_store.activate(cache)  # before FlashAttention-4 is imported: it reads where to cache
    try:
        kernels = enable_fast_kernels(components.generator, device, attention, fp8)
    except (FP8Error, AttentionKernelError) as err:
        raise WeightsError(str(err)) from err
    compiled = accelerate(components, compile_models=compiling, fp8=fp8)
    pipeline = StreamingVideoPipeline(components, config, device,
                                      dataclasses.replace(settings, attention=kernels, compiled=compiled))
    if warm and (compiled or kernels != "sdpa"):  # FA4 compiles its kernels on first use
        warm_up(pipeline)
        if cache is not None:
            compile_cache_store.save(cache)
    return pipeline, plan


def enable_fast_kernels(generator, device: torch.device, attention: str, fp8: bool) -> str:
    """FP8 block linears when asked for, then the attention kernels `attention` allows; returns the kernels
    in use (attention_kernels.py)."""
    if fp8:
        quantize_blocks_fp8(generator)
    return enable_attention_kernels(generator, device, attention)


def load_tiny_decoder(weights_dir: Path | None, device: torch.device, dtype: torch.dtype) -> "TinyVideoDecoder | None":
    """The TAEHV decoder when taew2_1 is in the weights folder (a bad file is logged, not fatal:
    the full VAE still decodes)."""
    from .loading.tiny_decoder import TinyVideoDecoder, find_tiny_decoder

    path = find_tiny_decoder(weights_dir)
    if path is None:
        return None
    try:
        decoder = TinyVideoDecoder.from_file(path).to(device, dtype)
    except WeightsError as err:
        log.warning("fast decoder unavailable: %s", err)
        return None
    log.info("fast decoder (TAEHV) loaded from %s", path)
    return decoder


def warm_up(pipeline: StreamingVideoPipeline) -> None:
    """Generates a text-to-video and an image-to-video clip of the default size and length.

    torch.compile traces and autotunes on first use of each shape (minutes for the full model),
    and cuDNN plans attention once per key length. These two requests reach every shape the tabs
    use by default: the 3-frame blocks, the 1-frame image prefill, each KV-cache length and the
    decoder's first-frame, second-frame and steady variants. With the fast decoder loaded, two
    blocks through it as well (cuDNN tunes its convs on first use: ~2.5 s at 832x480 on an H100).
    """
    start = time.perf_counter()
    config = pipeline.config
    image = Image.new("RGB", (config.width, config.height), (128, 128, 128))
    requests = [GenerationRequest("warm-up")]
    if not config.text_to_video_only:
        requests.append(GenerationRequest("warm-up", image=image))
    if pipeline.fast_decoder is not None:
        requests.append(GenerationRequest("warm-up", num_blocks=min(2, config.max_blocks), fast_decode=True))
    for request in requests:
        for _ in pipeline.generate(request):
            pass
    log.info("warm-up (compilation) took %.0f s", time.perf_counter() - start)
