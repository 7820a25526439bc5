"""The one pipeline core behind every tab: block-by-block causal generation with streaming decode.

generate() yields a BlockResult as soon as each block of latent frames is denoised and
decoded, so callers can show frames while later blocks are still being generated; the block's
pass that writes it into the KV cache runs after that (and not after the last block). All
per-generation state (KV caches, VAE conv cache, random generator) lives in one BlockRun made by
each generate() call; the model weights are the only thing shared between callers.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from .branch import ResumeFrom
from .config import PipelineConfig
from .drift import BlockDrift, DriftMonitor
from .loading.lora import LoraChoice, LoraError, LoraMerger
from .loading.vae import to_uint8_frames
from .loading.weights import Components
from .model.kv_cache import AttentionWindow, KVCache, kv_bytes_per_frame
from .model.rolling_cache import RollingForcingCache
from .scheduler import RollingWindowSampler, make_sampler, reference_noise
from .settings import RuntimeSettings
from .steering import PromptSteering, PromptSwitch
from .video_input import VideoSource

log = logging.getLogger(__name__)


REFRESH_RECENT_BLOCKS = 1  # blocks besides the sink frames the drift guard's re-cache keeps

# Seeds are exact integers in every client: JavaScript numbers (the browser, JSON) are exact up to 2**53 - 1.
MAX_SEED = 2**53 - 1


class RequestError(ValueError):
    """A request the pipeline cannot run (bad prompt, size, length or image); message is user-facing."""


class BlockConditioning(Protocol):
    """Extra per-block input (pose): token_bias(start_frame, num_frames) -> [1, tokens, dim] or None; frames_ready
    is False when a live input ended before those frames (the run then ends)."""

    def token_bias(self, start_frame: int, num_frames: int) -> torch.Tensor | None: ...

    def frames_ready(self, start_frame: int, num_frames: int) -> bool: ...


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
    reseeds: dict[int, int] = field(default_factory=dict)  # block -> seed: that seed's noise from that block on
    resume: ResumeFrom | None = field(default=None, repr=False)  # a branch: restore the blocks before resume.block
    drift_guard: float | None = None  # re-cache (BlockRun.refresh_cache) after a block whose drift score passes this
    source: VideoSource | None = field(default=None, repr=False)  # video-to-video: the input frames, block by block
    strength: float = 0.6  # video-to-video: the noise level each input block starts from (1 = only the prompt)


@dataclass(frozen=True)
class ValidatedRequest:
    """A request validate() accepted, with the length and size it resolved to; generate() runs it as is."""

    request: GenerationRequest
    num_blocks: int
    height: int
    width: int


@dataclass
class BlockResult:
    """Newly decoded frames of block `index`. A block arrives in one result, except that the very
    first video frame of a run is sent on its own as soon as it exists (complete=False)."""

    index: int
    num_blocks: int
    frames: np.ndarray | None  # uint8 [T, H, W, 3] (None only while `pending`)
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
    switch_mode: str | None = None  # how it switched (steering.SWITCH_MODES)
    reseed: int | None = None  # the seed whose noise started at this block (request.reseeds)
    rng_state: torch.Tensor | None = field(default=None, repr=False)  # the random generator after this block (CPU),
    # what a branch from the next block restores
    restored: bool = False  # a branch's block from before its branch point, decoded from kept latents
    drift: BlockDrift | None = None  # how far this block has drifted from the run's first blocks (complete results)
    refreshed: bool = False  # the drift guard re-cached before this block
    pending: Callable[[], None] | None = field(default=None, repr=False)  # frames still decoding elsewhere: call it
    # to wait for them (generate() does, before it yields the result)

    @property
    def block_s(self) -> float:
        return self.denoise_s + self.decode_s


CancelCheck = Callable[[], bool]


class FramesDecoder(Protocol):
    """A run's streaming decoder: submit() takes the next latent frames and returns a Future of (uint8 frames
    [T, H, W, 3], decode seconds); frames_seen counts the latent frames submitted."""

    frames_seen: int

    def submit(self, latents: torch.Tensor) -> Future: ...


class DecodeHere:
    """A streaming decoder (Wan VAE or TAEHV) run where the generator runs: each block decoded when submitted."""

    def __init__(self, stream) -> None:
        self.stream = stream

    @property
    def frames_seen(self) -> int:
        return self.stream.frames_seen

    def submit(self, latents: torch.Tensor) -> Future:
        start = time.perf_counter()
        decoded: Future = Future()
        decoded.set_result((to_uint8_frames(self.stream.decode_block(latents)), time.perf_counter() - start))
        return decoded


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


def validate_request(request: GenerationRequest, config: PipelineConfig, fast_decoder: bool = False,
                     fp8_linears: bool = False) -> ValidatedRequest:
    """The checks of StreamingVideoPipeline.validate from the config and two facts about the loaded model, so a
    server without the model (a worker pool's front end) refuses a bad request before it queues."""
    if not request.prompt or not request.prompt.strip():
        raise RequestError("Please enter a prompt.")
    if request.drift_guard is not None and not 0 < request.drift_guard <= 1:
        raise RequestError(f"The drift guard's threshold must be above 0 and at most 1, got {request.drift_guard}.")
    if not 0 <= request.seed <= MAX_SEED:
        raise RequestError(f"Seed must be a whole number from 0 to {MAX_SEED}.")
    if not 0 < request.strength <= 1:
        raise RequestError(f"Strength must be above 0 and at most 1, got {request.strength}.")
    num_blocks = config.num_blocks if request.num_blocks is None else request.num_blocks
    source = request.source
    if source is not None:
        if config.sampler.kind != "few_step":
            raise RequestError("Video-to-video needs a few-step (distilled) model.")
        if request.image is not None or request.reference_latent is not None or request.resume is not None:
            raise RequestError("Video-to-video starts from its input video: no image, and no branch of it.")
        if source.total_frames is not None and not request.continuous:
            fitting = config.input_blocks(source.total_frames)
            if fitting < 1:
                raise RequestError(f"The input video is too short: it needs at least "
                                   f"{config.block_video_frames(0)} frames.")
            num_blocks = min(num_blocks, fitting) if request.num_blocks is not None else min(fitting, config.max_blocks)
    if request.continuous:
        num_blocks = config.continuous_blocks
    elif not 1 <= num_blocks <= config.max_blocks:
        raise RequestError(f"Number of blocks must be between 1 and {config.max_blocks}.")
    if request.fast_decode and not fast_decoder:
        raise RequestError("The fast decoder needs taew2_1.pth from github.com/madebyollin/taehv in the weights "
                           "folder; without it the full Wan VAE decodes.")
    height, width = request.height or config.height, request.width or config.width
    step, largest = config.size_multiple, config.max_side
    if height % step or width % step or not (step <= height <= largest and step <= width <= largest):
        raise RequestError(f"Height and width must be multiples of {step} between {step} and {largest}.")
    if request.loras and fp8_linears:
        raise RequestError("LoRAs cannot be merged into FP8 weights: the server was started with --fp8; "
                           "start it without --fp8 to use LoRAs.")
    for choice in request.loras:
        if not 0 <= choice.scale <= 2:
            raise RequestError(f"LoRA strength must be between 0 and 2, got {choice.scale}.")
    for block, seed in request.reseeds.items():
        if not (0 <= block < num_blocks and 0 <= seed <= MAX_SEED):
            raise RequestError(f"A new seed must be a whole number from 0 to {MAX_SEED}, for a block of the run.")
    if config.text_to_video_only and (request.image is not None or request.reference_latent is not None
                                             or request.resume is not None or request.reseeds):
        raise RequestError("This model denoises several blocks at once (a rolling window): it makes text-to-video "
                           "only, and its runs cannot be branched or reseeded.")
    resume = request.resume
    if resume is not None:
        if not 0 <= resume.block < num_blocks:
            raise RequestError(f"A branch must start at a block of the run (1 to {num_blocks - 1}).")
        if resume.block and resume.rng_state is None and resume.block not in request.reseeds:
            raise RequestError("A branch that keeps its noise needs the random state kept with its blocks.")
    return ValidatedRequest(request, num_blocks, height, width)


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
    """Self-Forcing inference: few-step (or multi-step CFG) denoising of 3-frame blocks.

    settings: how it runs (memory plan, kernels, compiled, fast decoder), fixed for the pipeline's life.
    parallel: the other ranks' group (parallel/group.py, --gpus) when this is rank 0 of a split stream; with a
    decoding rank, blocks decode there while the next one is generated.
    """

    def __init__(self, components: Components, config: PipelineConfig, device: torch.device | str = "cpu",
                 settings: RuntimeSettings = RuntimeSettings(), loras: LoraMerger | None = None,
                 parallel=None) -> None:
        self.components = components
        self.config = config
        self.device = torch.device(device)
        self.settings = settings
        self.generator = components.generator
        self.vae = components.vae
        self.prompt_encoder = components.prompt_encoder
        self.window = config.attention_window
        self.sampler = make_sampler(config.sampler)
        self.loras = loras or LoraMerger(self.generator)  # (shared with a pipeline made by with_settings)
        self.parallel = parallel

    def with_settings(self, settings: RuntimeSettings) -> "StreamingVideoPipeline":
        """The same weights and merged LoRAs under new settings (a new memory profile)."""
        return StreamingVideoPipeline(self.components, self.config, self.device, settings, self.loras,
                                      self.parallel)

    @property
    def remote_decoding(self):
        """The decoding rank's client (parallel/decode.py) when another rank decodes; None: decoded here."""
        return self.parallel.decoding if self.parallel is not None else None

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.patch_embedding.weight.dtype

    @property
    def fast_decoder(self):
        return self.settings.fast_decoder

    def validate(self, request: GenerationRequest) -> ValidatedRequest:
        """Checks the request (raising RequestError with a user-facing message) and resolves its length and size.
        LoRA files are read when the run starts (a bad one raises RequestError there)."""
        if self.parallel is not None and (lost := self.parallel.lost()):
            raise RequestError(lost)
        if isinstance(request, ValidatedRequest):
            return request
        return validate_request(request, self.config, self.fast_decoder is not None, self.settings.fp8_linears)

    def fast_path_note(self, request: GenerationRequest) -> str:
        """What makes this request's frames differ from the exact bf16 path ('' when nothing does)."""
        parts = self.settings.differences(request.fast_decode)
        return f"{' and '.join(parts)}: frames differ slightly from the exact bf16 path" if parts else ""

    def attention_window_for(self, latent_frames: int, frame_tokens: int,
                             continuous: bool = False) -> tuple[AttentionWindow, bool]:
        """The configured window (a rolling one for continuous runs), narrowed to whole blocks when the
        KV cache would exceed its budget."""
        window = self.window
        if continuous and window.window_frames is None:
            window = AttentionWindow(*self.config.continuous_window)
        budget = self.settings.kv_cache_budget
        if budget is None:
            return window, False
        cfg = self.generator.config
        per_frame = kv_bytes_per_frame(cfg.num_layers, cfg.dim, frame_tokens, self.dtype,
                                       fp8_heads=cfg.num_heads if self.settings.kv_cache_fp8 else None)
        if window.frames_needed(latent_frames) * per_frame <= budget:
            return window, False
        return window.narrowed(budget // per_frame, self.config.frames_per_block), True

    def generate(self, request: GenerationRequest | ValidatedRequest,
                 cancel: CancelCheck | None = None) -> Iterator[BlockResult]:
        """Yields each block as soon as it is decoded; all per-run GPU memory is freed at the end."""
        blocks = self._generate(self.validate(request), cancel)
        if self.remote_decoding is not None:
            from .parallel.decode import ahead_of_decoding

            blocks = ahead_of_decoding(blocks)
        try:
            yield from blocks
        except Exception as err:
            if self.parallel is None or isinstance(err, RequestError):
                raise
            lost = self.parallel.lost(wait_s=5.0)
            if lost is None:
                raise
            raise RequestError(lost) from err  # (a rank of a split stream died: said to the visitor)
        finally:
            blocks.close()  # drops the KV caches and the decoder state before releasing memory
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def _generate(self, validated: ValidatedRequest, cancel: CancelCheck | None) -> Iterator[BlockResult]:
        request, num_blocks = validated.request, validated.num_blocks
        started = time.perf_counter()
        try:
            self.loras.activate(request.loras)
        except LoraError as err:
            raise RequestError(str(err)) from err
        run = BlockRun(self, validated, started)

        # 1. The input image (image-to-video) or pose reference is the first frame: cached, and shown at once.
        if run.first_latent is not None:
            yield run.write_prefix()

        # 2. A branch: the blocks before its branch point again, from their kept latents (not denoised).
        first_block = 0
        if request.resume is not None:
            yield from run.restore(request.resume)
            first_block = request.resume.block

        # 3. Block by block: a prompt switch or new seed if one is due, the sampler's steps, frames out, then the
        # clean block's pass that fills the KV cache (it only matters to later blocks: it runs after this
        # block's frames were sent, and not at all after the last block).
        for index in range(first_block, num_blocks):
            if cancel is not None and cancel():
                log.info("generation cancelled before block %d/%d", index + 1, num_blocks)
                return
            run.begin_block(index)
            block_start = time.perf_counter()
            source = run.next_input(index) if request.source is not None else None
            if (request.source is not None and source is None) or not run.conditioning_ready(index):
                log.info("the input (video or pose stream) ended before block %d", index + 1)
                return
            clean, bias = run.denoise(index, source)
            denoise_s = run.carried_s + self._seconds_since(block_start)
            yield from run.decoded_block(index, clean, denoise_s)
            run.carried_s = 0.0
            if index + 1 < num_blocks:
                write_start = time.perf_counter()
                run.write(clean, run.start_frame(index), self.config.sampler.context_noise, bias)
                run.carried_s = self._seconds_since(write_start)

    @torch.no_grad()
    def decode_with_vae(self, latents: list[torch.Tensor]) -> Iterator[np.ndarray]:
        """A run's latents (image prefix first, then each block) through the Wan VAE, block by block:
        the frames that run would have streamed without fast_decode (generation does not depend on
        the decoder)."""
        decoder = self.vae.stream(self.settings.decode_frame_by_frame)
        for block in latents:
            yield to_uint8_frames(decoder.decode_block(block.to(self.device, self.dtype)))

    def encode_prompt(self, text: str) -> list:
        return self.generator.encode_context(self.prompt_encoder.encode(text, self.device))

    def rebuilt_cache(self, cache: KVCache, context: list, written: list["ContextWrite"]) -> KVCache:
        """A cache like `cache`, refilled from the clean frames written so far, under `context`."""
        fresh = cache.empty_like()
        for item in written:
            start_token = item.start_frame * fresh.frame_tokens
            if start_token > fresh.global_end:
                fresh.advance_to(start_token)
            self.write_context(item.latents, item.start_frame, [context], [fresh], item.timestep, item.bias)
        return fresh

    def _seconds_since(self, start: float) -> float:
        """Wall time of the GPU work queued since `start` (waits for it)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter() - start

    def timesteps(self, value: float, frames: int) -> torch.Tensor:
        return torch.full((1, frames), float(value), device=self.device, dtype=torch.float32)

    def write_context(self, clean: torch.Tensor, start_frame: int, contexts: list, caches: list[KVCache],
                      timestep: float, bias: torch.Tensor | None) -> None:
        """Runs the clean frames through the generator once to store their keys/values."""
        for context, cache in zip(contexts, caches):
            self.generator(clean, self.timesteps(timestep, clean.shape[2]), context, start_frame=start_frame,
                           kv_cache=cache, token_bias=bias)


class BlockRun:
    """The state of one generate() call: prompt contexts, KV caches, noise, decoder, the frames written into the
    caches (to rebuild them under a new prompt) and the prompt in force."""

    def __init__(self, pipeline: StreamingVideoPipeline, validated: ValidatedRequest, started: float) -> None:
        self.pipeline, self.request, self.started = pipeline, validated.request, started
        self.num_blocks = validated.num_blocks
        cfg, model, device, dtype = pipeline.config, pipeline.generator, pipeline.device, pipeline.dtype
        request = self.request
        self.frames_per_block = cfg.frames_per_block
        latent_h, latent_w = cfg.latent_size(validated.height, validated.width)
        frame_tokens = model.frame_tokens(latent_h, latent_w)

        prompts = [request.prompt]
        if pipeline.sampler.num_contexts == 2:
            negative = request.negative_prompt if request.negative_prompt is not None else cfg.negative_prompt
            prompts.append(negative or "")
        self.contexts = [pipeline.encode_prompt(text) for text in prompts]

        self.block_shape = (1, model.config.in_dim, self.frames_per_block, latent_h, latent_w)
        self.reseed(request.seed)

        first_latent = request.reference_latent
        if first_latent is None and request.image is not None:
            first_latent = pipeline.vae.encode(prepare_image(request.image, validated.height, validated.width))
        self.first_latent = first_latent
        self.prefix_frames = 0 if first_latent is None else first_latent.shape[2]
        total_frames = self.prefix_frames + self.num_blocks * self.frames_per_block
        settings = pipeline.settings
        self.rolling = None  # Rolling Forcing: the blocks in flight, and its own cache (it holds local_attn_size
        # frames whatever the video's length: not narrowed, no FP8)
        if isinstance(pipeline.sampler, RollingWindowSampler):
            self.rolling = pipeline.sampler.start(self.num_blocks, self.frames_per_block)
            self.window, self.window_forced = pipeline.window, False
            self.caches = [RollingForcingCache(model.config.num_layers, 1, frame_tokens, model.config.num_heads,
                                               model.head_dim, cfg.local_attn_size, self.frames_per_block, dtype,
                                               device)]
        else:
            self.window, self.window_forced = pipeline.attention_window_for(total_frames, frame_tokens,
                                                                            request.continuous)
            self.caches = [model.new_kv_cache(total_frames, frame_tokens, self.window, device,
                                              fp8=settings.kv_cache_fp8) for _ in self.contexts]
        self.decoder: FramesDecoder
        if pipeline.remote_decoding is not None:
            self.decoder = pipeline.remote_decoding.stream(request.fast_decode, settings.decode_frame_by_frame)
        else:
            self.decoder = DecodeHere(settings.fast_decoder.stream() if request.fast_decode else
                                      pipeline.vae.stream(settings.decode_frame_by_frame))
        self.prompt, self.switch_ms, self.switch_mode, self.reseeded = request.prompt, None, None, None
        self.rng_state: torch.Tensor | None = None  # the generator's state after the last denoised block
        self.drift = DriftMonitor()
        self.encoder = pipeline.vae.stream_encoder() if request.source is not None else None
        self.size = (validated.height, validated.width)
        self.refresh_due, self.refreshed = False, False  # the drift guard's re-cache: asked for, done before a block
        self.written: list[ContextWrite] = []  # clean frames in the cache, to rebuild it under a new prompt
        self.carried_s = 0.0  # the previous block's cache write, timed with this block's denoising

    def reseed(self, seed: int) -> None:
        """Noise from `seed`: a fixed-length video draws all of it first, in the reference's order (same seeds,
        same videos; blocks from a reseed on take their part of it); a continuous one draws each block's noise
        when the block starts."""
        pipeline, (_, channels, frames, height, width) = self.pipeline, self.block_shape
        self.rng = torch.Generator(device=pipeline.device).manual_seed(int(seed))
        self.noise = None if self.request.continuous else reference_noise(
            (1, channels, self.num_blocks * frames, height, width), self.rng, pipeline.device, pipeline.dtype)

    def begin_block(self, index: int) -> None:
        """A prompt switch, the drift guard's re-cache or a new seed due before block `index`."""
        self.take_prompt_switch(index)
        self.refreshed, self.refresh_due = self.refresh_due, False
        if self.refreshed:
            self.refresh_cache()
            log.info("drift guard: re-cached before block %d", index + 1)
        self.reseeded = self.request.reseeds.get(index)
        if self.reseeded is not None:
            self.reseed(self.reseeded)

    def restore(self, resume: ResumeFrom) -> Iterator[BlockResult]:
        """The blocks before resume.block from their kept latents: the same switches, cache writes and decoder steps
        as when they were made (so the caches and the decoder end up as they were), then the generator's state."""
        pipeline = self.pipeline
        for index, kept in enumerate(resume.latents):
            if tuple(kept.shape) != self.block_shape:
                raise RequestError("The kept blocks do not fit this request (another size or model): branch from "
                                   "a run made with these settings.")
            self.begin_block(index)
            clean = kept.to(pipeline.device, pipeline.dtype)
            for result in self.decoded_block(index, clean, 0.0):
                result.restored = True
                yield result
            start = self.start_frame(index)
            self.write(clean, start, pipeline.config.sampler.context_noise, self.token_bias(start, self.frames_per_block))
        if resume.rng_state is not None and resume.block not in self.request.reseeds:
            self.rng.set_state(resume.rng_state)

    def start_frame(self, index: int) -> int:
        return self.prefix_frames + index * self.frames_per_block

    def conditioning_ready(self, index: int) -> bool:
        """Whether block `index`'s conditioning input arrived (a live pose input may have ended before it)."""
        conditioning = self.request.conditioning
        return conditioning is None or conditioning.frames_ready(self.start_frame(index), self.frames_per_block)

    def token_bias(self, start_frame: int, num_frames: int) -> torch.Tensor | None:
        conditioning = self.request.conditioning
        return None if conditioning is None else conditioning.token_bias(start_frame, num_frames)

    def write(self, clean: torch.Tensor, start_frame: int, timestep: float, bias: torch.Tensor | None) -> None:
        """Clean frames into the KV caches (and into the record of what they hold)."""
        self.written.append(ContextWrite(clean, start_frame, timestep, bias))
        self.pipeline.write_context(clean, start_frame, self.contexts, self.caches, timestep, bias)
        self.written[:] = still_cached(self.written, self.window, start_frame + clean.shape[2])

    def write_prefix(self) -> BlockResult:
        first_latent = self.first_latent.to(self.pipeline.device, self.pipeline.dtype)
        self.write(first_latent, 0, 0, self.token_bias(0, self.prefix_frames))
        prefix = self.decoded(0, first_latent, 0.0, None)
        prefix.latents = first_latent.float().cpu()
        return prefix

    def take_prompt_switch(self, index: int) -> None:
        """Conditions the blocks from `index` on a new prompt when steering holds one."""
        steering = self.request.steering
        switch = steering.take() if steering is not None else None
        self.switch_ms, self.switch_mode = None, None
        if switch is None or switch.prompt == self.prompt.strip():
            return
        self.switch_ms, self.switch_mode = self.switch_prompt(switch), switch.mode
        self.prompt = switch.prompt
        log.info("prompt switched before block %d/%d (%s, %.0f ms)", index + 1, self.num_blocks, switch.mode,
                 self.switch_ms)

    def refresh_cache(self) -> None:
        """The drift guard's remedy: the caches rebuilt under the prompts in force from the sink frames and the last
        block only, so the frames that drifted stop feeding the next blocks (the last block keeps the motion going).
        bench/results/NOTES.md compares it with rebuilding from every cached frame and with the sink frames alone."""
        if not self.written:
            return
        sink_frames = self.window.sink_frames if self.window.window_frames is not None else 0
        sink = [w for w in self.written if w.start_frame < sink_frames]
        recent = [w for w in self.written if w.start_frame >= sink_frames]
        recent = recent[len(recent) - REFRESH_RECENT_BLOCKS:] if len(recent) > REFRESH_RECENT_BLOCKS else recent
        last = self.written[-1]
        end_token = (last.start_frame + last.latents.shape[2]) * self.caches[0].frame_tokens
        for index, (cache, context) in enumerate(zip(self.caches, self.contexts)):
            fresh = self.pipeline.rebuilt_cache(cache, context, sink + recent)
            if fresh.global_end < end_token:
                fresh.advance_to(end_token)
            self.caches[index] = fresh
        self.written = sink + recent

    def switch_prompt(self, switch: PromptSwitch) -> float:
        """Conditions the following blocks on switch.prompt; returns the milliseconds it took."""
        pipeline = self.pipeline
        start = time.perf_counter()
        self.contexts[0] = pipeline.encode_prompt(switch.prompt)
        if switch.mode == "recache":
            self.caches[0] = pipeline.rebuilt_cache(self.caches[0], self.contexts[0], self.written)
        return pipeline._seconds_since(start) * 1e3

    def next_input(self, index: int) -> torch.Tensor | None:
        """Video-to-video: block `index`'s input frames through the streaming encoder (None: the input ended)."""
        frames = self.request.source.read(self.pipeline.config.block_video_frames(index))
        if frames is None:
            return None
        pixels = torch.cat([prepare_image(Image.fromarray(frame), *self.size) for frame in frames], dim=2)
        return self.encoder.encode_frames(pixels).to(self.pipeline.device, self.pipeline.dtype)

    def denoise(self, index: int, source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(block `index`'s clean latents, its token bias) from its noise (and its input's latents in video-to-video)
        through the sampler."""
        pipeline, fpb = self.pipeline, self.frames_per_block
        if self.rolling is not None:
            clean = self.rolling.finish(index, self.block_noise, self.predict_window, self.rng)
            self.rng_state = self.rng.get_state()
            return clean, None
        start_frame = self.start_frame(index)
        bias = self.token_bias(start_frame, fpb)
        noisy = self.block_noise(index)

        def predict(latents: torch.Tensor, timestep: float, context_index: int) -> torch.Tensor:
            return pipeline.generator(latents, pipeline.timesteps(timestep, latents.shape[2]),
                                      self.contexts[context_index], start_frame=start_frame,
                                      kv_cache=self.caches[context_index], token_bias=bias)

        clean = pipeline.sampler.denoise(noisy, predict, self.rng, first_block=index == 0, source=source,
                                         strength=self.request.strength)
        self.rng_state = self.rng.get_state()  # (a CPU tensor on every device)
        return clean, bias

    def block_noise(self, index: int) -> torch.Tensor:
        """Block `index`'s starting noise: its part of the run's noise, or drawn now (continuous runs)."""
        fpb = self.frames_per_block
        if self.noise is None:
            return reference_noise(self.block_shape, self.rng, self.pipeline.device, self.pipeline.dtype)
        return self.noise[:, :, index * fpb:(index + 1) * fpb]

    def predict_window(self, latents: torch.Tensor, timesteps: torch.Tensor, start_frame: int) -> torch.Tensor:
        """A Rolling Forcing window pass: the window's frames at their own timesteps, attending through the cache's
        read-only window view."""
        model = self.pipeline.generator
        grid = (latents.shape[3] // model.patch[1], latents.shape[4] // model.patch[2])
        view = self.caches[0].window_pass(model.rope, *grid)
        return model(latents, timesteps, self.contexts[0], start_frame=start_frame, kv_cache=view)

    def decoded_block(self, index: int, clean: torch.Tensor, denoise_s: float) -> Iterator[BlockResult]:
        # The Wan VAE decodes a run's first latent frame to one video frame and every later one to four. A block of
        # several frames sends that first frame on its own before the rest; a frame-wise model's first block is
        # that one frame (1 video frame, then 4 per block).
        if self.decoder.frames_seen == 0 and clean.shape[2] > 1:
            yield self.decoded(index, clean[:, :, :1], denoise_s, None)
            yield self.decoded(index, clean[:, :, 1:], 0.0, clean)
        else:
            yield self.decoded(index, clean, denoise_s, clean)

    def decoded(self, index: int, latents: torch.Tensor, denoise_s: float, clean: torch.Tensor | None) -> BlockResult:
        """The result showing `latents`; when they decode elsewhere, its frames are pending (except under a drift
        guard: its verdict must come before the next block)."""
        frames = self.decoder.submit(latents)
        result = BlockResult(index=index, num_blocks=self.num_blocks, frames=None,
                             latents=None if clean is None else clean.float().cpu(), denoise_s=denoise_s,
                             decode_s=0.0, elapsed_s=0.0, complete=clean is not None,
                             window_frames=self.window.window_frames, window_forced=self.window_forced,
                             prompt=self.prompt, switch_ms=self.switch_ms if clean is not None else None,
                             switch_mode=self.switch_mode if clean is not None else None,
                             reseed=self.reseeded if clean is not None else None,
                             rng_state=self.rng_state if clean is not None else None,
                             refreshed=self.refreshed if clean is not None else False)
        result.pending = lambda: self.received(result, frames, clean)
        if frames.done() or self.request.drift_guard is not None:
            result.pending()
        return result

    def received(self, result: BlockResult, frames: Future, clean: torch.Tensor | None) -> None:
        """Completes `result` with its decoded frames (waiting for them) and their drift."""
        result.frames, result.decode_s = frames.result()
        if clean is not None:
            result.drift = self.drift.add(result.frames, clean)
            guard = self.request.drift_guard
            self.refresh_due = guard is not None and result.drift.score > guard
        result.elapsed_s = time.perf_counter() - self.started
        result.pending = None
