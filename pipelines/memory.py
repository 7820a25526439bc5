"""Memory planning for small GPUs: which weights stay resident, and how large the KV cache may be.

The planner picks the most resident profile (pipelines.memory_profiles) whose weights, KV cache
and activations fit the free memory; the mechanism that moves streamed weights lives in
pipelines.weight_streaming.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .kv_cache import AttentionWindow, kv_bytes_per_frame
from .memory_profiles import PROFILES, MemoryProfile
from .weight_streaming import BlockStreamer

log = logging.getLogger(__name__)

GIB = 2**30


def module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass(frozen=True)
class MemoryPlan:
    profile: MemoryProfile
    window: AttentionWindow  # the attention window the KV cache can hold
    window_forced: bool  # the budget, not the config, imposed the window
    kv_cache_bytes: int
    estimated_peak_bytes: int
    available_bytes: int
    device_type: str = "cuda"

    @property
    def window_frames(self) -> int | None:
        return self.window.window_frames

    @property
    def fits(self) -> bool:
        return self.estimated_peak_bytes <= self.available_bytes

    def summary(self, markdown: bool = True) -> str:
        """One line for the UI (markdown) or the log (plain text)."""
        name = f"**{self.profile.name}**" if markdown else self.profile.name
        if self.device_type != "cuda":
            return (f"Memory profile {name}: running on the {self.device_type.upper()}, every weight in main "
                    f"memory (profiles only matter on a GPU)")
        text = (f"Memory profile {name} ({self.profile.description}); "
                f"KV cache {self.kv_cache_bytes / GIB:.1f} GiB; estimated peak {self.estimated_peak_bytes / GIB:.1f} GiB")
        if self.window_forced:
            text += (f". The KV-cache budget forces a rolling attention window of {self.window_frames} latent "
                     f"frames: videos differ from full attention")
        if not self.fits:
            text += (f". WARNING: even this needs more than the {self.available_bytes / GIB:.1f} GiB available; "
                     f"expect out-of-memory errors at this resolution")
        return text


@dataclass(frozen=True)
class ModelFootprint:
    """Sizes the planner needs, measured from the loaded modules and the config."""

    generator_bytes: int
    generator_block_bytes: int
    generator_blocks: int
    text_encoder_bytes: int
    vae_bytes: int
    kv_bytes_per_frame: int
    activation_bytes: int

    def resident_bytes(self, profile: MemoryProfile) -> int:
        """Weights on the GPU at the peak (two streamed blocks in flight when streaming)."""
        generator = self.generator_bytes
        if profile.stream_generator:
            generator += (2 - self.generator_blocks) * self.generator_block_bytes
        text = self.text_encoder_bytes
        if profile.stream_text_encoder:
            text = 0  # streamed layers are gone before denoising starts, the embedding stays on the CPU
        return generator + text + self.vae_bytes


# The compiled decoder (one fused graph per latent frame) keeps more full-resolution buffers alive
# at once: the H100 peak rose from 23.4 to 29.3 GiB at 832x480, 1.3x the eager decode estimate.
COMPILED_DECODE_EXTRA = 1.3


def decode_working_set_bytes(pixels: int, dtype_bytes: int, compiled: bool) -> int:
    """Streaming VAE decode of one latent frame: 4 video frames through 96-channel full-resolution
    convs; the factor 16 was calibrated on the H100 high-profile peak."""
    eager = 16 * 4 * pixels * 96 * dtype_bytes
    return int(eager * (1 + COMPILED_DECODE_EXTRA)) if compiled else eager


def activation_bytes(frame_tokens: int, ffn_dim: int, latent_height: int, latent_width: int, dtype_bytes: int,
                     compiled: bool = False) -> int:
    """Working set of one DiT pass over a 3-frame block plus the streaming VAE decode of one latent frame."""
    pixels = latent_height * 8 * latent_width * 8
    return decode_working_set_bytes(pixels, dtype_bytes, compiled) + 3 * frame_tokens * 3 * ffn_dim * dtype_bytes


def footprint_of(components, frame_tokens: int, latent_height: int, latent_width: int,
                 compiled: bool = False) -> ModelFootprint:
    """Measures the loaded modules (components: weights.Components) for one block's working set."""
    generator, t5 = components.generator, components.prompt_encoder.model
    cfg = generator.config
    dtype_bytes = generator.patch_embedding.weight.element_size()
    return ModelFootprint(
        generator_bytes=module_bytes(generator), generator_block_bytes=module_bytes(generator.blocks[0]),
        generator_blocks=len(generator.blocks), text_encoder_bytes=module_bytes(t5),
        vae_bytes=module_bytes(components.vae.model),
        kv_bytes_per_frame=kv_bytes_per_frame(cfg.num_layers, cfg.dim, frame_tokens, generator.dtype),
        activation_bytes=activation_bytes(frame_tokens, cfg.ffn_dim, latent_height, latent_width, dtype_bytes,
                                          compiled))


