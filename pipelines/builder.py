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
    from .parallel.group import ParallelGroup

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
                   fp8: bool = False, gpus: int = 1, split: str = "auto") -> tuple[StreamingVideoPipeline, MemoryPlan]:
    """Loads the weights (raising WeightsError with a user-facing message) and places them.

    warm: when the models were compiled or FlashAttention-4 is in use, run warm_up() so no user waits
    for a compiler.
    compile_cache: a folder that keeps compilation results between starts (pipelines/model/compile_cache.py).
    attention: inference attention kernels (memory_profiles.ATTENTION_CHOICES, attention_kernels.py).
    fp8: the experimental FP8 block linears (fp8.py; needs the generator resident on the GPU).
    gpus, split: one stream over several GPUs (pipelines/parallel/group.py); this process is rank 0.
    """
    device = torch.device(device)
    group = start_parallel(config, weights_dir, device, gpus, split, memory_profile, fp8, compile_models,
                           attention) if gpus > 1 else None
    try:
        return _build(config, weights_dir, device, "high" if group else memory_profile, vram, compile_models, warm,
                      kv_cache, compile_cache, attention, fp8, group)
    except BaseException:
        if group is not None:
            group.close()
        raise


def _build(config: PipelineConfig, weights_dir: str | Path | None, device: torch.device, memory_profile: str,
           vram: int | None, compile_models: bool, warm: bool, kv_cache: str, compile_cache: str | Path | None,
           attention: str, fp8: bool, group: "ParallelGroup | None") -> tuple[StreamingVideoPipeline, MemoryPlan]:
    components = load_components(config, weights_dir, "cpu")
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
    loras = group.attach(components, device) if group is not None else None
    pipeline = StreamingVideoPipeline(components, config, device,
                                      dataclasses.replace(settings, attention=kernels, compiled=compiled),
                                      loras=loras, parallel=group)
    if warm and (compiled or kernels != "sdpa"):  # FA4 compiles its kernels on first use
        warm_up(pipeline)
        if cache is not None:
            compile_cache_store.save(cache)
    return pipeline, plan


def start_parallel(config: PipelineConfig, weights_dir: str | Path | None, device: torch.device, gpus: int,
                   split: str, memory_profile: str, fp8: bool, compile_models: bool,
                   attention: str) -> "ParallelGroup":
    """Starts the other ranks of a split stream (WeightsError with what to change when this one cannot be)."""
    from .parallel.group import HelperSpec, ParallelGroup, free_address
    from .parallel.layout import ParallelError, ParallelLayout

    try:
        layout = ParallelLayout(gpus, split)
        layout.check(config)
        if memory_profile not in ("auto", "high"):
            raise ParallelError("--gpus keeps every model resident on its GPU: use --memory-profile high (or auto).")
        if fp8:
            raise ParallelError("--fp8 is not available with --gpus.")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ParallelError("This process already runs a stream split over GPUs: close it first "
                                "(pipeline.parallel.close()).")
        if device.type == "cuda" and torch.cuda.device_count() < gpus:
            raise ParallelError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} GPUs.")
    except ParallelError as err:
        raise WeightsError(str(err)) from err
    spec = HelperSpec(layout, config, str(weights_dir) if weights_dir else None, device.type == "cuda",
                      compile_models and device.type == "cuda", attention, free_address())
    return ParallelGroup.start(spec)


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
