"""The one pipeline core behind every tab: block-by-block causal generation with streaming decode.

generate() yields a BlockResult as soon as each block of latent frames is denoised and
decoded, so callers can show frames while later blocks are still being generated; the block's
pass that writes it into the KV cache runs after that (and not after the last block). All
per-generation state (KV caches, VAE conv cache, random generator) lives inside the generate()
call; the model weights are the only thing shared between callers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from .config import PipelineConfig
from .kv_cache import AttentionWindow, KVCache, kv_bytes_per_frame
from .lora import LoraChoice, LoraError, LoraMerger
from .scheduler import make_sampler, reference_noise
from .steering import PromptSteering, PromptSwitch
from .vae import to_uint8_frames
from .weights import Components

log = logging.getLogger(__name__)


# Seeds are exact integers in every client: JavaScript numbers (the browser, JSON) are exact up to 2**53 - 1.
MAX_SEED = 2**53 - 1


class RequestError(ValueError):
    """A request the pipeline cannot run (bad prompt, size, length or image); message is user-facing."""


class BlockConditioning(Protocol):
    """Extra per-block input (pose): token_bias(start_frame, num_frames) -> [1, tokens, dim] or None."""

    def token_bias(self, start_frame: int, num_frames: int) -> torch.Tensor | None: ...


@dataclass
class GenerationRequest:
    prompt: str
    seed: int = 0
    num_blocks: int | None = None
    negative_prompt: str | None = None
    image: Image.Image | None = None
    height: int | None = None
    width: int | None = None
    conditioning: BlockConditioning | None = None
    reference_latent: torch.Tensor | None = field(default=None, repr=False)
    loras: tuple[LoraChoice, ...] = ()  # adapters merged into the generator for this request
    steering: PromptSteering | None = field(default=None, repr=False)  # new prompts while it streams
    continuous: bool = False  # go on block after block (rolling window) until stopped or the config's limit
    fast_decode: bool = False  # decode with the tiny TAEHV decoder (preview quality) instead of the Wan VAE


@dataclass
class BlockResult:
    """Newly decoded frames of block `index`. A block arrives in one result, except that the very
    first video frame of a run is sent on its own as soon as it exists (complete=False)."""

    index: int
    num_blocks: int
    frames: np.ndarray  # uint8 [T, H, W, 3]
    latents: torch.Tensor | None  # clean latents of the whole block [1, C, F, h, w] (CPU) when complete, and
    # the image prefix's latent on the result that shows it
    denoise_s: float  # on a block's first result: its denoising plus the KV-cache write of the block before
    # it (each block's write runs after its frames were sent)
    decode_s: float
    elapsed_s: float  # since generate() was called
    complete: bool = True  # this result finishes block `index`
    window_frames: int | None = None  # rolling attention window used, None = every past frame
    window_forced: bool = False  # the KV-cache memory budget (not the config) imposed that window
    prompt: str = ""  # the prompt this block was generated under
    switch_ms: float | None = None  # a prompt switch before this block took this long (re-cache included)

    @property
    def block_s(self) -> float:
        return self.denoise_s + self.decode_s


CancelCheck = Callable[[], bool]


def prepare_image(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Resize to cover height x width, centre-crop, scale to [-1, 1]: [1, 3, 1, H, W]."""
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    array = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
    tensor = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
    return tensor[None, :, None]


def still_cached(written: list["ContextWrite"], window: AttentionWindow, end_frame: int) -> list["ContextWrite"]:
    """The writes with a frame the cache still holds: sink frames and the most recent ones."""
    if window.window_frames is None:
        return written
    recent_from = end_frame - (window.window_frames - window.sink_frames)
    return [w for w in written
            if w.start_frame < window.sink_frames or w.start_frame + w.latents.shape[2] > recent_from]


@dataclass
class ContextWrite:
    """Clean frames written into the KV cache (kept so the cache can be rebuilt under a new prompt)."""

    latents: torch.Tensor
    start_frame: int
    timestep: float
    bias: torch.Tensor | None