def plan_memory(footprint: ModelFootprint, free_bytes: int, latent_frames: int, frames_per_block: int,
                requested: str = "auto", configured: AttentionWindow = AttentionWindow(),
                device_type: str = "cuda") -> MemoryPlan:
    """The most resident profile whose weights, KV cache and activations fit free_bytes.

    When even the lowest allowed profile cannot hold the KV cache of the whole video, the cache
    becomes a rolling window of whole blocks (at least two) that fits.
    """
    if requested != "auto" and requested not in PROFILES:
        raise ValueError(f"unknown memory profile {requested!r}; choose auto, {', '.join(PROFILES)}")
    names = list(PROFILES) if requested == "auto" else [requested]
    frames = configured.frames_needed(latent_frames)
    for name in names:
        profile = PROFILES[name]
        fixed = footprint.resident_bytes(profile) + footprint.activation_bytes
        fitting = max(0, free_bytes - fixed) // footprint.kv_bytes_per_frame
        if fitting >= frames:
            kv = frames * footprint.kv_bytes_per_frame
            return MemoryPlan(profile, configured, False, kv, fixed + kv, free_bytes, device_type)
        if name == names[-1]:
            window = configured.narrowed(fitting, frames_per_block)
            kv = window.window_frames * footprint.kv_bytes_per_frame
            return MemoryPlan(profile, window, True, kv, fixed + kv, free_bytes, device_type)
    raise AssertionError("the last profile always returns")


def apply_profile(components, profile: MemoryProfile, device: torch.device | str) -> None:
    """Moves weights (components: weights.Components) for `profile`: resident on `device`, or
    streamed from pinned CPU memory."""
    device = torch.device(device)
    generator, t5 = components.generator, components.prompt_encoder.model
    _set_streaming(generator, generator.blocks, profile.stream_generator, device)
    _set_streaming(t5, t5.encoder.block, profile.stream_text_encoder, device,
                   keep_on_cpu=[t5.shared] if profile.stream_text_encoder else [])
    components.vae.model.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _set_streaming(model: nn.Module, blocks: nn.ModuleList, stream: bool, device: torch.device,
                   keep_on_cpu: list[nn.Module] = ()) -> None:
    streamer: BlockStreamer | None = getattr(model, "weight_streamer", None)
    if streamer is not None:
        streamer.remove()
    model.weight_streamer = None
    if not stream:
        model.to(device)
        return
    streamed = {id(p) for p in blocks.parameters()}
    cpu_side = {id(p) for module in keep_on_cpu for p in module.parameters()}
    for param in model.parameters():
        if id(param) not in streamed:
            param.data = param.data.to("cpu" if id(param) in cpu_side else device)
    model.weight_streamer = BlockStreamer(blocks, device)


def configure_memory(pipeline, requested: str = "auto", vram_bytes: int | None = None) -> MemoryPlan:
    """Plans for the device's free memory (or vram_bytes), moves the weights, sets the KV budget
    of `pipeline` (a core.StreamingVideoPipeline).

    On a CPU device nothing is constrained: "auto" keeps everything resident.
    """
    cfg, device = pipeline.config, pipeline.device
    latent_h, latent_w = cfg.latent_size()
    frame_tokens = pipeline.generator.frame_tokens(latent_h, latent_w)
    footprint = footprint_of(pipeline.components, frame_tokens, latent_h, latent_w, pipeline.compiled)
    if vram_bytes is None:
        vram_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 50
    plan = plan_memory(footprint, vram_bytes, cfg.num_blocks * cfg.frames_per_block + 1, cfg.frames_per_block,
                       requested, cfg.attention_window, device.type)
    apply_profile(pipeline.components, plan.profile, device)
    fixed = footprint.resident_bytes(plan.profile) + footprint.activation_bytes
    pipeline.kv_cache_budget = max(0, vram_bytes - fixed)
    log.info("%s", plan.summary(markdown=False))
    return plan
