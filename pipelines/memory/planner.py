"""Memory planning for small GPUs: which weights stay resident, and how large the KV cache may be.

The planner picks the most resident profile (pipelines.memory.profiles) whose weights, KV cache
and activations fit the free memory; the mechanism that moves streamed weights lives in
pipelines.memory.weight_streaming.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..model.kv_cache import AttentionWindow, kv_bytes_per_frame
from ..settings import RuntimeSettings
from .profiles import GIB, KV_CACHE_CHOICES, PROFILES, MemoryProfile
from .weight_streaming import BlockStreamer

log = logging.getLogger(__name__)



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
    kv_fp8: bool = False  # keys/values stored in FP8 (frames differ slightly from the bf16 cache)
    decode_frame_by_frame: bool = False  # smaller VAE working set, same frames
    resident_blocks: int = 0  # streamed profile: generator blocks that stay on the GPU anyway

    @property
    def window_frames(self) -> int | None:
        return self.window.window_frames

    @property
    def fits(self) -> bool:
        return self.estimated_peak_bytes <= self.available_bytes

    @property
    def changes_video(self) -> bool:
        return self.kv_fp8 or self.window_forced

    def summary(self, markdown: bool = True) -> str:
        """One line for the UI (markdown) or the log (plain text): what is used, and what (if anything)
        makes the video differ from the one a large GPU produces."""
        name = f"**{self.profile.name}**" if markdown else self.profile.name
        if self.device_type != "cuda":
            return (f"Memory profile {name}: running on the {self.device_type.upper()}, every weight in main "
                    f"memory (profiles only matter on a GPU)")
        description = self.profile.description
        if self.profile.stream_generator and self.resident_blocks:
            description += f", except {self.resident_blocks} generator blocks kept resident"
        text = (f"Memory profile {name} ({description}); KV cache {self.kv_cache_bytes / GIB:.1f} GiB"
                f"{' in FP8' if self.kv_fp8 else ''}; "
                f"{'frame-by-frame VAE decode; ' if self.decode_frame_by_frame else ''}"
                f"estimated peak {self.estimated_peak_bytes / GIB:.1f} GiB")
        changes = []
        if self.kv_fp8:
            changes.append("the FP8 KV cache makes frames differ slightly from a large GPU's")
        if self.window_forced:
            changes.append(f"the KV-cache budget forces a rolling attention window of {self.window_frames} latent "
                           f"frames: videos differ from full attention")
        said = "; ".join(changes) if changes else "same video as on a large GPU"
        text += ". " + said[0].upper() + said[1:]
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
    activation_bytes: int  # one DiT pass over a block + the VAE decode of one latent frame
    kv_fp8_bytes_per_frame: int = 0  # FP8 keys/values + scales + dequantisation workspace
    decode_frame_by_frame_saving: int = 0  # what the frame-by-frame decode saves of activation_bytes

    def resident_bytes(self, profile: MemoryProfile) -> int:
        """Weights on the GPU at the peak (two streamed blocks in flight when streaming)."""
        generator = self.generator_bytes
        if profile.stream_generator:
            generator += (2 - self.generator_blocks) * self.generator_block_bytes
        text = self.text_encoder_bytes
        if profile.stream_text_encoder:
            text = 0  # streamed layers are gone before denoising starts, the embedding stays on the CPU
        return generator + text + self.vae_bytes

    def fixed_bytes(self, profile: MemoryProfile, frame_by_frame: bool) -> int:
        """Everything but the KV cache."""
        saving = self.decode_frame_by_frame_saving if frame_by_frame else 0
        return self.resident_bytes(profile) + self.activation_bytes - saving

    def kv_bytes(self, frames: int, fp8: bool) -> int:
        return frames * (self.kv_fp8_bytes_per_frame if fp8 else self.kv_bytes_per_frame)


# The compiled decoder (one fused graph per latent frame) keeps more full-resolution buffers alive
# at once: the H100 peak rose from 23.4 to 29.3 GiB at 832x480, 1.3x the eager decode estimate.
COMPILED_DECODE_EXTRA = 1.3
# Share of the eager decode working set still needed when decoding frame by frame: the conv
# caches (two frames per conv) stay, the four-frame activations shrink to one. Measured 0.67 on
# the H100 at 832x480 (4.21 -> 2.81 GiB, bench/results/h100_memory_plans.json).
FRAME_BY_FRAME_DECODE_SHARE = 0.7
# Kept free of every plan: allocator rounding and fragmentation (capped H100 runs held up to 0.35 GiB
# reserved but unallocated at the peak, and failed with a 0.25 GiB headroom).
PLANNING_HEADROOM = int(0.6 * GIB)


def decode_working_set_bytes(pixels: int, dtype_bytes: int, compiled: bool) -> int:
    """Streaming VAE decode of one latent frame: 4 video frames through 96-channel full-resolution
    convs; the factor 16 was calibrated on the H100 high-profile peak."""
    eager = 16 * 4 * pixels * 96 * dtype_bytes
    return int(eager * (1 + COMPILED_DECODE_EXTRA)) if compiled else eager


def activation_bytes(frame_tokens: int, ffn_dim: int, pixels: int, dtype_bytes: int, compiled: bool = False) -> int:
    """Working set of one DiT pass over a 3-frame block plus the streaming VAE decode of one latent frame
    (pixels: height x width of the video)."""
    return decode_working_set_bytes(pixels, dtype_bytes, compiled) + 3 * frame_tokens * 3 * ffn_dim * dtype_bytes


def footprint_of(components, frame_tokens: int, pixels: int, compiled: bool = False) -> ModelFootprint:
    """Measures the loaded modules (components: weights.Components) for one block's working set at a video of
    `pixels` (height x width)."""
    generator, t5 = components.generator, components.prompt_encoder.model
    cfg = generator.config
    dtype_bytes = generator.patch_embedding.weight.element_size()
    return ModelFootprint(
        generator_bytes=module_bytes(generator), generator_block_bytes=module_bytes(generator.blocks[0]),
        generator_blocks=len(generator.blocks), text_encoder_bytes=module_bytes(t5),
        vae_bytes=module_bytes(components.vae.model),
        kv_bytes_per_frame=kv_bytes_per_frame(cfg.num_layers, cfg.dim, frame_tokens, generator.dtype),
        activation_bytes=activation_bytes(frame_tokens, cfg.ffn_dim, pixels, dtype_bytes, compiled),
        kv_fp8_bytes_per_frame=kv_bytes_per_frame(cfg.num_layers, cfg.dim, frame_tokens, generator.dtype,
                                                  fp8_heads=cfg.num_heads),
        # (the frame-by-frame decode runs the decoder's modules eagerly, compiled or not)
        decode_frame_by_frame_saving=decode_working_set_bytes(pixels, dtype_bytes, compiled)
        - int(decode_working_set_bytes(pixels, dtype_bytes, False) * FRAME_BY_FRAME_DECODE_SHARE))


# Preference order: exact settings first (a resident text encoder costs most memory and least speed,
# then the decode working set, then the generator weights), the FP8 cache only when they all fail.
# A streamed generator always decodes frame by frame: the memory it frees keeps blocks resident.
_DECODE_CHOICES = {"high": (False,), "medium": (False, True), "low": (True,)}


def plan_memory(footprint: ModelFootprint, free_bytes: int, latent_frames: int, frames_per_block: int,
                requested: str = "auto", configured: AttentionWindow = AttentionWindow(),
                device_type: str = "cuda", kv_cache: str = "auto", resident_generator: bool = False) -> MemoryPlan:
    """The fastest combination that keeps the video unchanged and fits free_bytes; else the FP8 KV
    cache (kv_cache "auto"); else a rolling attention window of whole blocks (at least two).

    A streamed generator keeps as many of its blocks resident as the remaining memory allows.
    resident_generator: only profiles that keep the generator on the device (FP8 weights).
    """
    if requested != "auto" and requested not in PROFILES:
        raise ValueError(f"unknown memory profile {requested!r}; choose auto, {', '.join(PROFILES)}")
    if resident_generator and requested != "auto" and PROFILES[requested].stream_generator:
        raise ValueError(f"The {requested} memory profile streams the generator's weights, which FP8 weights "
                         f"cannot do: restart without --fp8 to use it.")
    if kv_cache not in KV_CACHE_CHOICES:
        raise ValueError(f"unknown KV cache {kv_cache!r}; choose {', '.join(KV_CACHE_CHOICES)}")
    names = [name for name, profile in PROFILES.items() if not (resident_generator and profile.stream_generator)] \
        if requested == "auto" else [requested]
    frames = configured.frames_needed(latent_frames)
    usable = max(0, free_bytes - PLANNING_HEADROOM)
    fp8_choices = {"auto": (False, True), "bf16": (False,), "fp8": (True,)}[kv_cache]
    options = [(fp8, PROFILES[name], frame_by_frame) for fp8 in fp8_choices for name in names
               for frame_by_frame in (_DECODE_CHOICES[name] if requested == "auto" else (False, True))]
    for fp8, profile, frame_by_frame in options:
        fixed = footprint.fixed_bytes(profile, frame_by_frame)
        kv = footprint.kv_bytes(frames, fp8)
        if fixed + kv <= usable:
            resident = _resident_blocks(footprint, profile, usable - fixed - kv)
            peak = fixed + kv + resident * footprint.generator_block_bytes
            return MemoryPlan(profile, configured, False, kv, peak, free_bytes, device_type, fp8, frame_by_frame,
                              resident)
    fp8, profile, frame_by_frame = options[-1]
    fixed = footprint.fixed_bytes(profile, frame_by_frame)
    fitting = max(0, usable - fixed) // footprint.kv_bytes(1, fp8)
    window = configured.narrowed(fitting, frames_per_block)
    kv = footprint.kv_bytes(window.window_frames, fp8)
    return MemoryPlan(profile, window, True, kv, fixed + kv, free_bytes, device_type, fp8, frame_by_frame)


def _resident_blocks(footprint: ModelFootprint, profile: MemoryProfile, spare_bytes: int) -> int:
    if not profile.stream_generator:
        return 0
    fitting = max(0, spare_bytes) // footprint.generator_block_bytes
    return int(min(fitting, footprint.generator_blocks - 2))


def apply_profile(components, profile: MemoryProfile, device: torch.device | str, resident_blocks: int = 0) -> None:
    """Moves weights (components: weights.Components) for `profile`: resident on `device`, or
    streamed from pinned CPU memory (except the first resident_blocks generator blocks)."""
    device = torch.device(device)
    generator, t5 = components.generator, components.prompt_encoder.model
    _set_streaming(generator, generator.blocks, profile.stream_generator, device, resident=resident_blocks)
    _set_streaming(t5, t5.encoder.block, profile.stream_text_encoder, device,
                   keep_on_cpu=[t5.shared] if profile.stream_text_encoder else [])
    components.vae.model.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _set_streaming(model: nn.Module, blocks: nn.ModuleList, stream: bool, device: torch.device,
                   keep_on_cpu: list[nn.Module] = (), resident: int = 0) -> None:
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
    model.weight_streamer = BlockStreamer(blocks, device, resident)


def configure_memory(components, config, device: torch.device | str, requested: str = "auto",
                     vram_bytes: int | None = None, kv_cache: str = "auto",
                     settings: RuntimeSettings = RuntimeSettings(),
                     compile_models: bool = False) -> tuple[MemoryPlan, RuntimeSettings]:
    """Plans for the device's free memory (or vram_bytes) and moves the weights (components:
    weights.Components of `config`, a PipelineConfig); returns the plan and `settings` with its KV cache
    (budget, FP8) and VAE decode mode.

    compile_models: the models will be compiled (its larger decode buffers are planned for).
    On a CPU device nothing is constrained: "auto" keeps everything resident.
    """
    device = torch.device(device)
    latent_h, latent_w = config.latent_size()
    frame_tokens = components.generator.frame_tokens(latent_h, latent_w)
    footprint = footprint_of(components, frame_tokens, config.height * config.width,
                             compile_models or settings.compiled)
    if vram_bytes is None:
        vram_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 50
    plan = plan_memory(footprint, vram_bytes, config.num_blocks * config.frames_per_block + 1,
                       config.frames_per_block, requested, config.attention_window, device.type, kv_cache,
                       resident_generator=settings.fp8_linears)
    apply_profile(components, plan.profile, device, plan.resident_blocks)
    fixed = footprint.fixed_bytes(plan.profile, plan.decode_frame_by_frame)
    resident = plan.resident_blocks * footprint.generator_block_bytes
    log.info("%s", plan.summary(markdown=False))
    return plan, dataclasses.replace(settings, kv_cache_budget=max(0, vram_bytes - PLANNING_HEADROOM - fixed - resident),
                                     kv_cache_fp8=plan.kv_fp8, decode_frame_by_frame=plan.decode_frame_by_frame)