class StreamingVideoPipeline:
    """Self-Forcing inference: few-step (or multi-step CFG) denoising of 3-frame blocks."""

    def __init__(self, components: Components, config: PipelineConfig, device: torch.device | str = "cpu") -> None:
        self.components = components
        self.config = config
        self.device = torch.device(device)
        self.generator = components.generator
        self.vae = components.vae
        self.prompt_encoder = components.prompt_encoder
        self.window = config.attention_window
        self.kv_cache_budget: int | None = None  # bytes per KV cache; set by low-VRAM planning
        self.kv_cache_fp8 = False  # FP8 keys/values (low-VRAM planning, when bf16 does not fit)
        self.decode_frame_by_frame = False  # smaller VAE working set, same frames (low-VRAM planning)
        self.tiny_decoder = None  # TinyVideoDecoder when taew2_1 is in the weights folder (fast_decode)
        self.compiled = False  # torch.compile in use: the memory planner reserves its larger decode buffers
        self.fp8 = False  # block linears in FP8 (fp8.py, experimental): frames differ slightly from bf16
        self.attention = "sdpa"  # inference attention kernels in use (attention_kernels.py)
        self.sampler = make_sampler(config.sampler)
        self.loras = LoraMerger(self.generator)

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.patch_embedding.weight.dtype

    def validate(self, request: GenerationRequest) -> tuple[int, int, int]:
        """Returns (num_blocks, height, width) or raises RequestError with a user-facing message."""
        if not request.prompt or not request.prompt.strip():
            raise RequestError("Please enter a prompt.")
        if not 0 <= request.seed <= MAX_SEED:
            raise RequestError(f"Seed must be a whole number from 0 to {MAX_SEED}.")
        num_blocks = self.config.num_blocks if request.num_blocks is None else request.num_blocks
        if request.continuous:
            num_blocks = self.config.continuous_blocks
        elif not 1 <= num_blocks <= self.config.max_blocks:
            raise RequestError(f"Number of blocks must be between 1 and {self.config.max_blocks}.")
        if request.fast_decode and self.tiny_decoder is None:
            raise RequestError("The fast decoder needs taew2_1.pth from github.com/madebyollin/taehv in the weights "
                               "folder; without it the full Wan VAE decodes.")
        height, width = request.height or self.config.height, request.width or self.config.width
        if height % 16 or width % 16 or not (16 <= height <= 1280 and 16 <= width <= 1280):
            raise RequestError("Height and width must be multiples of 16 between 16 and 1280.")
        if request.loras and self.fp8:
            raise RequestError("LoRAs cannot be merged into FP8 weights: the server was started with --fp8; "
                               "start it without --fp8 to use LoRAs.")
        for choice in request.loras:
            if not 0 <= choice.scale <= 2:
                raise RequestError(f"LoRA strength must be between 0 and 2, got {choice.scale}.")
            try:
                self.loras.load(choice.path)
            except LoraError as err:
                raise RequestError(str(err)) from err
        return num_blocks, height, width

    def fast_path_note(self, request: GenerationRequest) -> str:
        """What makes this request's frames differ from the exact bf16 path ('' when nothing does)."""
        parts = ["FP8 linear layers (experimental)"] if self.fp8 else []
        if request.fast_decode:
            parts.append("fast TAEHV decoder")
        return f"{' and '.join(parts)}: frames differ slightly from the exact bf16 path" if parts else ""

    def attention_window_for(self, latent_frames: int, frame_tokens: int,
                             continuous: bool = False) -> tuple[AttentionWindow, bool]:
        """The configured window (a rolling one for continuous runs), narrowed to whole blocks when the
        KV cache would exceed its budget."""
        window = self.window
        if continuous and window.window_frames is None:
            window = AttentionWindow(*self.config.continuous_window)
        if self.kv_cache_budget is None:
            return window, False
        cfg = self.generator.config
        per_frame = kv_bytes_per_frame(cfg.num_layers, cfg.dim, frame_tokens, self.dtype,
                                       fp8_heads=cfg.num_heads if self.kv_cache_fp8 else None)
        if window.frames_needed(latent_frames) * per_frame <= self.kv_cache_budget:
            return window, False
        return window.narrowed(self.kv_cache_budget // per_frame, self.config.frames_per_block), True

    def generate(self, request: GenerationRequest, cancel: CancelCheck | None = None) -> Iterator[BlockResult]:
        """Yields each block as soon as it is decoded; all per-run GPU memory is freed at the end."""
        num_blocks, height, width = self.validate(request)
        blocks = self._generate(request, num_blocks, height, width, cancel)
        try:
            yield from blocks
        finally:
            blocks.close()  # drops the KV caches and the decoder state before releasing memory
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def _generate(self, request: GenerationRequest, num_blocks: int, height: int, width: int,
                  cancel: CancelCheck | None) -> Iterator[BlockResult]:
        started = time.perf_counter()
        self.loras.activate(request.loras)
        cfg, model = self.config, self.generator
        fpb = cfg.frames_per_block
        latent_h, latent_w = cfg.latent_size(height, width)
        frame_tokens = model.frame_tokens(latent_h, latent_w)
        channels = model.config.in_dim

        prompts = [request.prompt]
        if self.sampler.num_contexts == 2:
            negative = request.negative_prompt if request.negative_prompt is not None else cfg.negative_prompt
            prompts.append(negative or "")
        contexts = [model.encode_context(self.prompt_encoder.encode(text, self.device)) for text in prompts]

        rng = torch.Generator(device=self.device).manual_seed(int(request.seed))
        block_shape = (1, channels, fpb, latent_h, latent_w)
        # A fixed-length video draws all its noise first, in the reference's order (same seeds, same
        # videos); a continuous one draws each block's noise when the block starts.
        noise = None if request.continuous else reference_noise(
            (1, channels, num_blocks * fpb, latent_h, latent_w), rng, self.device, self.dtype)

        first_latent = request.reference_latent
        if first_latent is None and request.image is not None:
            first_latent = self.vae.encode(prepare_image(request.image, height, width))
        prefix_frames = 0 if first_latent is None else first_latent.shape[2]
        window, forced = self.attention_window_for(prefix_frames + num_blocks * fpb, frame_tokens,
                                                   request.continuous)
        caches = [KVCache(model.config.num_layers, 1, prefix_frames + num_blocks * fpb, frame_tokens,
                          model.config.num_heads, model.head_dim, window, self.dtype, self.device,
                          fp8=self.kv_cache_fp8)
                  for _ in contexts]
        decoder = self.tiny_decoder.stream() if request.fast_decode else self.vae.stream(self.decode_frame_by_frame)

        prompt, switch_ms = request.prompt, None
        written: list[ContextWrite] = []  # clean frames in the cache, to rebuild it under a new prompt

        def decoded(index: int, latents: torch.Tensor, denoise_s: float, clean: torch.Tensor | None) -> BlockResult:
            decode_start = time.perf_counter()
            frames = to_uint8_frames(decoder.decode_block(latents))
            now = time.perf_counter()
            return BlockResult(index=index, num_blocks=num_blocks, frames=frames,
                               latents=None if clean is None else clean.float().cpu(), denoise_s=denoise_s,
                               decode_s=now - decode_start, elapsed_s=now - started, complete=clean is not None,
                               window_frames=window.window_frames, window_forced=forced, prompt=prompt,
                               switch_ms=switch_ms if clean is not None else None)

        def write(clean: torch.Tensor, start_frame: int, timestep: float, bias: torch.Tensor | None) -> None:
            written.append(ContextWrite(clean, start_frame, timestep, bias))
            self._write_context(clean, start_frame, contexts, caches, timestep, bias)
            written[:] = still_cached(written, window, start_frame + clean.shape[2])

        if first_latent is not None:
            first_latent = first_latent.to(self.device, self.dtype)
            write(first_latent, 0, 0, self._token_bias(request, 0, prefix_frames))
            prefix = decoded(0, first_latent, 0.0, None)  # the input image is the first frame: show it now
            prefix.latents = first_latent.float().cpu()
            yield prefix

        carried_s = 0.0  # the previous block's cache write, timed with this block's denoising
        for index in range(num_blocks):
            if cancel is not None and cancel():
                log.info("generation cancelled before block %d/%d", index + 1, num_blocks)
                return
            switch = request.steering.take() if request.steering is not None else None
            switch_ms = None
            if switch is not None and switch.prompt != prompt.strip():
                switch_ms = self._switch_prompt(switch, contexts, caches, written)
                prompt = switch.prompt
                log.info("prompt switched before block %d/%d (%s, %.0f ms)", index + 1, num_blocks, switch.mode,
                         switch_ms)
            block_start = time.perf_counter()
            start_frame = prefix_frames + index * fpb
            bias = self._token_bias(request, start_frame, fpb)
            noisy = reference_noise(block_shape, rng, self.device, self.dtype) if noise is None else \
                noise[:, :, index * fpb:(index + 1) * fpb]

            def predict(latents: torch.Tensor, timestep: float, context_index: int) -> torch.Tensor:
                return model(latents, self._timesteps(timestep, latents.shape[2]), contexts[context_index],
                             start_frame=start_frame, kv_cache=caches[context_index], token_bias=bias)

            clean = self.sampler.denoise(noisy, predict, rng)
            denoise_s = carried_s + self._seconds_since(block_start)
            if decoder.frames_seen == 0 and clean.shape[2] > 1:
                # The first latent frame decodes to one video frame: send it before the rest of the block.
                yield decoded(index, clean[:, :, :1], denoise_s, None)
                yield decoded(index, clean[:, :, 1:], 0.0, clean)
            else:
                yield decoded(index, clean, denoise_s, clean)
            # The clean block's pass that fills the KV cache only matters to later blocks: it runs after
            # this block's frames were sent, and not at all after the last block.
            carried_s = 0.0
            if index + 1 < num_blocks:
                write_start = time.perf_counter()
                write(clean, start_frame, cfg.sampler.context_noise, bias)
                carried_s = self._seconds_since(write_start)

    @torch.no_grad()
    def decode_with_vae(self, latents: list[torch.Tensor]) -> Iterator[np.ndarray]:
        """A run's latents (image prefix first, then each block) through the Wan VAE, block by block:
        the frames that run would have streamed without fast_decode (generation does not depend on
        the decoder)."""
        decoder = self.vae.stream(self.decode_frame_by_frame)
        for block in latents:
            yield to_uint8_frames(decoder.decode_block(block.to(self.device, self.dtype)))

    def _switch_prompt(self, switch: PromptSwitch, contexts: list, caches: list[KVCache],
                       written: list["ContextWrite"]) -> float:
        """Conditions the following blocks on switch.prompt; returns the milliseconds it took."""
        start = time.perf_counter()
        contexts[0] = self.generator.encode_context(self.prompt_encoder.encode(switch.prompt, self.device))
        if switch.mode == "recache":
            caches[0] = self.rebuilt_cache(caches[0], contexts[0], written)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return (time.perf_counter() - start) * 1e3

    def rebuilt_cache(self, cache: KVCache, context: list, written: list["ContextWrite"]) -> KVCache:
        """A cache like `cache`, refilled from the clean frames written so far, under `context`."""
        fresh = cache.empty_like()
        for item in written:
            start_token = item.start_frame * fresh.frame_tokens
            if start_token > fresh.global_end:
                fresh.advance_to(start_token)
            self._write_context(item.latents, item.start_frame, [context], [fresh], item.timestep, item.bias)
        return fresh

    def _seconds_since(self, start: float) -> float:
        """Wall time of the GPU work queued since `start` (waits for it)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter() - start

    def _timesteps(self, value: float, frames: int) -> torch.Tensor:
        return torch.full((1, frames), float(value), device=self.device, dtype=torch.float32)

    @staticmethod
    def _token_bias(request: GenerationRequest, start_frame: int, num_frames: int) -> torch.Tensor | None:
        return None if request.conditioning is None else request.conditioning.token_bias(start_frame, num_frames)

    def _write_context(self, clean: torch.Tensor, start_frame: int, contexts: list, caches: list[KVCache],
                       timestep: float, bias: torch.Tensor | None) -> None:
        """Runs the clean frames through the generator once to store their keys/values."""
        for context, cache in zip(contexts, caches):
            self.generator(clean, self._timesteps(timestep, clean.shape[2]), context, start_frame=start_frame,
                           kv_cache=cache, token_bias=bias)
